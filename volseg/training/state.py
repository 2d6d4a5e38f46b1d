"""What a checkpoint holds beyond weights: the random streams (as tensors and lists, so
``weights_only=True`` loads them) and the metrics rows a resume must drop."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np

from ..data.io import write_text

__all__ = ["rng_state", "set_rng_state", "truncate_csv"]


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

