"""Preprocessing: the exact replay of a run's :class:`~volseg.data.plan.PreprocessingPlan` on a scan.

Steps, identical at training and inference:
1. reorient to ``plan.orientation`` (SimpleITK ``DICOMOrient``: a pure axis permutation/flip, no
   interpolation; an oblique scan keeps its small obliquity in the direction matrix),
2. resample to ``plan.spacing`` (mm) on a grid covering the same physical extent (images:
   linear, after a Gaussian anti-alias when an axis is downsampled by more than 1.5x; labels:
   nearest),
3. normalise each channel: CT channels (after :func:`hu_offset`: a scan stored as HU + 1024 is
   shifted back, an 8-bit export refused) are clipped to the 0.5-99.5 percentiles of the training
   foreground HU, widened to at least the soft-tissue window -160..240 HU (:func:`ct_window`),
   and z-scored with the foreground mean/std (MONAI ``ScaleIntensityRange`` does
   both in one affine map); other modalities get a per-image z-score over nonzero voxels (MONAI
   ``NormalizeIntensity``), which removes arbitrary MRI intensity scales.

Arrays leave this module as ``(C, X, Y, Z)`` float32 (MONAI's channel-first, x-fastest order),
labels as ``(1, X, Y, Z)`` uint8 holding class *indices* (0..K-1), not label values, and
``IGNORE_INDEX`` (255) where the label is the plan's ignore value.
:mod:`.restore` inverts steps 1-2 for class probabilities; :mod:`volseg.planning` makes the plan.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..data.io import ImageReadError, read_channels, read_label, same_geometry
from ..data.manifest import Case
from ..data.plan import IGNORE_INDEX, PreprocessingPlan
from .geometry import (
    Grid,
    antialias_sigma,
    array_xyz,
    canonical_geometry,
    canonical_view,
    gaussian,
    grid_coordinates,
    resample,
    resample_linear,
    target_grid,
    to_canonical,
)
from .intensity import check_intensities, hu_offset, normalise

log = logging.getLogger(__name__)

__all__ = ["MIN_VOXELS", "MAX_VOXELS", "load_case", "check_input", "preprocess", "preprocess_case"]


def load_case(case: Case, with_label: bool = True) -> Tuple[List[sitk.Image], Optional[sitk.Image]]:
    """(channel images as float32, label map or None). A 4D file gives one channel per entry of
    its 4th axis, so ``case.images`` may hold fewer paths than there are channels."""
    images = [img for p in case.images for img in read_channels(p, sitk.sitkFloat32)]
    label = read_label(case.label) if (with_label and case.label is not None) else None
    return images, label


MIN_VOXELS = 4  # per axis, before and after resampling (ITK's anti-alias filter needs 4)
MAX_VOXELS = 2**30  # per channel after resampling: 4 GiB of float32


def check_input(images: Sequence[sitk.Image], plan: PreprocessingPlan, source: str) -> None:
    """Channel count, one shared grid, and a grid size volseg can work on (with the limits)."""
    if len(images) != len(plan.channels):
        raise ImageReadError(
            f"{source}: {len(images)} channel(s) given, the model expects {len(plan.channels)} ({list(plan.channels)}); "
            "give one file per channel, or one 4D file with the channels on its 4th axis."
        )
    for c, img in enumerate(images[1:], start=1):
        diff = same_geometry(images[0], img)
        if diff:
            raise ImageReadError(f"{source}: channel {c} ({plan.channels[c]}) is not on the grid of channel 0 ({plan.channels[0]}): {diff}; resample the channels onto one grid first.")
    canon, _, _ = canonical_geometry(images[0], plan.orientation)  # the geometry only: no pixel is copied
    size, _, _ = target_grid(canon, plan.spacing)
    axes = [a for a in range(3) if not (plan.spatial_dims == 2 and a == plan.slice_axis)]
    small = any(canon.GetSize()[a] < MIN_VOXELS or size[a] < MIN_VOXELS for a in axes)
    if small or int(np.prod(size)) > MAX_VOXELS:
        raise ImageReadError(
            f"{source}: {list(canon.GetSize())} voxels of {[round(s, 4) for s in canon.GetSpacing()]} mm ({plan.orientation} order) "
            f"resample to {size} voxels at the model's {[float(f'{s:.4g}') for s in plan.spacing]} mm; volseg needs at least {MIN_VOXELS} voxels along "
            f"each {'in-plane ' if plan.spatial_dims == 2 else ''}axis, before and after resampling, and at most {MAX_VOXELS:,} "
            "after (check the header's spacing)."
        )


def preprocess(images: Sequence[sitk.Image], plan: PreprocessingPlan, label: Optional[sitk.Image] = None, source: str = "",
               device=None) -> Dict[str, Any]:
    """Replay the plan on one case, step by step (:func:`check_input`, HU offset, reorientation
    and resampling, normalisation). Returns ``{"image": (C, X, Y, Z) float32}`` and, with a
    label, ``"label": (1, X, Y, Z) uint8`` class indices.

    ``device=None``: the SimpleITK backend, numpy arrays out. A torch device (the GPU path): the
    torch backend, ``"image"`` a tensor on it (labels are not supported there). The backends
    share every step but the resampling: SimpleITK's recursive Gaussian and linear resampler
    against a separable Gaussian convolution and :func:`resample_linear` on the axis-aligned
    canonical grids; they agree to float tolerance inside the grid (where the new grid reaches
    half a voxel beyond the scan both take the edge voxel).

    Raises :class:`ImageReadError` (naming ``source``) when the channel count differs from the
    plan's, the channels are not on one grid, or the grid has fewer than :data:`MIN_VOXELS` per
    axis (before or after resampling; in-plane axes in 2D mode) or more than :data:`MAX_VOXELS`
    after."""
    source = source or "input"
    check_input(images, plan, source)
    if device is not None and label is not None:
        raise ValueError("preprocess: labels are resampled by the SimpleITK backend only (device=None).")
    resampled = _sitk_channel(plan) if device is None else _torch_channel(images[0], plan, device)
    chans = []
    for img, norm, modality in zip(images, plan.norms, plan.channels):
        check_intensities(img, norm.scheme, modality, source)
        offset = hu_offset(img, norm.scheme, modality, source)
        chans.append(normalise(resampled(img, offset), norm))
    if device is not None:
        import torch

        return {"image": torch.stack(chans)}
    out: Dict[str, Any] = {"image": np.stack(chans)}
    if label is not None:
        lab = array_xyz(resample(to_canonical(label, plan.orientation), plan.spacing, is_label=True))
        top = max(max(plan.label_values), plan.ignore_label or 0, int(lab.max()))
        lut = np.zeros(top + 1, np.uint8)
        for idx, value in enumerate(plan.label_values):
            lut[value] = idx
        if plan.ignore_label is not None:
            lut[plan.ignore_label] = IGNORE_INDEX
        out["label"] = lut[lab.astype(np.int64)][None]
    return out


def _sitk_channel(plan: PreprocessingPlan) -> Callable:
    """SimpleITK backend: a channel plus its HU offset -> ``(X, Y, Z)`` float32 on the plan's grid."""

    def run(img: sitk.Image, offset: float) -> np.ndarray:
        img = sitk.Cast(img, sitk.sitkFloat32)
        if offset:
            img = img + offset
        return array_xyz(resample(to_canonical(img, plan.orientation), plan.spacing))

    return run


