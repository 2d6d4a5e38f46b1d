"""Workflows that combine training, inference and evaluation: cross-validation
(:mod:`.crossval`) and the built-in demo (:mod:`.demo`)."""

from .crossval import train_folds
from .demo import demo_config, run_demo

__all__ = ["train_folds", "run_demo", "demo_config"]
