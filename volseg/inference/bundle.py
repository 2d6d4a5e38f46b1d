"""Trained networks as one immutable bundle: loaded from run folders (one run, a cross-validation
parent, or several folders as an ensemble) with their plan, trained config and postprocessing."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from ..config import Config, InferConfig
from ..data.plan import PreprocessingPlan
from ..nets import build_network
from ..runfolder import RunFolderError, checkpoint_path, expand_runs, load_checkpoint, read_config, read_plan, read_postprocessing

log = logging.getLogger(__name__)

__all__ = ["ModelBundle", "load_bundle"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class ModelBundle:
    """What a :class:`~volseg.inference.Predictor` runs: ``networks`` (one, or an ensemble
    trained on the same ``plan``: each maps ``(B, C, *roi)`` to logits ``(B, K, *roi)``), the
    (first) run's resolved config ``trained`` (None: not known; its ``infer`` section, with the
    postprocessing chosen by the loader, is the predictor's default), ``owned``: the networks
    belong to this bundle alone (loaded from files), so the predictor may change their memory
    layout (not so for the network training shares with its validation), and ``info`` (run
    folders, checkpoints, epochs, the postprocessing choice, warnings), kept in sidecars."""

    networks: Tuple[Any, ...]
    plan: PreprocessingPlan
    trained: Optional[Config] = None
    owned: bool = False
    info: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, networks: Any, plan: PreprocessingPlan, trained: Optional[Config] = None) -> ModelBundle:
        """A bundle of a network (or a sequence of networks) in memory."""
        nets = tuple(networks) if isinstance(networks, (list, tuple)) else (networks,)
        if not nets:
            raise ValueError("a model bundle needs at least one network.")
        return cls(nets, plan, trained)

    @property
    def infer(self) -> InferConfig:
        """The inference settings the run was trained with (defaults when not known)."""
        return self.trained.infer if self.trained is not None else InferConfig()


def load_bundle(run_dir: Union[PathLike, Sequence[PathLike]], checkpoint: str = "best", overrides: Optional[dict] = None) -> ModelBundle:
    """Networks, plan and settings from run folders (nothing else needed).

    ``run_dir``: a run folder, a cross-validation parent written by ``volseg train --folds``
    (its folds form an ensemble), or a sequence of such folders (all their networks form one
    ensemble). An ensemble's members must share the preprocessing plan (spacing, orientation,
    normalisation, labels, patch), else a ``RunFolderError`` names the differences; inference
    settings are the first member's. ``overrides``: keys of the ``infer`` section, e.g.
    ``{"overlap": 0.25, "tta": True}``. ``infer.largest_component``: an explicit override wins,
    then a non-empty value in the (first) run's config, then the learned ``postprocessing.json``
    of a single run or a parent; the choice is logged and kept in ``info["postprocessing"]``.
    A missing ``best.pt`` falls back to ``last.pt`` with a logged warning, recorded in
    ``info["warnings"]``. Checkpoints are loaded with ``weights_only=True``: one that would run
    code, or a corrupt config, plan or checkpoint, is a ``RunFolderError`` naming the file."""
    runs = expand_runs(run_dir)
    members = [_load_member(run, checkpoint, overrides) for run in runs]
    plan = _shared_plan(runs, [m[1] for m in members])
    infer, chosen = _postprocessing(run_dir, members[0][0].infer, overrides)
    infos = [m[3] for m in members]
    info: Dict[str, Any] = dict(infos[0]) if len(infos) == 1 else {"ensemble": infos}
    notes = [n for i in infos for n in i.pop("warnings", [])]
    if notes:
        info["warnings"] = notes
    info["postprocessing"] = chosen
    if len(runs) > 1:
        log.info("ensemble of %d models: %s", len(runs), ", ".join(str(r) for r in runs))
    trained = dataclasses.replace(members[0][0], infer=infer)
    return ModelBundle(tuple(m[2] for m in members), plan, trained, owned=True, info=info)


def _load_member(run: Path, checkpoint: str, overrides: Optional[dict]):
    """(config, plan, network with weights, info) of one run folder."""
    ckpt, notes = checkpoint_path(run, checkpoint)
    missing = [n for n in ("config.yaml", "plan.json") if not (run / n).is_file()]
    if not ckpt.is_file():
        missing.append(f"{checkpoint}.pt" + (" (and last.pt)" if checkpoint == "best" else ""))
    if missing:
        raise FileNotFoundError(f"{run} is not a complete volseg run folder: missing {missing}.")
    cfg: Config = read_config(run, {"infer": overrides} if overrides else None)
    plan = read_plan(run)
    state = load_checkpoint(ckpt)
    model = build_network(cfg.model, len(plan.channels), plan.out_channels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise RunFolderError(f"{ckpt}: weights do not match {run / 'config.yaml'} ({str(exc).splitlines()[0][:160]}); "
                             "restore the run folder's files together or retrain.") from None
    info = {"run": str(run.resolve()), "checkpoint": ckpt.name, "epoch": state.get("epoch")}
    if notes:
        info["warnings"] = notes
    return cfg, plan, model, info


def _shared_plan(runs: Sequence[Path], plans: Sequence[PreprocessingPlan]) -> PreprocessingPlan:
    """The plan all ``runs`` share; an ensemble whose members would preprocess a scan
    differently (or predict other classes) cannot average their probabilities."""
    first = asdict(plans[0])
    for run, plan in zip(runs[1:], plans[1:]):
        other = asdict(plan)
        diff = {k: (first[k], other[k]) for k in first if first[k] != other[k]}
        if diff:
            text = "; ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise RunFolderError(f"cannot ensemble {runs[0]} and {run}: their plan.json files differ ({text}); ensemble members "
                                 "must share spacing, orientation, normalisation, labels and patch (train them with "
                                 "volseg train --folds, which plans once for all folds).")
    return plans[0]


def _postprocessing(run_dir, infer: InferConfig, overrides: Optional[dict]) -> Tuple[InferConfig, dict]:
    """The ``infer`` settings with the ``largest_component`` labels to use, and why. An explicit
    choice (an override, or a non-empty config value) wins over the rule learned from the
    cross-validation predictions, because the person asked for it; a learned rule belongs to
    the folder it was learned for (a run or a parent), so several folders given by hand get
    none."""
    if overrides and "largest_component" in overrides:
        chosen = {"largest_component": list(infer.largest_component), "source": "override"}
    elif infer.largest_component:
        chosen = {"largest_component": list(infer.largest_component), "source": "config infer.largest_component"}
    else:
        single = not isinstance(run_dir, (list, tuple)) or len(run_dir) == 1
        folder = Path(run_dir if not isinstance(run_dir, (list, tuple)) else run_dir[0])
        learned = read_postprocessing(folder) if single else None
        if learned is None:
            chosen = {"largest_component": [], "source": "none learned" if single else "none (several folders given)"}
        else:
            chosen = {"largest_component": list(learned), "source": str(folder / "postprocessing.json")}
            infer = dataclasses.replace(infer, largest_component=tuple(learned))
    log.info("postprocessing: largest component of labels %s (%s)", chosen["largest_component"], chosen["source"])
    return infer, chosen

