"""The run folder: its files, its lock, and safe loading of what it holds.

Everything read back from a run folder goes through here, so a damaged or hostile folder gives
one line naming the file and what to do (:class:`RunFolderError`, which the CLI reports with
exit status 2), and no checkpoint can run code: ``torch.load(..., weights_only=True)`` only
rebuilds tensors, numbers, strings and containers, so RNG states are stored as tensors/lists.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from .. import versions
from ..config import Config, ConfigError, from_dict, to_dict
from ..data.io import write_text
from ..data.manifest import Case, Manifest, ManifestError
from ..data.preprocess import Plan

log = logging.getLogger(__name__)

__all__ = [
    "RunFolderError",
    "RunLockedError",
    "RunLock",
    "load_checkpoint",
    "read_config",
    "read_plan",
    "write_run_files",
    "stored_split",
    "rng_state",
    "set_rng_state",
    "checkpoint_path",
    "truncate_csv",
    "attach_log_file",
    "detach_log_file",
]


class RunFolderError(ConfigError):
    """A file of a run folder is corrupt, unsafe or inconsistent; the message names it."""


class RunLockedError(FileExistsError):
    """Another live process holds the run folder's lock; the message names it."""


# ---------------------------------------------------------------------------------------------
# reading


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


def read_plan(run: Path) -> Plan:
    path = run / "plan.json"
    try:
        return Plan.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: corrupt preprocessing plan ({type(exc).__name__}: {str(exc)[:120]}); "
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


# ---------------------------------------------------------------------------------------------
# writing


def write_run_files(run: Path, cfg: Config, plan: Plan, manifest: Manifest, split: Sequence[Sequence[Case]]) -> None:
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


def rng_state(sampler_generator) -> Dict[str, Any]:
    """torch, numpy, python and sampler RNG states as tensors and lists (loadable with
    ``weights_only=True``)."""
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [str(name), torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [int(version), list(internal), gauss_next],
        "sampler": sampler_generator.get_state(),
    }


def set_rng_state(state: Dict[str, Any], sampler_generator) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    sampler_generator.set_state(state["sampler"])


def truncate_csv(path: Path, epoch: int) -> None:
    """Drop rows written after the checkpoint being resumed (a kill between the two writes)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = [lines[0]] + [ln for ln in lines[1:] if ln and int(ln.split(",")[0]) <= epoch]
    write_text(path, "\n".join(keep) + "\n")


def _log_handlers(path: Path) -> list:
    root = logging.getLogger("volseg")
    return [h for h in root.handlers if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve()]


def attach_log_file(path: Path) -> None:
    root = logging.getLogger("volseg")
    if _log_handlers(path):
        return
    h = logging.FileHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)


def detach_log_file(path: Path) -> None:
    """Stop writing to ``path`` (attached by :func:`attach_log_file`): e.g. after one fold of a
    cross-validation, so the next fold's lines go to its own log only."""
    for h in _log_handlers(path):
        logging.getLogger("volseg").removeHandler(h)
        h.close()


# ---------------------------------------------------------------------------------------------
# lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive ``fcntl.flock`` on ``RUN/.lock`` holding ``{"pid", "host", "started"}``.

    The kernel drops a flock when its process dies, so a lock file left by a killed run is free
    and is taken over (with a warning naming the dead holder); a live holder is refused with
    :class:`RunLockedError`. Linux/macOS only (fcntl)."""

    def __init__(self, run: Path):
        self.path = Path(run) / ".lock"
        self._fd: Optional[int] = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            h = self._holder()
            raise RunLockedError(
                f"{self.path.parent} is in use by another volseg train (pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
                f"started {h.get('started', '?')}); wait for it to finish or choose another --output."
            ) from None
        stale = self._holder()
        if stale.get("pid"):
            alive = stale.get("host") == socket.gethostname() and _pid_alive(int(stale["pid"]))
            log.warning("%s: taking over a stale lock left by pid %s on host %s (started %s%s)", self.path, stale.get("pid"),
                        stale.get("host"), stale.get("started"), "" if not alive else "; that pid now belongs to another process")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)  # an empty lock file is not stale
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
