"""Memory of one training step, measured with a dry pass, and the budget it must fit."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

from ..config import ConfigError, ModelConfig
from ..nets import build_network

__all__ = ["measure_step_memory", "memory_budget", "DEFAULT_CPU_MEMORY_GB", "GPU_MEMORY_MARGIN"]


#: CPU planning budget when --memory is not given: a CPU step on a 2 GB network already takes
#: seconds, so bigger patches buy little there
DEFAULT_CPU_MEMORY_GB = 2.0


GPU_MEMORY_MARGIN = 0.85  # of the GPU's free memory: cuDNN workspaces and fragmentation need the rest


def memory_budget(memory_gb: Optional[float], device: str) -> Tuple[float, str]:
    """(bytes, comment): --memory wins; else the GPU's free memory (cuda) or the CPU default."""
    if memory_gb is not None:
        if not memory_gb > 0:
            raise ConfigError(f"--memory={memory_gb!r} must be > 0 (GB).")
        return memory_gb * 2**30, f"{memory_gb:g} GB (--memory)"
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return free * GPU_MEMORY_MARGIN, f"{GPU_MEMORY_MARGIN:.0%} of the GPU's {free / 2**30:.1f} GB free ({total / 2**30:.0f} GB total)"
    return DEFAULT_CPU_MEMORY_GB * 2**30, f"{DEFAULT_CPU_MEMORY_GB:g} GB, the CPU default (--memory GB to change)"


def measure_step_memory(model: ModelConfig, in_channels: int, out_channels: int, patch: Sequence[int], batch: int, device: str = "cpu") -> float:
    """Bytes one training step of ``model`` on ``(batch, in_channels, *patch)`` needs, measured
    with a dry forward/backward pass. ``cuda``: the real pass (AMP, as training) and its peak
    allocated memory, ``inf`` when it runs out. ``cpu``: the same pass on the ``meta`` device
    (shapes only, no compute, about 0.1 s): the tensors autograd saves for backward plus weights,
    gradients and two AdamW moments, plus twice the largest saved tensor for backward's
    temporaries."""
    import torch

    if device == "cuda":
        return _measure_cuda(model, in_channels, out_channels, patch, batch)
    saved: Dict[int, int] = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()  # id: a tensor saved by two layers counts once
        return t

    with torch.device("meta"):
        net = build_network(model, in_channels, out_channels)
        x = torch.zeros(batch, in_channels, *patch)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
        sum(o.float().mean() for o in (out if isinstance(out, list) else [out])).backward()
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    return float(sum(saved.values()) + 2 * max(saved.values()) + 4 * params + x.numel() * x.element_size())


def _measure_cuda(model: ModelConfig, in_channels: int, out_channels: int, patch: Sequence[int], batch: int) -> float:
    import torch

    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    net: Any = None
    opt: Any = None
    x: Any = None
    out: Any = None
    loss: Any = None
    try:
        net = build_network(model, in_channels, out_channels).cuda()
        opt = torch.optim.AdamW(net.parameters())
        x = torch.zeros(batch, in_channels, *patch, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            out = net(x)
            loss = sum(o.float().mean() for o in (out if isinstance(out, list) else [out]))
        loss.backward()
        opt.step()
        return float(torch.cuda.max_memory_allocated() - base)
    except torch.cuda.OutOfMemoryError:
        return math.inf
    finally:
        net = opt = x = out = loss = None  # noqa: F841  free before the next candidate
        torch.cuda.empty_cache()

