"""Cross-validation: K folds of one manifest trained into one parent folder.

``volseg train MANIFEST --folds K --output PARENT`` (or :func:`train_folds`) writes::

    PARENT/cv.json              the parent's description: manifest, folds, fold folders, shared plan
    PARENT/config.yaml          the config every fold starts from (data.folds = K)
    PARENT/plan.json            the one preprocessing plan all folds use (so they can be ensembled)
    PARENT/planned_config.yaml, PARENT/fingerprint.json   without --config: the planner's output
    PARENT/fold_k/              an ordinary run folder; its validation set is fold k, and its
                                final validation predictions are in fold_k/val_predictions/
    PARENT/postprocessing.json  once every fold is done: the largest-component rule learned from
                                all folds' validation predictions (:mod:`volseg.postprocessing`)

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
from typing import Optional, Sequence, Tuple, Union

import yaml

from ..config import Config, ConfigError, apply_overrides, from_dict, load_config, replace, to_dict
from ..data.io import write_text
from ..data.manifest import Manifest, ManifestError, check_case_count, load_manifest, validate_cases
from ..data.plan import PreprocessingPlan
from ..evaluation.cv import evaluate_cv
from ..planning import fingerprint, make_plan, plan_from_fingerprint
from ..postprocessing import learn_postprocessing
from ..runfolder import CV_FILE, fold_dirs, read_plan
from ..runtime import resolve_device
from ..training import train

log = logging.getLogger(__name__)

__all__ = ["train_folds"]

PathLike = Union[str, Path]


def train_folds(manifest: PathLike, cfg: Optional[Config], parent: PathLike, folds: int, only: Optional[int] = None,
                resume: bool = False, device: str = "auto", progress: bool = False, overrides: Sequence[str] = (),
                pretrained: Optional[PathLike] = None) -> Path:
    """Train ``folds`` folds (or fold ``only``) of ``manifest`` into ``parent``; return it.

    ``cfg=None`` plans a config from the data (once, kept in the parent) with ``overrides`` on
    top. ``resume`` continues folds that have a ``last.pt`` (finished ones are skipped) and
    starts the others. When every fold is done, the postprocessing rule is learned from their
    validation predictions and the cross-validation Dice is logged."""
    parent = Path(parent)
    man = load_manifest(manifest)
    _check_manifest(man, folds)
    if only is not None and not 0 <= only < folds:
        raise ConfigError(f"data.fold={only} must be in 0..{folds - 1} for --folds {folds}.")
    parent.mkdir(parents=True, exist_ok=True)
    cfg, plan = _parent_config_and_plan(man, cfg, parent, folds, device, overrides)
    write_text(parent / CV_FILE, json.dumps({"manifest": str(man.path.resolve()), "folds": folds,
                                              "runs": [f"fold_{k}" for k in range(folds)], "plan": "plan.json"}, indent=2))
    for k in ([only] if only is not None else range(folds)):
        run = parent / f"fold_{k}"
        log.info("fold %d/%d -> %s", k, folds, run)
        fold_resume = resume and (run / "last.pt").is_file()
        train(manifest, replace(cfg, data={"fold": k}), run, resume=fold_resume, pretrained=None if fold_resume else pretrained, device=device,
              progress=progress, plan=plan)
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


def _parent_config_and_plan(man: Manifest, cfg: Optional[Config], parent: Path, folds: int, device: str,
                            overrides: Sequence[str]) -> Tuple[Config, PreprocessingPlan]:
    """The config every fold starts from and the one plan all folds use (so they can be
    ensembled), both stored in the parent: read back when they exist (a later fold, or
    --resume; the given config or overrides may not contradict the stored config), else made
    from one fingerprint pass over all training cases (the config too when ``cfg`` is None)."""
    stored_path = parent / "config.yaml"
    if stored_path.is_file():
        stored = from_dict(yaml.safe_load(stored_path.read_text(encoding="utf-8")))
        if stored.data.folds != folds:
            raise ConfigError(f"{stored_path}: this cross-validation has data.folds={stored.data.folds}, not --folds {folds}.")
        given = cfg if cfg is not None else from_dict(apply_overrides(to_dict(stored), overrides))
        if to_dict(replace(given, data={"folds": folds, "fold": 0})) != to_dict(stored):
            raise ConfigError(f"{stored_path} holds the config of this cross-validation, and the given config or --set differs "
                              "from it; give every fold the same --config/--set, or another --output.")
        cfg = stored
    fp = None
    if not (parent / "plan.json").is_file() or not stored_path.is_file():
        base = cfg if cfg is not None else load_config(None, overrides)
        check_case_count(man, base.data.min_cases)
        validate_cases(man, man.training, min_cases=base.data.min_cases)
        log.info("fingerprinting all %d training cases once for all folds", len(man.training))
        fp = fingerprint(man, man.training, orientation=base.data.orientation, normalization=base.data.normalization, seed=base.train.seed)
    if cfg is None:
        cfg = plan_from_fingerprint(fp, man, parent / "planned_config.yaml", device=resolve_device(device).type,
                                    fingerprint_path=parent / "fingerprint.json", overrides=overrides)
    if not stored_path.is_file():
        cfg = replace(cfg, data={"folds": folds, "fold": 0})
        write_text(stored_path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if (parent / "plan.json").is_file():
        return cfg, read_plan(parent)
    plan = make_plan(fp, man, cfg)
    write_text(parent / "plan.json", plan.to_json())
    return cfg, plan
