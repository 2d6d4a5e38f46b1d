"""The body box: where a scan holds anything but air, on the preprocessed grid."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..data.plan import PreprocessingPlan
from .geometry import canonical_geometry, target_grid
from .intensity import BODY_HU, hu_offset

__all__ = ["foreground_box"]


def foreground_box(images: Sequence[sitk.Image], plan: PreprocessingPlan, margin_mm: float) -> Optional[Tuple[Tuple[int, int], ...]]:
    """Bounding box of the body on the preprocessed grid, ``((x0, x1), (y0, y1), (z0, z1))``
    (half-open voxel ranges), widened by ``margin_mm``. Computed on the raw intensities before
    any resampling or normalisation: CT channels (``plan.norms``) count voxels above
    :data:`BODY_HU`, other channels nonzero voxels; the channels' boxes are united. None when
    no voxel qualifies (then nothing may be cropped)."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for img, norm, modality in zip(images, plan.norms, plan.channels):
        arr = sitk.GetArrayViewFromImage(img)  # [z, y, x]
        mask = arr > BODY_HU - hu_offset(img, norm.scheme, modality, warn=False) if norm.scheme == "ct" else arr != 0
        for axis in range(3):  # index axis (x, y, z) = array axis 2 - axis
            hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != 2 - axis)))
            if hit.size:
                lo[axis], hi[axis] = min(lo[axis], hit[0]), max(hi[axis], hit[-1])
    if not np.isfinite(lo).all():
        return None
    canon, _, _ = canonical_geometry(images[0], plan.orientation)
    size, origin, spacing = target_grid(canon, plan.spacing)
    d = np.array(canon.direction).reshape(3, 3)
    corners = [images[0].TransformIndexToPhysicalPoint([int(c) for c in np.where(bits, hi, lo)]) for bits in np.ndindex(2, 2, 2)]
    u = np.array([d.T @ (np.array(p) - np.array(origin)) / np.array(spacing) for p in corners])  # (8, 3) voxel indices
    margin = margin_mm / np.array(spacing)
    start = np.clip(np.floor(u.min(0) - margin), 0, size).astype(int)
    stop = np.clip(np.ceil(u.max(0) + margin) + 1, 0, size).astype(int)
    return tuple((int(a), int(b)) for a, b in zip(start, stop))