def _torch_channel(reference: sitk.Image, plan: PreprocessingPlan, device) -> Callable:
    """torch backend (any device): the reorientation is a permute/flip view
    (:func:`canonical_view`), the anti-alias a separable Gaussian convolution, the resampling
    :func:`resample_linear`; the grids are planned once for all channels."""
    import torch

    canon, perm, sign = canonical_geometry(reference, plan.orientation)
    size, origin, spacing = target_grid(canon, plan.spacing)
    coords = grid_coordinates(canon, Grid(tuple(size), origin, spacing, canon.direction))
    sigma = antialias_sigma(canon.spacing, spacing) if tuple(size) != canon.size or spacing != canon.spacing else np.zeros(3)
    sigma = np.where(np.array(canon.size) >= 4, sigma, 0.0)  # as resample(): ITK smooths only axes of >= 4 voxels

    def run(img: sitk.Image, offset: float):
        arr = np.ascontiguousarray(canonical_view(sitk.GetArrayViewFromImage(img), perm, sign))
        x = torch.from_numpy(arr).to(device).float() + offset
        if sigma.any():
            x = gaussian(x, [s / sp for s, sp in zip(sigma, canon.spacing)])
        return resample_linear(x, coords)

    return run


def preprocess_case(case: Case, plan: PreprocessingPlan) -> Dict[str, np.ndarray]:
    images, label = load_case(case)
    return preprocess(images, plan, label, source=case.name)

