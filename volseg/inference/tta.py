"""The network as the window engine sees it: a batch of windows -> class probabilities, averaged
over the ensemble's members and, with test-time augmentation, over mirrored copies."""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

from ..data.plan import PreprocessingPlan
from ..data.transforms import mirror_axes
from ..runtime import amp_dtype

__all__ = ["mirror_flips", "WindowNet"]


def mirror_flips(plan: PreprocessingPlan, enabled: bool) -> List[tuple]:
    """Mirroring TTA axes (tensor dims of a ``(B, C, *spatial)`` batch): every combination of
    the axes training mirrored (:func:`~volseg.data.transforms.mirror_axes`: not left-right for
    lateral labels), the identity first; just the identity when ``enabled`` is False."""
    if not enabled:
        return [()]
    axes = [2 + a for a in mirror_axes(plan)]
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _softmax_(x):
    """Softmax over the class axis of float32 logits ``x``, in place. ``torch.softmax`` returns a
    second (B, K, *roi) array beside its input, which is the peak of the window stage: with 14
    classes and 4 windows of 96^3, 198 MB more (see benchmarks/README.md)."""
    x -= x.amax(1, keepdim=True)
    x.exp_()
    x /= x.sum(1, keepdim=True)
    return x


class WindowNet:
    """``(B, C, *roi)`` windows -> ``(B, K, *roi)`` float32 probabilities (sigmoid for a binary
    or region plan, else softmax), averaged over ``models`` and the mirrors ``flips``. Each window is
    mirrored on its own, as nnU-Net does, so the rolling order holds; blending is linear, so
    averaging per window equals averaging each member's stitched probabilities, without a volume
    per member. In 2D slice mode the unit window axis is squeezed for the 2D network (as MONAI's
    SliceInferer does). ``layout``: the memory format the networks take (None: contiguous)."""

    def __init__(self, models: Sequence, plan: PreprocessingPlan, device, amp: bool, flips: Sequence[tuple], layout=None):
        self.models, self.plan, self.flips, self.layout = list(models), plan, list(flips), layout
        self.dtype: Optional[object] = amp_dtype(device) if amp else None
        self.device_type = device.type

    def _forward(self, model, x):
        if self.plan.spatial_dims == 2:
            axis = 2 + self.plan.slice_axis
            return model(x.squeeze(axis)).unsqueeze(axis)
        return model(x)

    def __call__(self, x):
        import torch

        if self.layout is not None:
            x = x.contiguous(memory_format=self.layout)
        acc = None
        for model in self.models:
            for axes in self.flips:
                with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
                    logits = self._forward(model, torch.flip(x, axes) if axes else x)
                p = logits.float()  # the same tensor when the network ran in float32
                del logits
                p = p.sigmoid_() if self.plan.sigmoid else _softmax_(p)
                p = torch.flip(p, axes) if axes else p
                acc = p if acc is None else acc.add_(p)
        n = len(self.flips) * len(self.models)
        return acc / n if n > 1 else acc
