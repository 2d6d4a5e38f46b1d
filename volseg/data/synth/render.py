"""Intensities: a tissue map rendered as a CT (int16 HU) or MRI (float32) image on its grid."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Tuple

import numpy as np

from .anatomy import _T, _Fourier
from .geometry import NOMINAL_SPACING_MM, _Geometry

if TYPE_CHECKING:  # SimpleITK and scipy are imported where used: importing this module is cheap
    import SimpleITK as sitk

# (mean, per-case sd of the mean, texture sd). CT in HU; MRI relative to fat = 1 (T1-like).
# Lesion and blood are drawn per case (see _tissue_means).
_CT_TABLE: Dict[_T, Tuple[float, float, float]] = {
    _T.AIR: (-1000.0, 0.0, 0.0),
    _T.FAT: (-100.0, 10.0, 10.0),
    _T.MUSCLE: (45.0, 5.0, 10.0),
    _T.BOWEL: (35.0, 8.0, 10.0),
    _T.GAS: (-800.0, 80.0, 60.0),
    _T.LIVER: (60.0, 8.0, 8.0),
    # contrast-enhanced kidney: a bright cortex round a darker medulla, whose HU overlap blood,
    # lesion and bone edges, so its look (rim + core, shape, place), not a window, finds it
    _T.KIDNEY_CORTEX: (120.0, 10.0, 8.0),
    _T.KIDNEY_MEDULLA: (65.0, 8.0, 8.0),
    _T.LESION: (0.0, 0.0, 12.0),
    _T.BLOOD: (0.0, 0.0, 6.0),
    _T.BONE_CORTEX: (800.0, 120.0, 80.0),
    _T.MARROW: (250.0, 50.0, 40.0),
    _T.DISC: (80.0, 10.0, 10.0),
    _T.CSF: (10.0, 4.0, 5.0),
}
_MRI_TABLE: Dict[_T, Tuple[float, float, float]] = {
    _T.AIR: (0.0, 0.0, 0.0),
    _T.FAT: (1.0, 0.05, 0.03),
    _T.MUSCLE: (0.30, 0.02, 0.02),
    _T.BOWEL: (0.38, 0.04, 0.05),
    _T.GAS: (0.02, 0.0, 0.01),
    _T.LIVER: (0.50, 0.04, 0.02),
    _T.KIDNEY_CORTEX: (0.36, 0.03, 0.02),
    _T.KIDNEY_MEDULLA: (0.26, 0.03, 0.02),
    _T.LESION: (0.0, 0.0, 0.03),
    _T.BLOOD: (0.08, 0.02, 0.03),  # flow void
    _T.BONE_CORTEX: (0.04, 0.01, 0.01),
    _T.MARROW: (0.70, 0.05, 0.04),
    _T.DISC: (0.34, 0.03, 0.02),
    _T.CSF: (0.15, 0.03, 0.02),
}


def _tissue_means(rng: np.random.Generator, modality: str) -> Tuple[np.ndarray, np.ndarray]:
    table = _CT_TABLE if modality == "ct" else _MRI_TABLE
    n = len(_T)
    mean, tex = np.zeros(n), np.zeros(n)
    for t in _T:
        m, sd, tx = table[t]
        mean[t] = m + rng.normal(0.0, sd) if sd else m
        tex[t] = tx
    if modality == "ct":
        mean[_T.LESION] = mean[_T.LIVER] + rng.uniform(30.0, 50.0)
        mean[_T.BLOOD] = rng.uniform(40.0, 160.0)  # unenhanced to portal-venous
    else:
        mean[_T.LESION] = mean[_T.LIVER] - rng.uniform(0.12, 0.22)
    return mean, tex


def _smooth_noise(rng: np.random.Generator, geom: _Geometry, sigma_mm: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(geom.size), sigma=[sigma_mm / s for s in geom.spacing])
    return field / max(float(field.std()), 1e-12)


def _render(rng: np.random.Generator, tissue: np.ndarray, u: np.ndarray, geom: _Geometry, modality: str) -> np.ndarray:
    """The image array ``(nx, ny, nz)``: int16 HU for CT, float32 for MRI."""
    from scipy.ndimage import gaussian_filter

    mean, tex = _tissue_means(rng, modality)
    texture = (_smooth_noise(rng, geom, 1.2 * NOMINAL_SPACING_MM) + _smooth_noise(rng, geom, 3.5 * NOMINAL_SPACING_MM)) / math.sqrt(2)
    img = mean[tissue] + tex[tissue] * texture
    img = gaussian_filter(img, sigma=0.6)  # PSF about one voxel: partial-volume edges
    if modality == "ct":
        img += rng.normal(0.0, rng.uniform(15.0, 22.0), size=img.shape)
        return np.clip(np.round(img), -1024, 3071).astype(np.int16)
    # MRI: smooth multiplicative bias field (a guaranteed linear trend plus wiggles), an
    # arbitrary global scale, then Rician noise (magnitude of a noisy complex signal)
    v = rng.normal(size=3)
    v /= np.linalg.norm(v)
    log_bias = rng.uniform(0.25, 0.4) * np.tensordot(v, u, axes=1) + _Fourier(rng, 4, 0.4, 0.08, dims=1)(u)[0]
    scale = math.exp(rng.uniform(math.log(100.0), math.log(3000.0)))
    img = np.maximum(img, 0.0) * np.exp(log_bias) * scale
    sigma = scale * rng.uniform(0.02, 0.035)
    real = img + rng.normal(0.0, sigma, size=img.shape)
    imag = rng.normal(0.0, sigma, size=img.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def _to_image(arr_xyz: np.ndarray, geom: _Geometry) -> sitk.Image:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)))
    img.SetSpacing(geom.spacing)
    img.SetOrigin(tuple(float(o) for o in geom.origin))
    img.SetDirection(tuple(float(d) for d in geom.direction.ravel()))
    return img
