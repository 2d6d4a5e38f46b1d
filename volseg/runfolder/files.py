"""The run folder: its files, its lock, and safe loading of what it holds.

Everything read back from a run folder goes through here, so a damaged or hostile folder gives
one line naming the file and what to do (:class:`RunFolderError`, which the CLI reports with
exit status 2), and no checkpoint can run code: ``torch.load(..., weights_only=True)`` only
rebuilds tensors, numbers, strings and containers, so RNG states are stored as tensors/lists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..config import Config, ConfigError, from_dict, to_dict
from ..data.io import write_text
from ..data.manifest import Case, Manifest, ManifestError
from ..data.plan import PreprocessingPlan
from ..version import versions
from .errors import RunFolderError

log = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "checkpoint_path", "read_config", "read_plan", "stored_split", "write_run_files"]


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: a checkpoint whose pickle would build anything
    but tensors and plain containers (i.e. could run code) is refused, as is a corrupt file."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        reason = next((ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln), "").replace("WeightsUnpickler error:", "").strip()
        if "Unsupported global" in text or "Unsupported class" in text:
            raise RunFolderError(
                f"{path}: refused to load: it holds objects other than tensors and plain data, which could run code "
                f"({reason.split('. Please')[0][:160]}). Only load checkpoints you trust; retrain or restore the file from a backup."
            ) from None
        raise _corrupt(path, reason or "not a torch checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise _corrupt(path, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from None
    if not isinstance(state, dict) or "model" not in state:
        raise RunFolderError(f"{path}: not a volseg checkpoint (no 'model' entry); retrain or restore the file.")
    return state


def _corrupt(path: Path, reason: str) -> RunFolderError:
    return RunFolderError(f"{path}: corrupt or truncated checkpoint ({reason[:160]}); restore it from a backup, "
                          "use the run's other checkpoint (best.pt/last.pt), or retrain.")


def read_config(run: Path, overrides: Optional[dict] = None) -> Config:
    """The run's resolved ``config.yaml``; ``overrides`` maps section -> {key: value}."""
    path = run / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: corrupt config ({type(exc).__name__}); restore it from a backup or retrain.") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: corrupt config (not a mapping of sections); restore it from a backup or retrain.")
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise RunFolderError(f"{path}: {exc}") from None


def read_plan(run: Path) -> PreprocessingPlan:
    path = run / "plan.json"
    try:
        return PreprocessingPlan.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: corrupt preprocessing plan ({type(exc).__name__}: {str(exc)[:200]}); "
                             "restore it from a backup or retrain.") from None


def stored_split(run: Path, manifest: Manifest) -> Tuple[Tuple[Case, ...], Tuple[Case, ...]]:
    """The (train, validation) cases recorded in ``RUN/dataset.json``, looked up by name in
    ``manifest``; cases the manifest no longer has are an error that names them."""
    path = run / "dataset.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        names = (list(stored["training"]), list(stored["validation"]))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise RunFolderError(f"{path}: cannot read the stored train/validation split ({type(exc).__name__}); "
                             "restore it from a backup or start a new run.") from None
    by_name = {c.name: c for c in tuple(manifest.training) + tuple(manifest.validation)}
    missing = [n for n in names[0] + names[1] if n not in by_name]
    if missing:
        raise ManifestError(
            f"--resume: manifest {manifest.path} no longer has {len(missing)} case(s) of the run's stored split "
            f"({path}): {missing[:10]}{' ...' if len(missing) > 10 else ''}; restore them or start a new run."
        )
    return tuple(by_name[n] for n in names[0]), tuple(by_name[n] for n in names[1])


def write_run_files(run: Path, cfg: Config, plan: PreprocessingPlan, manifest: Manifest, split: Sequence[Sequence[Case]]) -> None:
    """config.yaml (resolved), plan.json, versions.json and dataset.json (labels, channels, split)."""
    write_text(run / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_text(run / "plan.json", plan.to_json())
    write_text(run / "versions.json", json.dumps(versions(), indent=2))
    dataset = {
        "manifest": str(manifest.path.resolve()),
        "name": manifest.name,
        "modality": dict(enumerate(manifest.modalities)),
        "labels": manifest.labels,
        "training": [c.name for c in split[0]],
        "validation": [c.name for c in split[1]],
    }
    write_text(run / "dataset.json", json.dumps(dataset, indent=2))


def checkpoint_path(run: Path, which: str = "best") -> Tuple[Path, List[str]]:
    """``RUN/<which>.pt``; a missing ``best.pt`` falls back to ``last.pt`` with a warning.
    Returns the path and the warnings given (recorded by callers)."""
    path = run / f"{which}.pt"
    notes: List[str] = []
    if not path.is_file() and which == "best" and (run / "last.pt").is_file():
        notes.append(f"{path} does not exist (no validation ran, or it was removed); using last.pt instead")
        log.warning(notes[-1])
        path = run / "last.pt"
    return path, notes

