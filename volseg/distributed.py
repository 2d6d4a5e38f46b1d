"""torch.distributed glue for runs launched by ``torchrun``.

volseg never spawns processes itself: ``torchrun`` (or SLURM's ``srun`` with torchrun) starts one
process per GPU or per CPU worker and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`init` joins that group. Without those variables everything here is a
no-op, so single-process code paths stay exactly as they were.
"""

from __future__ import annotations

import logging
import os
from typing import Tuple

log = logging.getLogger(__name__)

__all__ = ["init", "shutdown", "rank", "world_size", "is_main", "barrier", "launched"]


def launched() -> bool:
    """True inside a ``torchrun`` job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str = "cpu") -> Tuple[int, int]:
    """Join the process group torchrun described in the environment (no-op without one).

    Backend: ``nccl`` when the ranks use CUDA, ``gloo`` on CPU. On CUDA each process takes the
    GPU ``LOCAL_RANK`` (one process per GPU). Returns ``(rank, world_size)``.
    """
    if not launched():
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        log.debug("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def shutdown() -> None:
    d = _dist()
    if d:
        d.destroy_process_group()


# -- appended for batch inference (volseg.inference.batch) ----------------------------------------


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable object) on every rank; ``obj`` itself without a group."""
    d = _dist()
    if not d:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]
