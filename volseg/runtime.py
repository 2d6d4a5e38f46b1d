"""Where and in which precision tensors run: the device and mixed-precision choice that
training, inference and the CLI share."""

from __future__ import annotations

from .config import check_choice

__all__ = ["resolve_device", "amp_dtype"]


def resolve_device(device: str = "auto"):
    """``auto`` (CUDA when available, else the CPU), ``cpu`` or ``cuda`` as a ``torch.device``."""
    import torch

    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu or auto.")
    return torch.device(device)


def amp_dtype(device):
    """The autocast dtype of mixed precision on ``device``, or None for float32.

    CUDA: float16 (as nnU-Net and MONAI's AMP recipes). CPU: bfloat16 where the processor has
    native bf16 arithmetic (AMX or AVX512-BF16: oneDNN's bf16 convolutions are then about 2x as
    fast as float32 for the U-Nets here, benchmarks/README.md), else None: emulated bf16 would
    be slower than float32. Training and inference both take their precision from here."""
    import torch

    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        cpu = torch.cpu
        native = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        if any(f is not None and f() for f in native):  # private probes: absent (False) on some torch builds
            return torch.bfloat16
    return None
