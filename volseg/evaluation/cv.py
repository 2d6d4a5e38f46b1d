"""Cross-validation metrics (``volseg evaluate --cv FOLDER``): the validation predictions a run
writes at the end of training (:mod:`volseg.training.validation`), scored for one run or for all
folds of a cross-validation parent, where each case is predicted by the one fold that did not
train on it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..runfolder import read_plan, runs_of, validation_pairs
from .files import evaluate_pairs
from .metrics import EvaluationResult

__all__ = ["evaluate_cv"]

PathLike = Union[str, Path]


def evaluate_cv(folder: PathLike, output: Optional[PathLike] = None, tolerance_mm: float = 2.0) -> EvaluationResult:
    """Metrics of the validation predictions of a run or of every fold of a parent (the
    cross-validation estimate); ``output`` as in :func:`~volseg.evaluation.evaluate`."""
    folder = Path(folder)
    plan = read_plan(folder if (folder / "plan.json").is_file() else runs_of(folder)[0])
    if plan.has_regions:
        return evaluate_pairs(validation_pairs(folder), dict(zip(plan.regions_class_order, plan.region_names)), output, tolerance_mm,
                              dict(zip(plan.regions_class_order, plan.regions)), plan.ignore_label)
    return evaluate_pairs(validation_pairs(folder), dict(zip(plan.label_values, plan.label_names)), output, tolerance_mm,
                          ignore=plan.ignore_label)
