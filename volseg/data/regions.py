"""Region-based labels (nnU-Net's convention for nested structures such as BraTS tumours).

A *region* is a set of label values (``"whole tumor": [1, 2, 3]``). A region model has one
sigmoid output per region; its targets are ``isin(label_map, region)`` per region, and its
prediction becomes a label map again by painting the thresholded regions, in
``regions_class_order``, one over the other: a later region overwrites an earlier one.

Both functions take numpy arrays or torch tensors and give back the same kind, on the same
device, so training targets (torch, on the GPU) and stitched predictions (either) share them.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch

__all__ = ["labels_to_regions", "regions_to_labels"]

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def labels_to_regions(label_map: Array, regions: Sequence[Sequence[int]]) -> Array:
    """One boolean mask per region, stacked on a new first axis: ``out[i] = isin(label_map,
    regions[i])``. ``label_map`` is ``(*spatial)``; the result is ``(len(regions), *spatial)``."""
    if len(regions) == 0 or any(len(r) == 0 for r in regions):
        raise ValueError(f"every region needs at least one label value, got {[list(r) for r in regions]}")
    if isinstance(label_map, torch.Tensor):
        return torch.stack([torch.isin(label_map, torch.as_tensor(list(r), device=label_map.device, dtype=label_map.dtype)) for r in regions])
    return np.stack([np.isin(label_map, list(r)) for r in regions])


def regions_to_labels(region_probs: Array, regions_class_order: Sequence[int], threshold: float = 0.5) -> Array:
    """A label map from per-region probabilities ``(R, *spatial)``: for ``i`` in order, voxels
    with ``region_probs[i] > threshold`` get the value ``regions_class_order[i]`` (later regions
    win), the rest stay 0. The result is uint8 (numpy) or torch.uint8 when every value fits in
    8 bits, else 16 bits (numpy uint16 / torch.int32)."""
    if region_probs.shape[0] != len(regions_class_order):
        raise ValueError(f"{region_probs.shape[0]} region outputs but regions_class_order has {len(regions_class_order)} entries: {list(regions_class_order)}")
    if any(not 0 < int(v) <= 65535 for v in regions_class_order):
        raise ValueError(f"regions_class_order values must be label values in 1..65535, got {list(regions_class_order)}")
    small = max(regions_class_order, default=0) <= 255
    if isinstance(region_probs, torch.Tensor):
        out = torch.zeros(region_probs.shape[1:], dtype=torch.uint8 if small else torch.int32, device=region_probs.device)
    else:
        out = np.zeros(region_probs.shape[1:], dtype=np.uint8 if small else np.uint16)
    for i, value in enumerate(regions_class_order):
        out[region_probs[i] > threshold] = int(value)
    return out
