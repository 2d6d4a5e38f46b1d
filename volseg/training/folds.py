"""Cross-validation: K folds of one manifest trained into one parent folder.

``volseg train MANIFEST --folds K --output PARENT`` (or :func:`train_folds`) writes::

    PARENT/cv.json              the parent's description: manifest, folds, fold folders, shared plan
    PARENT/config.yaml          the config every fold starts from (data.folds = K)
    PARENT/plan.json            the one preprocessing plan all folds use (so they can be ensembled)
    PARENT/planned_config.yaml, PARENT/fingerprint.json   without --config: the planner's output
    PARENT/fold_k/              an ordinary run folder; its validation set is fold k, and its
                                final validation predictions are in fold_k/val_predictions/
    PARENT/postprocessing.json  once every fold is done: the largest-component rule learned from
                                all folds' validation predictions (:mod:`volseg.evaluation.cv`)

The folds partition the manifest's training cases (:func:`~volseg.data.manifest.split_cases`
ranks them by a hash of their names, fold k holds ranks k, k + K, ...). As in nnU-Net, the plan
(median spacing, CT intensity statistics, patch) is computed once from all training cases, so
every fold preprocesses a scan identically and ``volseg infer --model PARENT`` can average
their probabilities. Folds may be trained one at a time (``--set data.fold=k``, e.g. on
separate machines): each call reuses the parent's stored config and plan.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..config import Config, ConfigError, from_dict, replace, to_dict
from ..data.io import write_text
from ..data.manifest import Manifest, ManifestError, load_manifest

log = logging.getLogger(__name__)

__all__ = ["CV_FILE", "train_folds", "fold_dirs", "expand_runs", "is_cv_parent"]

CV_FILE = "cv.json"

PathLike = Union[str, Path]


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
        from .run_folder import RunFolderError

        raise RunFolderError(f"{path}: cannot read the cross-validation description ({type(exc).__name__}); "
                             "restore it or retrain with volseg train --folds.") from None


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


def train_folds(manifest: PathLike, cfg: Optional[Config], parent: PathLike, folds: int, only: Optional[int] = None,
                resume: bool = False, device: str = "auto", progress: bool = False, overrides: Sequence[str] = ()) -> Path:
    """Train ``folds`` folds (or fold ``only``) of ``manifest`` into ``parent``; return it.

    ``cfg=None`` plans a config from the data (once, kept in the parent) with ``overrides`` on
    top. ``resume`` continues folds that have a ``last.pt`` (finished ones are skipped) and
    starts the others. When every fold is done, the postprocessing rule is learned from their
    validation predictions and the cross-validation Dice is logged."""
    from ..evaluation.cv import evaluate_cv, learn_postprocessing
    from .engine import train
    from .run_folder import detach_log_file

    parent = Path(parent)
    man = load_manifest(manifest)
    _check_manifest(man, folds)
    if only is not None and not 0 <= only < folds:
        raise ConfigError(f"data.fold={only} must be in 0..{folds - 1} for --folds {folds}.")
    parent.mkdir(parents=True, exist_ok=True)
    cfg = _parent_config(man, cfg, parent, folds, device, overrides)
    plan = _parent_plan(man, cfg, parent)
    write_text(parent / CV_FILE, json.dumps({"manifest": str(man.path.resolve()), "folds": folds,
                                              "runs": [f"fold_{k}" for k in range(folds)], "plan": "plan.json"}, indent=2))
    for k in ([only] if only is not None else range(folds)):
        run = parent / f"fold_{k}"
        log.info("fold %d/%d -> %s", k, folds, run)
        try:
            train(manifest, replace(cfg, data={"fold": k}), run, resume=resume and (run / "last.pt").is_file(), device=device,
                  progress=progress, plan=plan)
        finally:
            detach_log_file(run / "train.log")
    done = [f for f in fold_dirs(parent) if (f / "val_predictions").is_dir()]
    if len(done) == folds:
        learn_postprocessing(parent)
        summary = evaluate_cv(parent, parent / "cv_eval").summary
        log.info("cross-validation Dice (%d folds): %s", folds,
                 ", ".join(f"{name} {s['dice']['mean']:.3f}" for name, s in summary.get("classes", {}).items()))
    else:
        log.info("%d of %d folds done; postprocessing is learned once all are", len(done), folds)
    return parent


def _check_manifest(man: Manifest, folds: int) -> None:
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds.")
    if man.validation:
        raise ManifestError(f"manifest {man.path} has an explicit 'validation' list ({len(man.validation)} cases), which would be "
                            "every fold's validation set; remove it to cross-validate, or train without --folds.")
    if len(man.training) < folds:
        raise ManifestError(f"manifest {man.path}: {len(man.training)} training cases cannot make {folds} folds.")


def _parent_config(man: Manifest, cfg: Optional[Config], parent: Path, folds: int, device: str, overrides: Sequence[str]) -> Config:
    """The config every fold starts from: the parent's stored one when it exists (a later
    fold, or --resume), which the given config or overrides may not contradict; else ``cfg``
    or the planner's (with ``overrides``), stored."""
    import yaml

    from ..config import apply_overrides

    stored_path = parent / "config.yaml"
    if stored_path.is_file():
        stored = from_dict(yaml.safe_load(stored_path.read_text(encoding="utf-8")))
        if stored.data.folds != folds:
            raise ConfigError(f"{stored_path}: this cross-validation has data.folds={stored.data.folds}, not --folds {folds}.")
        given = cfg if cfg is not None else from_dict(apply_overrides(to_dict(stored), overrides))
        if to_dict(replace(given, data={"folds": folds, "fold": 0})) != to_dict(stored):
            raise ConfigError(f"{stored_path} holds the config of this cross-validation, and the given config or --set differs "
                              "from it; give every fold the same --config/--set, or another --output.")
        return stored
    if cfg is None:
        from .engine import _planned

        cfg = _planned(man, parent, device, overrides)
    cfg = replace(cfg, data={"folds": folds, "fold": 0})
    write_text(stored_path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return cfg


def _parent_plan(man: Manifest, cfg: Config, parent: Path):
    """One plan from all training cases (stored in the parent), so the folds can be ensembled."""
    from ..data.manifest import validate_cases
    from ..data.preprocess import make_plan
    from .run_folder import read_plan

    if (parent / "plan.json").is_file():
        return read_plan(parent)
    validate_cases(man, man.training, min_cases=cfg.data.min_cases)
    log.info("planning once for all folds from %d training cases", len(man.training))
    plan = make_plan(man, man.training, cfg, seed=cfg.train.seed)
    write_text(parent / "plan.json", plan.to_json())
    return plan
