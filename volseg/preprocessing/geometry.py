"""Voxel grids: reorientation, resampling and the axis maps between a scan and its canonical
(preprocessed) grid, in SimpleITK and, for the GPU path, in torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

__all__ = ["Grid", "to_canonical", "target_grid", "resample", "antialias_sigma", "array_xyz", "canonical_geometry",
           "canonical_view", "grid_coordinates", "resample_linear", "gaussian"]


def to_canonical(img: sitk.Image, orientation: str) -> sitk.Image:
    return sitk.DICOMOrient(img, orientation.upper())


def target_grid(img: Union[sitk.Image, Grid], spacing: Sequence[float]) -> Tuple[List[int], Tuple[float, ...], Tuple[float, ...]]:
    """(size, origin, spacing) of ``img`` resampled to ``spacing``: the image's own grid when
    the spacing already matches within 0.1%, else a grid of the same physical extent."""
    old_sp = np.array(img.GetSpacing())
    if np.allclose(old_sp, spacing, rtol=1e-3):
        return list(img.GetSize()), tuple(img.GetOrigin()), tuple(img.GetSpacing())
    new_sp = np.array(spacing, dtype=float)
    size = np.maximum(1, np.round(np.array(img.GetSize()) * old_sp / new_sp)).astype(int)
    # keep the grid's physical extent centred: move the first voxel centre by half the spacing change
    d = np.array(img.GetDirection()).reshape(3, 3)
    origin = np.array(img.GetOrigin()) + d @ ((new_sp - old_sp) / 2)
    return size.tolist(), tuple(origin.tolist()), tuple(float(v) for v in new_sp)


def resample(img: sitk.Image, spacing: Sequence[float], is_label: bool = False) -> sitk.Image:
    """Resample to ``spacing`` (mm, image axis order) on a grid of the same extent."""
    size, origin, spacing = target_grid(img, spacing)
    if tuple(size) == img.GetSize() and spacing == img.GetSpacing():
        return img
    if not is_label:
        sigma = antialias_sigma(img.GetSpacing(), spacing)
        for axis in np.flatnonzero(sigma):
            # one axis at a time: ITK's recursive Gaussian needs >= 4 voxels along every axis it
            # smooths, and a single-slice axis (2D mode) is never downsampled in-plane
            if img.GetSize()[axis] >= 4:
                img = sitk.RecursiveGaussian(img, float(sigma[axis]), False, sitk.RecursiveGaussianImageFilter.ZeroOrder, int(axis))
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    # the new grid can reach up to half a voxel beyond the scan: take the edge voxel there, not 0
    # (0 HU is water, not air), as the torch resampler does
    return sitk.Resample(img, size, sitk.Transform(), interp, origin, spacing, img.GetDirection(), 0, img.GetPixelID(), useNearestNeighborExtrapolator=True)


def antialias_sigma(old: Sequence[float], new: Sequence[float]) -> np.ndarray:
    """Gaussian sigma (mm, per axis) to smooth with before resampling from spacing ``old`` to
    ``new``: about half the spacing increase on axes downsampled by more than 1.5x, 0 elsewhere.
    The SimpleITK and the torch (GPU) paths both use it, so they smooth alike."""
    o, n = np.asarray(old, float), np.asarray(new, float)
    return np.where(n / o > 1.5, (n - o) / 2, 0.0)


def array_xyz(img: sitk.Image) -> np.ndarray:
    """SimpleITK ``[z, y, x]`` -> ``[x, y, z]``."""
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def gaussian(x, sigma_vox: Sequence[float]):
    """Separable Gaussian smoothing of ``(X, Y, Z)`` (sigma in voxels per axis; kernel to 4
    sigma, edges replicated)."""
    import torch
    import torch.nn.functional as F

    for axis, s in enumerate(sigma_vox):
        if s < 1e-3:
            continue
        r = max(1, int(np.ceil(4 * s)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32, device=x.device) / s) ** 2)
        k = (k / k.sum()).view(1, 1, -1)
        moved = x.movedim(axis, -1)
        flat = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (r, r), mode="replicate")
        x = F.conv1d(flat, k).reshape(moved.shape).movedim(-1, axis)
    return x


@dataclass(frozen=True)
class Grid:
    """A voxel grid without pixels, in SimpleITK's (x, y, z) axis order: ``size`` (voxels),
    ``origin`` and ``spacing`` (mm), ``direction`` (3x3, row-major). It answers the getters
    :func:`target_grid` uses, so no pixel copy is needed to plan a grid."""

    size: Tuple[int, ...]
    origin: Tuple[float, ...]
    spacing: Tuple[float, ...]
    direction: Tuple[float, ...]

    def GetSize(self):  # noqa: N802 - SimpleITK's getter names
        return self.size

    def GetOrigin(self):  # noqa: N802
        return self.origin

    def GetSpacing(self):  # noqa: N802
        return self.spacing

    def GetDirection(self):  # noqa: N802
        return self.direction


def canonical_geometry(reference: sitk.Image, orientation: str) -> Tuple[Grid, Tuple[int, ...], Tuple[int, ...]]:
    """The grid :func:`to_canonical` gives ``reference``, without copying its pixels, and the
    axis map from it: canonical axis ``a`` is reference axis ``perm[a]``, reversed where
    ``sign[a] < 0``. (DICOMOrient only permutes and flips; a 1-voxel probe with the same
    direction tells which permutation it picks.)"""
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetDirection(reference.GetDirection())
    dc = np.array(to_canonical(probe, orientation).GetDirection()).reshape(3, 3)
    m = np.array(reference.GetDirection()).reshape(3, 3).T @ dc  # m[i, a] = <reference axis i, canonical axis a>
    perm = tuple(int(i) for i in np.abs(m).argmax(0))
    sign = tuple(int(np.sign(m[perm[a], a])) for a in range(3))
    size_r, sp_r = reference.GetSize(), reference.GetSpacing()
    corner = [0, 0, 0]
    for a in range(3):
        corner[perm[a]] = 0 if sign[a] > 0 else size_r[perm[a]] - 1
    grid = Grid(
        size=tuple(int(size_r[perm[a]]) for a in range(3)),
        origin=tuple(reference.TransformIndexToPhysicalPoint(corner)),
        spacing=tuple(float(sp_r[perm[a]]) for a in range(3)),
        direction=tuple(float(v) for v in dc.ravel()),
    )
    return grid, perm, sign


def canonical_view(arr_zyx: np.ndarray, perm: Sequence[int], sign: Sequence[int]) -> np.ndarray:
    """A writable view of a reference-ordered ``[z, y, x]`` array (leading axes kept) in the
    canonical ``(x, y, z)`` order of :func:`canonical_geometry`: writing into it undoes the
    reorientation without a copy."""
    lead = arr_zyx.ndim - 3
    v = np.moveaxis(arr_zyx, [lead, lead + 1, lead + 2], [lead + 2, lead + 1, lead])  # (..., x, y, z)
    v = v.transpose(*range(lead), *(lead + p for p in perm))
    for a in range(3):
        if sign[a] < 0:
            v = np.flip(v, lead + a)
    return v


def grid_coordinates(src: Grid, dst: Grid) -> List[np.ndarray]:
    """Continuous ``src`` voxel index (per axis, float64) of every ``dst`` voxel centre, for two
    grids with the same direction (axis-aligned): ``[u_x, u_y, u_z]``."""
    d = np.array(src.direction).reshape(3, 3)
    offset = d.T @ (np.array(dst.origin) - np.array(src.origin))  # mm along each axis
    return [(offset[a] + np.arange(dst.size[a]) * dst.spacing[a]) / src.spacing[a] for a in range(3)]


def resample_linear(t, coords: Sequence[Optional[np.ndarray]]):
    """Separable linear interpolation of a tensor ``(..., X, Y, Z)`` at continuous voxel
    indices ``coords`` (one 1-D array per trailing axis; None keeps an axis). Beyond the grid
    an axis takes its edge value. On axis-aligned grids this equals SimpleITK's linear
    resampling inside the grid (up to half a voxel beyond the outer voxel centres; further out,
    SimpleITK's nearest-neighbour extrapolator also rounds the other axes), but runs on any
    torch device and lets a caller resample one slab at a time. Axes that shrink most go first
    (least work)."""
    import torch

    lead = t.ndim - len(coords)
    order = sorted((i for i, u in enumerate(coords) if u is not None), key=lambda i: len(coords[i]) / t.shape[lead + i])  # type: ignore[arg-type]
    for i in order:
        dim, n = lead + i, t.shape[lead + i]
        u = np.clip(np.asarray(coords[i], np.float64), 0, n - 1)
        if len(u) == n and np.allclose(u, np.arange(n), atol=1e-6):
            continue
        i0 = np.minimum(np.floor(u).astype(np.int64), n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        shape = [1] * t.ndim
        shape[dim] = -1
        w = torch.as_tensor(u - i0, dtype=t.dtype, device=t.device).view(shape)
        a = t.index_select(dim, torch.as_tensor(i0, device=t.device))
        b = t.index_select(dim, torch.as_tensor(i1, device=t.device))
        t = torch.lerp(a, b, w)
    return t

