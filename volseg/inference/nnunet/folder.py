"""An nnU-Net v2 trained model folder, read without nnU-Net: its plans, dataset, folds and
checkpoints (``weights_only=True``), checked so that every bad folder ends in one line.

A folder ``nnUNet_results/DatasetNNN_Name/TRAINER__PLANS__CONFIGURATION/`` holds
``plans.json``, ``dataset.json`` (and ``dataset_fingerprint.json``) and ``fold_K/`` folders with
``checkpoint_final.pth`` / ``checkpoint_best.pth``; it is recognised by those contents
(:func:`is_nnunet_folder`). Pickled files (``postprocessing.pkl``, the ``.pkl`` beside
predictions) are never read; the learned postprocessing comes from ``postprocessing.json``.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ...runfolder import RunFolderError

log = logging.getLogger(__name__)

__all__ = ["NnUNetModel", "is_nnunet_folder", "load_nnunet", "nnunet_channels", "CHECKPOINTS"]

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
SUPPORTED_CONFIGS = ("2d", "3d_fullres")
SUPPORTED_IO = ("SimpleITKIO",)
RESAMPLING = "resample_data_or_seg_to_shape"


def is_nnunet_folder(path: Union[str, Path]) -> bool:
    """A folder with no volseg ``config.yaml`` but nnU-Net's ``plans.json``, ``dataset.json``
    or ``fold_K/checkpoint_*.pth`` (so that an incomplete one is told what it lacks)."""
    p = Path(path)
    if not p.is_dir() or (p / "config.yaml").exists():
        return False
    return (p / "plans.json").is_file() or (p / "dataset.json").is_file() or any(p.glob("fold_*/checkpoint_*.pth"))


def _json(path: Path) -> dict:
    if not path.is_file():
        raise RunFolderError(f"{path.parent} is not a complete nnU-Net model folder: {path.name} is missing.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: not valid JSON ({str(exc)[:120]}).") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object.")
    return data


def nnunet_channels(path: Union[str, Path]) -> int:
    """The input channel count of the model folder ``path`` (its ``dataset.json``)."""
    ds = _json(Path(path) / "dataset.json")
    names = ds.get("channel_names", ds.get("modality"))
    if not isinstance(names, dict) or not names:
        raise RunFolderError(f"{Path(path) / 'dataset.json'}: no 'channel_names'.")
    return len(names)


@dataclass(frozen=True)
class NnUNetModel:
    """What the predictor needs of a model folder, checked."""

    folder: Path
    configuration_name: str
    config: Dict[str, Any]  # the plans configuration, inheritance resolved
    plans: Dict[str, Any]
    dataset: Dict[str, Any]
    folds: Tuple[str, ...]
    weights: Tuple[Dict[str, Any], ...]  # network state dicts, one per fold
    mirror_axes: Optional[Tuple[int, ...]]
    trainer: str
    postprocessing: List[Tuple[str, Any]] = field(default_factory=list)  # (function name, labels_or_regions)

    @property
    def labels(self) -> Dict[str, Any]:
        return dict(self.dataset["labels"])

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in self.labels.values())

    @property
    def channels(self) -> List[str]:
        names = self.dataset.get("channel_names", self.dataset.get("modality"))
        return [names[k] for k in sorted(names, key=int)]


def _resolve(plans: dict, name: str, path: Path) -> dict:
    configs = plans.get("configurations", {})
    if name not in configs:
        raise RunFolderError(f"{path}: configuration {name!r} is not in plans.json; it has {sorted(configs)}.")
    seen: List[str] = []
    cfg: dict = {}
    chain = []
    while True:
        if name in seen:
            raise RunFolderError(f"{path}: plans.json configurations inherit in a circle: {seen + [name]}.")
        seen.append(name)
        chain.append(configs[name])
        parent = configs[name].get("inherits_from")
        if parent is None:
            break
        if parent not in configs:
            raise RunFolderError(f"{path}: configuration {name!r} inherits from {parent!r}, which plans.json does not have.")
        name = parent
    for part in reversed(chain):
        cfg.update(part)
    return cfg


def _safe_load(path: Path) -> dict:
    """``torch.load(weights_only=True)``, allowing only the plain numpy scalar types nnU-Net's
    training log stores; anything else (code, custom classes) is refused."""
    import numpy as np
    import torch

    core = getattr(np, "_core", None) or np.core
    safe: List[Any] = [np.dtype, core.multiarray.scalar] + [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    try:
        torch.serialization.add_safe_globals(safe)  # torch >= 2.4; the list only ever holds these plain types
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), str(exc).splitlines()[0] if str(exc) else "")
        raise RunFolderError(f"{path}: refused to load: it holds objects other than tensors and plain data, which could run code "
                             f"({reason[:160]}). Only load checkpoints you trust.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RunFolderError(f"{path}: corrupt or truncated checkpoint ({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]}).") from None
    if not isinstance(state, dict) or "network_weights" not in state:
        raise RunFolderError(f"{path}: not an nnU-Net checkpoint (no 'network_weights' entry).")
    return state


def _folds(folder: Path, folds: Optional[Sequence[Union[int, str]]], ckpt_name: str) -> List[str]:
    present = sorted((p.name[5:] for p in folder.glob("fold_*") if p.is_dir() and (p / ckpt_name).is_file()),
                     key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    if folds is None:
        wanted = [f for f in present if f != "all"] or present
        if not wanted:
            raise RunFolderError(f"{folder}: no fold_K/{ckpt_name} found (folders: {sorted(p.name for p in folder.iterdir() if p.is_dir())}).")
        return wanted
    wanted = [str(f) for f in folds]
    missing = [f for f in wanted if f not in present]
    if missing:
        raise RunFolderError(f"{folder}: fold(s) {missing} have no {ckpt_name}; folds with one: {present}.")
    return wanted


def _postprocessing(folder: Path, folds: Sequence[str]) -> List[Tuple[str, Any]]:
    """The learned postprocessing from ``postprocessing.json`` (``crossval_results_folds_<folds>/``
    or the folder itself); only largest-component removal exists in nnU-Net v2."""
    candidates = [folder / f"crossval_results_folds_{'_'.join(folds)}" / "postprocessing.json", folder / "postprocessing.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if any(folder.rglob("postprocessing.pkl")):
            log.warning("%s: postprocessing.pkl found but no postprocessing.json; it is not unpickled, so no postprocessing is applied", folder)
        return []
    pp = _json(path)
    fns, kwargs = pp.get("postprocessing_fns", []), pp.get("postprocessing_kwargs", [])
    out = []
    for fn, kw in zip(fns, kwargs):
        if fn != "remove_all_but_largest_component_from_segmentation" or not isinstance(kw, dict) or "labels_or_regions" not in kw:
            raise RunFolderError(f"{path}: postprocessing {fn!r} is not supported; supported: remove_all_but_largest_component_from_segmentation.")
        out.append((fn, kw["labels_or_regions"]))
    log.info("nnU-Net postprocessing from %s: %s", path, out)
    return out


def load_nnunet(folder: Union[str, Path], folds: Optional[Sequence[Union[int, str]]] = None, checkpoint: str = "final") -> NnUNetModel:
    """Read and check an nnU-Net v2 model folder: ``folds`` (default: every ``fold_K`` with the
    checkpoint, as nnU-Net) and ``checkpoint`` (``final`` or ``best``). Raises
    :class:`~volseg.runfolder.RunFolderError` naming the problem for missing files, a
    configuration not supported yet (3d_lowres, the cascade), an unknown reader or resampling
    function, unsafe or mismatching checkpoints."""
    folder = Path(folder)
    if checkpoint not in CHECKPOINTS:
        raise RunFolderError(f"--checkpoint {checkpoint!r} is not an nnU-Net checkpoint; choose from {sorted(CHECKPOINTS)}.")
    plans, dataset = _json(folder / "plans.json"), _json(folder / "dataset.json")
    if "labels" not in dataset or "background" not in dataset["labels"]:
        raise RunFolderError(f"{folder / 'dataset.json'}: no 'labels' with a 'background' entry.")
    io = plans.get("image_reader_writer", "SimpleITKIO")
    if io not in SUPPORTED_IO:
        raise RunFolderError(f"{folder / 'plans.json'}: image_reader_writer {io!r} is not supported yet; supported: {list(SUPPORTED_IO)}.")
    ckpt_name = CHECKPOINTS[checkpoint]
    fold_names = _folds(folder, folds, ckpt_name)
    states = [_safe_load(folder / f"fold_{f}" / ckpt_name) for f in fold_names]
    first = states[0]
    init = first.get("init_args") or {}
    name = init.get("configuration") or folder.name.split("__")[-1]
    for f, st in zip(fold_names[1:], states[1:]):
        other = (st.get("init_args") or {}).get("configuration", name)
        if other != name:
            raise RunFolderError(f"{folder}: fold_{f} was trained as {other!r}, fold_{fold_names[0]} as {name!r}; an ensemble needs one configuration.")
    config = _resolve(plans, name, folder / "plans.json")
    if name not in SUPPORTED_CONFIGS or config.get("previous_stage"):
        raise RunFolderError(f"{folder}: configuration {name!r} is not supported yet (3d_lowres and the cascade come later); supported: {list(SUPPORTED_CONFIGS)}.")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key) != RESAMPLING:
            raise RunFolderError(f"{folder / 'plans.json'}: {key}={config.get(key)!r} is not supported; supported: {RESAMPLING!r}.")
    if "architecture" not in config:
        raise RunFolderError(f"{folder / 'plans.json'}: configuration {name!r} has no 'architecture' (plans from before nnU-Net 2.2); re-plan with nnU-Net >= 2.2.")
    axes = first.get("inference_allowed_mirroring_axes")
    return NnUNetModel(folder, name, config, plans, dataset, tuple(fold_names), tuple(s["network_weights"] for s in states),
                       tuple(int(a) for a in axes) if axes is not None else None, str(first.get("trainer_name", "")),
                       _postprocessing(folder, fold_names))
