"""Preprocessing: a run's plan replayed on a scan (:mod:`.pipeline`, with a SimpleITK and a torch
backend), its inverse (:mod:`.restore`), the body box (:mod:`.crop`) and the grids and
intensities they are made of (:mod:`.geometry`, :mod:`.intensity`)."""

from .crop import foreground_box
from .pipeline import load_case, preprocess, preprocess_case
from .restore import ScanRestorer, restore_labels

__all__ = ["foreground_box", "load_case", "preprocess", "preprocess_case", "ScanRestorer", "restore_labels"]
