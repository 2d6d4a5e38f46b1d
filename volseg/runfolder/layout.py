"""Where things are in run folders and cross-validation parents, and the learned
postprocessing rule they keep.

A cross-validation parent (``volseg train --folds K``) holds ``cv.json`` (manifest, folds, fold
folders, shared plan) and ``fold_k/`` run folders; every run folder with validation cases holds
its final validation predictions in ``val_predictions/``; a run or a parent may hold
``postprocessing.json``, the largest-component rule learned from those predictions
(:func:`volseg.postprocessing.learn_postprocessing`), which inference applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..data.io import write_text
from ..data.manifest import load_manifest
from .errors import RunFolderError

__all__ = ["CV_FILE", "VAL_PREDICTIONS", "POSTPROCESSING", "is_cv_parent", "fold_dirs", "expand_runs", "runs_of",
           "validation_pairs", "read_postprocessing", "write_postprocessing"]

CV_FILE = "cv.json"
VAL_PREDICTIONS = "val_predictions"
POSTPROCESSING = "postprocessing.json"

PathLike = Union[str, Path]
Pair = Tuple[str, Path, Path, Path]  # case, prediction, reference, first scan


def is_cv_parent(folder: PathLike) -> bool:
    return (Path(folder) / CV_FILE).is_file()


def fold_dirs(parent: PathLike) -> List[Path]:
    """The fold run folders a parent declares (``cv.json``), in fold order."""
    parent = Path(parent)
    path = parent / CV_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return [parent / f"fold_{k}" for k in range(int(info["folds"]))]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunFolderError(f"{path}: cannot read the cross-validation description ({type(exc).__name__}); "
                             "restore it or retrain with volseg train --folds.") from None


def runs_of(folder: PathLike) -> List[Path]:
    """A parent's fold folders, or the run folder itself."""
    return fold_dirs(folder) if is_cv_parent(folder) else [Path(folder)]


def expand_runs(model: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Run folders of ``model``: a run folder, a cross-validation parent (its folds, all of
    which must have finished) or a sequence of either."""
    items = [model] if isinstance(model, (str, Path)) else list(model)
    runs: List[Path] = []
    for item in items:
        folder = Path(item)
        if not is_cv_parent(folder):
            runs.append(folder)
            continue
        folds = fold_dirs(folder)
        missing = [f.name for f in folds if not (f / "best.pt").is_file() and not (f / "last.pt").is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: folds {missing} have no checkpoint yet; train them (volseg train ... --folds "
                                    f"{len(folds)} --output {folder}) or pass the finished fold folders to --model.")
        runs += folds
    if not runs:
        raise FileNotFoundError("no run folder given.")
    return runs


def validation_pairs(folder: PathLike) -> List[Pair]:
    """(case, prediction, reference, scan) of every validation case of a run, or of all folds
    of a parent; a case without its prediction is an error naming the file."""
    pairs: List[Pair] = []
    for run in runs_of(folder):
        path = run / "dataset.json"
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            manifest, names = info["manifest"], list(info["validation"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunFolderError(f"{path}: cannot read the run's manifest and validation cases ({type(exc).__name__}).") from None
        if not names:
            raise RunFolderError(f"{run} has no validation cases (dataset.json), so there is nothing to cross-validate.")
        man = load_manifest(manifest)
        by_name = {c.name: c for c in tuple(man.training) + tuple(man.validation)}
        for name in names:
            pred = run / VAL_PREDICTIONS / f"{name}_seg.nii.gz"
            if name not in by_name or not pred.is_file():
                raise RunFolderError(f"{run}: validation case {name!r} has no "
                                     + (f"reference in {manifest}" if name not in by_name else f"prediction {pred} (training did not finish?)"))
            case = by_name[name]
            if case.label is None:
                raise RunFolderError(f"{run}: validation case {name!r} has no label in {manifest}.")
            pairs.append((name, pred, case.label, case.images[0]))
    return pairs


def read_postprocessing(folder: PathLike) -> Optional[List[int]]:
    """The label values of ``FOLDER/postprocessing.json``, or ``None`` when there is none."""
    path = Path(folder) / POSTPROCESSING
    if not path.is_file():
        return None
    try:
        return [int(v) for v in json.loads(path.read_text(encoding="utf-8"))["largest_component"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise RunFolderError(f"{path}: corrupt postprocessing rule ({type(exc).__name__}); delete it to infer without "
                             "postprocessing, or relearn it (retrain).") from None


def write_postprocessing(folder: PathLike, record: dict) -> Path:
    """``FOLDER/postprocessing.json`` (atomically); ``record["largest_component"]`` is what
    :func:`read_postprocessing` gives back."""
    return write_text(Path(folder) / POSTPROCESSING, json.dumps(record, indent=2) + "\n")
