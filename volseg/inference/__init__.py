"""Inference: trained networks as a bundle (:mod:`.bundle`), the predictor shared with
validation (:mod:`.predictor`) and its window engine (:mod:`.windows`), batch runs
(:mod:`.batch`), export (:mod:`.export`)."""

from .batch import Job, collect_inputs, infer_many
from .bundle import ModelBundle, load_bundle
from .predictor import Predictor

__all__ = ["Predictor", "ModelBundle", "load_bundle", "Job", "collect_inputs", "infer_many"]
