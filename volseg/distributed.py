"""torch.distributed glue for runs launched by ``torchrun``.

volseg never spawns processes itself: ``torchrun`` (or SLURM's ``srun`` with torchrun) starts one
process per GPU or per CPU worker and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`init` joins that group. Without those variables everything here is a
no-op, so single-process code paths stay exactly as they were.

Training wraps the network in plain ``torch.nn.parallel.DistributedDataParallel`` (:func:`wrap`),
as MONAI's DDP tutorials do, rather than ``ignite.distributed``: the process group is already
joined here, and ``idist.auto_dataloader`` would swap volseg's per-rank sampler (with replacement,
over the rank's own cached shard of cases) for a ``DistributedSampler``. The collectives used
(:func:`on_main`, :func:`all_gather`, :func:`average`) are one call each; every one of them is a
plain return in a single process.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, List, Sequence, Tuple, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

__all__ = ["init", "local_cuda_device", "shutdown", "rank", "world_size", "is_main", "barrier", "launched", "local_world_size", "quiet_other_ranks",
           "shard", "unshard", "on_main", "all_gather", "average", "wrap"]


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
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            local_cuda_device()
        dist.init_process_group(backend=backend)
        log.debug("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_rank(), dist.get_world_size()


def local_cuda_device():
    """This process's GPU, ``cuda:LOCAL_RANK`` (one process per GPU), made the current device;
    a clear error when the machine has fewer GPUs than processes."""
    import torch

    local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= gpus:
        raise RuntimeError(f"torchrun process LOCAL_RANK={local} has no GPU of its own: {gpus} CUDA GPU(s) visible on this "
                           f"machine; start at most {gpus} processes per machine (--nproc_per_node) or use --device cpu.")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if _dist() else 1


def quiet_other_ranks() -> None:
    """Ranks other than 0 log warnings and errors only: rank 0 speaks for the job. (torchrun's
    ``--log-dir DIR --redirects 3`` keeps every rank's full output in its own file.)"""
    if not is_main():
        logging.getLogger("volseg").setLevel(logging.WARNING)


def shard(items: Sequence[T]) -> List[T]:
    """This rank's share of ``items``: every ``world_size``-th item from index ``rank`` (what
    ``monai.data.partition_dataset(shuffle=False, even_divisible=False)`` gives, but an empty
    share instead of an error when there are fewer items than ranks)."""
    d = _dist()
    return list(items) if d is None else list(items[d.get_rank()::d.get_world_size()])


def unshard(shares: Sequence[Sequence[T]]) -> List[T]:
    """Inverse of :func:`shard`: the per-rank lists (as :func:`all_gather` returns them) back in
    the original order."""
    out: List[Any] = [None] * sum(len(s) for s in shares)
    for r, share in enumerate(shares):
        out[r::len(shares)] = share
    return out


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result (pickled and
    broadcast). An exception raised on rank 0 is raised on every rank, so a user mistake stops
    the whole job with the same message instead of leaving the others waiting."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return fn(*args, **kwargs)
    box: List[Any] = [None]
    if d.get_rank() == 0:
        try:
            box[0] = (True, fn(*args, **kwargs))
        except Exception as exc:
            d.broadcast_object_list([(False, _picklable(exc))], src=0)
            raise
    d.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _picklable(exc: Exception) -> Exception:
    import pickle

    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}")


def all_gather(obj: T) -> List[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    d = _dist()
    if d is None:
        return [obj]
    out: List[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def average(value) -> float:
    """Mean over the ranks of a scalar tensor (on the rank's device), as a float."""
    d = _dist()
    if d is None:
        return float(value.item())
    total = value.detach().clone()
    d.all_reduce(total)
    return float(total.item()) / d.get_world_size()


def wrap(model):
    """``model`` in ``DistributedDataParallel`` when there are several ranks (gradients are
    averaged over the ranks in ``backward``), else ``model`` itself. On CUDA the rank's GPU is the
    current device :func:`init` chose. Checkpoints and validation use the unwrapped ``model``:
    its state_dict has no ``module.`` prefix, and predicting outside DDP needs no collective, so
    ranks may predict different numbers of windows."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return model
    import torch

    on_gpu = next(model.parameters()).device.type == "cuda"
    ids = [torch.cuda.current_device()] if on_gpu else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def shutdown() -> None:
    d = _dist()
    if d:
        d.destroy_process_group()
