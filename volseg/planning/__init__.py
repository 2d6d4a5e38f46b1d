"""Planning, as nnU-Net's experiment planning: one fingerprint pass over the training cases
(:mod:`.fingerprint`), then pure functions of it: the commented config (:mod:`.planner`) and the
preprocessing plan (:mod:`.preprocessing_plan`)."""

from .fingerprint import fingerprint
from .planner import plan_config, plan_from_fingerprint, plan_manifest
from .preprocessing_plan import make_plan, plan_cases

__all__ = ["fingerprint", "plan_config", "plan_from_fingerprint", "plan_manifest", "make_plan", "plan_cases"]
