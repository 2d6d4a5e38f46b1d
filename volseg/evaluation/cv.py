"""Cross-validation results: the validation predictions a run writes at the end of training,
their Dice, and the postprocessing learned from them.

* :func:`write_validation_predictions`: the run's validation cases segmented as ``volseg infer``
  would (same predictor, best checkpoint, each mask on its scan's own grid) but without any
  largest-component step, into ``RUN/val_predictions/<case>_seg.nii.gz``.
* :func:`evaluate_cv` (``volseg evaluate --cv FOLDER``): metrics of those predictions, for one run
  or for all folds of a cross-validation parent (:mod:`volseg.training.folds`): each case is
  predicted by the one fold that did not train on it.
* :func:`learn_postprocessing`: nnU-Net's rule. For each foreground label, keeping only its
  largest connected component is switched on if and only if it raises that label's mean Dice
  over the validation cases, and never for a label whose reference masks are in pieces (left and
  right kidney as one label); the decision and both Dice values go to
  ``FOLDER/postprocessing.json``, which ``volseg infer --model FOLDER`` applies
  (:meth:`volseg.inference.Predictor.from_run`; an explicit ``infer.largest_component`` wins).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..data.io import read_channels, write_label_like, write_text
from .metrics import EvaluationError, EvaluationResult, _load_pair, evaluate_pairs

log = logging.getLogger(__name__)

__all__ = ["VAL_PREDICTIONS", "POSTPROCESSING", "finish_validation", "write_validation_predictions", "cv_pairs", "evaluate_cv",
           "learn_postprocessing", "read_postprocessing"]

VAL_PREDICTIONS = "val_predictions"
POSTPROCESSING = "postprocessing.json"

PathLike = Union[str, Path]
Pair = Tuple[str, Path, Path, Path]  # case, prediction, reference, first scan


def finish_validation(run: Path, cases: Sequence, device: str = "auto") -> None:
    """End of training: write the validation predictions and learn the run's postprocessing
    (nothing without validation cases)."""
    if not cases:
        return
    write_validation_predictions(run, cases, device)
    learn_postprocessing(run)


def write_validation_predictions(run: PathLike, cases: Sequence, device: str = "auto") -> Path:
    """Segment ``cases`` (manifest cases) with the run's best checkpoint into
    ``RUN/val_predictions/``; returns that folder."""
    from ..inference.predictor import Predictor

    run = Path(run)
    out = run / VAL_PREDICTIONS
    # raw predictions: the postprocessing is learned from them
    pred = Predictor.from_run(run, device=device, overrides={"largest_component": []})
    for case in cases:
        images = [img for p in case.images for img in read_channels(p)]
        labels = pred.predict(images, source=str(case.images[0]))["labels"]
        write_label_like(labels, case.images[0], images[0], out / f"{case.name}_seg.nii.gz")
    log.info("wrote %d validation predictions to %s", len(cases), out)
    return out


def _runs(folder: Path) -> List[Path]:
    from ..training.folds import fold_dirs, is_cv_parent

    return fold_dirs(folder) if is_cv_parent(folder) else [folder]


def cv_pairs(folder: PathLike) -> List[Pair]:
    """(case, prediction, reference, scan) of every validation case of a run, or of all folds
    of a parent; a case without its prediction is an error naming the file."""
    from ..data.manifest import load_manifest

    pairs: List[Pair] = []
    for run in _runs(Path(folder)):
        path = run / "dataset.json"
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            manifest, names = info["manifest"], list(info["validation"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EvaluationError(f"{path}: cannot read the run's manifest and validation cases ({type(exc).__name__}).") from None
        if not names:
            raise EvaluationError(f"{run} has no validation cases (dataset.json), so there is nothing to cross-validate.")
        man = load_manifest(manifest)
        by_name = {c.name: c for c in tuple(man.training) + tuple(man.validation)}
        for name in names:
            pred = run / VAL_PREDICTIONS / f"{name}_seg.nii.gz"
            if name not in by_name or not pred.is_file():
                raise EvaluationError(f"{run}: validation case {name!r} has no "
                                      + (f"reference in {manifest}" if name not in by_name else f"prediction {pred} (training did not finish?)"))
            pairs.append((name, pred, by_name[name].label, by_name[name].images[0]))
    return pairs


def _labels(folder: Path) -> Dict[int, str]:
    from ..training.run_folder import read_plan

    plan = read_plan(folder if (folder / "plan.json").is_file() else _runs(folder)[0])
    return dict(zip(plan.label_values, plan.label_names))


def evaluate_cv(folder: PathLike, output: Optional[PathLike] = None, tolerance_mm: float = 2.0) -> EvaluationResult:
    """Metrics of the validation predictions of a run or of every fold of a parent (the
    cross-validation estimate); ``output`` as in :func:`~volseg.evaluation.evaluate`."""
    folder = Path(folder)
    return evaluate_pairs(cv_pairs(folder), _labels(folder), output, tolerance_mm)


#: a label counts as one piece when its largest connected component holds this share of its
#: reference mask in every validation case
REFERENCE_ONE_PIECE = 0.95


def learn_postprocessing(folder: PathLike) -> List[int]:
    """nnU-Net's rule on the validation predictions of a run or parent: the label values whose
    mean Dice rises (strictly) when only their largest connected component is kept, except
    labels whose reference masks are in pieces (:data:`REFERENCE_ONE_PIECE`). Written to
    ``FOLDER/postprocessing.json`` with the Dice before and after for every label."""
    from ..inference.predictor import largest_component
    from ..training.handlers import dice_per_class

    folder = Path(folder)
    labels = _labels(folder)
    values = sorted(labels)
    before: Dict[int, List[float]] = {v: [] for v in values[1:]}
    after: Dict[int, List[float]] = {v: [] for v in values[1:]}
    truth_kept: Dict[int, List[float]] = {v: [] for v in values[1:]}  # share of the reference in its largest component
    pairs = cv_pairs(folder)
    for name, pred_path, truth_path, _ in pairs:
        pred, truth, _ = _load_pair(pred_path, truth_path, name)
        for v in before:
            p, t = (pred == v).astype(np.uint8), (truth == v).astype(np.uint8)
            before[v].append(dice_per_class(p, t, 2)[0])
            after[v].append(dice_per_class(largest_component(p, [1]), t, 2)[0])
            if t.any():
                truth_kept[v].append(float(largest_component(t, [1]).sum() / t.sum()))
    # nnU-Net's rule, guarded: never for a label whose reference is itself in pieces (left and
    # right kidney as one label, lesions, vertebrae): there a briefly trained model that misses
    # one piece on validation "gains" from the step, which then deletes a found piece at test time
    whole = {v: min(truth_kept[v], default=1.0) >= REFERENCE_ONE_PIECE for v in before}
    keep = [v for v in before if np.mean(after[v]) > np.mean(before[v]) and whole[v]]
    record = {
        "largest_component": keep,
        "rule": ("keep only the largest connected component of a label iff that raises its mean Dice over the validation cases "
                 f"and the label's largest component holds at least {REFERENCE_ONE_PIECE:.0%} of its reference in every validation case"),
        "cases": len(pairs),
        "labels": {labels[v]: {"label": v, "dice": float(np.mean(before[v])), "dice_largest_component": float(np.mean(after[v])),
                               "reference_in_largest_component": min(truth_kept[v], default=None), "applied": v in keep} for v in before},
    }
    write_text(folder / POSTPROCESSING, json.dumps(record, indent=2) + "\n")
    log.info("postprocessing learned from %d validation cases: largest component of labels %s (%s)", len(pairs), keep or "none",
             ", ".join(f"{labels[v]} {np.mean(before[v]):.3f}->{np.mean(after[v]):.3f}" for v in before))
    return keep


def read_postprocessing(folder: PathLike) -> Optional[List[int]]:
    """The label values of ``FOLDER/postprocessing.json``, or ``None`` when there is none."""
    path = Path(folder) / POSTPROCESSING
    if not path.is_file():
        return None
    try:
        return [int(v) for v in json.loads(path.read_text(encoding="utf-8"))["largest_component"]]
    except (ValueError, KeyError, TypeError) as exc:
        from ..training.run_folder import RunFolderError

        raise RunFolderError(f"{path}: corrupt postprocessing rule ({type(exc).__name__}); delete it to infer without "
                             "postprocessing, or relearn it (retrain).") from None
