"""Inference: the predictor shared with validation, batch runs, export."""

from .batch import Job, collect_inputs, infer_many
from .predictor import Predictor

__all__ = ["Predictor", "Job", "collect_inputs", "infer_many"]
