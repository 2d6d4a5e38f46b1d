"""Synthetic abdominal CT and MRI phantoms: the built-in demo data and the test data.

Each case is a deformed elliptic-cylinder "abdomen" (air outside) with subcutaneous fat, a
muscle wall, a peritoneal cavity of bowel, fat and gas, the aorta and vena cava, a spine and
ribs (bone, *not* labelled: a distractor), and three labelled organs:

======  ==========  =========================================================================
label   name        what
======  ==========  =========================================================================
0       background  everything else (air, fat, muscle, bowel, vessels, bone)
1       liver       large: a right lobe and a left lobe, randomly warped
2       kidney      medium: left and right, bean-shaped, cortex brighter than medulla, each in
                    a fat capsule; the right one presses into the liver (the labels touch)
3       lesion      small (a few hundred voxels at the default size): one lobulated tumour in
                    the liver, brighter than the liver on CT, darker on MRI
======  ==========  =========================================================================

The anatomy is defined in physical space (mm, SimpleITK's LPS world: +x = patient left,
+y = posterior, +z = superior) and each case's voxel grid is placed in that space with its own
spacing, direction and origin, so an anisotropic or rotated case shows the same anatomy on a
different grid. The classes overlap in intensity (on CT the kidney, ~30 HU on average with a
40 HU cortex round a 12 HU medulla, sits inside the muscle and bowel range; liver and lesion
histograms overlap too), so a segmenter must use shape and context, not a threshold.

CT images are int16 Hounsfield units: per-case tissue means, smooth texture, partial-volume
blur (the PSF, one voxel wide), then white noise of 15-22 HU. MRI images are float32 on an
arbitrary per-case scale (100-3000), T1-like contrast (fat bright, bone dark), a smooth
multiplicative bias field (its log has a linear trend of 0.25-0.4 per half field of view, so
intensity changes by a factor 1.6-2.2 across the image) and Rician noise.

Arrays follow SimpleITK: an image's array is indexed ``[z, y, x]``. Generation is
deterministic: case ``i`` of :func:`make_dataset` with seed ``s`` uses
``numpy.random.default_rng((s, i))``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import check_choice
from ..version import __version__
from .io import write_image, write_text

if TYPE_CHECKING:  # SimpleITK and scipy are imported where used: importing this module is cheap
    import SimpleITK as sitk

log = logging.getLogger(__name__)

__all__ = [
    "LABELS",
    "MODALITIES",
    "ORIENTATIONS",
    "NOMINAL_SPACING_MM",
    "make_case",
    "make_dataset",
]

Shape3 = Tuple[int, int, int]
Spacing3 = Tuple[float, float, float]
SeedLike = Union[int, Sequence[int], np.random.Generator]

LABELS: Dict[int, str] = {0: "background", 1: "liver", 2: "kidney", 3: "lesion"}
MODALITIES: Dict[str, str] = {"ct": "CT", "mri": "MRI"}
#: Other accepted spellings (the CLI offers ``mr``, as DICOM's modality code does).
MODALITY_ALIASES: Dict[str, str] = {"mr": "mri"}
#: Voxel axis codes of the written NIfTI (nibabel's ``aff2axcodes``). In SimpleITK terms "LPS"
#: is the identity direction and "RAS" is ``diag(-1, -1, 1)``; "oblique" is either of them
#: rotated by 5-20 degrees about one axis.
ORIENTATIONS: Tuple[str, ...] = ("LPS", "RAS", "oblique")
#: Spacing of an isotropic case when no ``spacing`` is given; the field of view is about
#: ``shape * NOMINAL_SPACING_MM`` for every case.
NOMINAL_SPACING_MM = 1.5
_MIN_SIZE = 16  # voxels per axis; smaller grids cannot hold the small lesion
_GENERATOR_VERSION = 1


class _T(IntEnum):
    """Tissue codes of the internal tissue map (the label map is derived from the organs)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    BOWEL = 3
    GAS = 4
    LIVER = 5
    KIDNEY_CORTEX = 6
    KIDNEY_MEDULLA = 7
    LESION = 8
    BLOOD = 9
    BONE_CORTEX = 10
    MARROW = 11
    DISC = 12
    CSF = 13


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


# ----------------------------------------------------------------------------- input checks


def _check_modality(modality: str) -> str:
    key = modality.lower() if isinstance(modality, str) else modality
    return check_choice("modality", MODALITY_ALIASES.get(key, key), list(MODALITIES) + list(MODALITY_ALIASES))


def _check_shape(shape: Sequence[int]) -> Shape3:
    try:
        out = tuple(int(s) for s in shape)
        ok = len(out) == 3 and all(s == float(v) for s, v in zip(out, shape))
    except (TypeError, ValueError):
        ok = False
    if not ok or min(out) < _MIN_SIZE:
        raise ValueError(f"shape={shape!r} must be 3 integers >= {_MIN_SIZE} (voxels along x, y, z).")
    return out  # type: ignore[return-value]


def _check_spacing(spacing: Optional[Sequence[float]]) -> Optional[Spacing3]:
    if spacing is None:
        return None
    try:
        out = tuple(float(s) for s in spacing)
        ok = len(out) == 3 and all(math.isfinite(s) and s > 0 for s in out)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"spacing={spacing!r} must be None or 3 positive numbers (mm along x, y, z).")
    return out  # type: ignore[return-value]


def _as_generator(rng: SeedLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rng={rng!r} must be a numpy Generator, a non-negative int or a sequence of them ({exc}).") from None


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Geometry:
    size: Tuple[int, int, int]  # voxels along x, y, z
    spacing: Tuple[float, float, float]  # mm
    direction: np.ndarray  # (3, 3), columns = world directions of the x, y, z index axes
    origin: np.ndarray  # (3,) mm, world position of voxel (0, 0, 0)
    centre: np.ndarray  # (3,) mm, world position of the anatomy's centre
    half_fov: np.ndarray  # (3,) mm, the anatomy's unit length along each world axis


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _draw_geometry(
    rng: np.random.Generator,
    shape: Shape3,
    spacing: Optional[Spacing3],
    orientation: Optional[str],
    anisotropic: Optional[bool],
) -> _Geometry:
    # Every draw happens whatever the options, so the anatomy drawn afterwards is the same
    # for a given seed whichever orientation or spacing profile is asked for.
    fov_jitter = rng.uniform(0.92, 1.08, size=3)
    iso_factor = rng.uniform(0.9, 1.1)
    aniso_inplane, aniso_z = rng.uniform(0.8, 0.9), rng.uniform(1.6, 1.9)
    drawn_orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    drawn_aniso = bool(rng.random() < 0.5)
    oblique_axis = int(rng.integers(3))
    oblique_deg = rng.uniform(5.0, 20.0) * (1 if rng.random() < 0.5 else -1)
    oblique_flip = bool(rng.random() < 0.5)
    centre = np.round(rng.uniform([-40.0, -40.0, -250.0], [40.0, 40.0, 250.0]), 2)
    grid_shift = rng.uniform(-0.06, 0.06, size=3)

    orientation = drawn_orientation if orientation is None else orientation
    anisotropic = drawn_aniso if anisotropic is None else anisotropic
    base = np.array(spacing if spacing is not None else (NOMINAL_SPACING_MM,) * 3)
    half_fov = np.asarray(shape) * base / 2.0 * fov_jitter
    if spacing is not None:
        sp = base
    elif anisotropic:
        sp = NOMINAL_SPACING_MM * np.array([aniso_inplane, aniso_inplane, aniso_z])
    else:
        sp = np.full(3, NOMINAL_SPACING_MM * iso_factor)
    sp = np.round(sp, 4)
    size = np.maximum(_MIN_SIZE // 2, np.round(2.0 * half_fov / sp)).astype(int)

    flip = np.diag([-1.0, -1.0, 1.0])
    if orientation == "LPS":
        direction = np.eye(3)
    elif orientation == "RAS":
        direction = flip
    else:
        direction = _rotation(oblique_axis, oblique_deg) @ (flip if oblique_flip else np.eye(3))
    grid_centre = centre + grid_shift * half_fov
    origin = np.round(grid_centre - direction @ (sp * (size - 1) / 2.0), 3)
    return _Geometry(
        size=tuple(int(s) for s in size),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in sp),  # type: ignore[arg-type]
        direction=direction,
        origin=origin,
        centre=centre,
        half_fov=half_fov,
    )


def _anatomy_coords(geom: _Geometry) -> np.ndarray:
    """Normalised anatomy coordinates ``(3, nx, ny, nz)``: (world - centre) / half_fov."""
    idx = np.indices(geom.size, dtype=np.float64).reshape(3, -1)
    world = geom.origin[:, None] + geom.direction @ (np.asarray(geom.spacing)[:, None] * idx)
    u = (world - geom.centre[:, None]) / geom.half_fov[:, None]
    return u.reshape((3,) + geom.size)


# ----------------------------------------------------------------------------- anatomy


class _Fourier:
    """A smooth random field: a sum of ``n`` plane waves in normalised coordinates.

    ``dims=3`` gives a displacement field (used to warp shapes), ``dims=1`` a scalar field. The
    field is defined everywhere in space, so it does not depend on the voxel grid.
    """

    def __init__(self, rng: np.random.Generator, n: int, freq: float, amp: float, dims: int = 3):
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.k = 2 * np.pi * dirs * (freq * rng.uniform(0.7, 1.3, size=(n, 1)))
        self.phase = rng.uniform(0, 2 * np.pi, size=n)
        self.amp = rng.normal(size=(n, dims)) * amp / math.sqrt(n)

    def __call__(self, u: np.ndarray) -> np.ndarray:
        out = np.zeros((self.amp.shape[1],) + u.shape[1:])
        for k, ph, a in zip(self.k, self.phase, self.amp):
            wave = np.sin(k[0] * u[0] + k[1] * u[1] + k[2] * u[2] + ph)
            for d in range(len(a)):
                out[d] += a[d] * wave
        return out

    def warp(self, u: np.ndarray) -> np.ndarray:
        return u + self(u)


@dataclass
class _Ellipsoid:
    centre: np.ndarray  # (3,) normalised
    semi: np.ndarray  # (3,) semi-axes, normalised
    rot: np.ndarray  # (3, 3)

    def r2(self, q: np.ndarray) -> np.ndarray:
        """Squared ellipsoidal radius at points ``q`` (3, ...): <= 1 inside."""
        v = q - self.centre.reshape((3,) + (1,) * (q.ndim - 1))
        v = np.tensordot(self.rot.T, v, axes=1)
        return sum((v[i] / self.semi[i]) ** 2 for i in range(3))


def _rot3(rng: np.random.Generator, max_deg: Tuple[float, float, float]) -> np.ndarray:
    r = np.eye(3)
    for axis, m in enumerate(max_deg):
        r = _rotation(axis, rng.uniform(-m, m)) @ r
    return r


@dataclass
class _Anatomy:
    body_warp: _Fourier
    body_ax: float
    body_ay: float
    body_taper: float
    fat: float
    wall: float
    cavity_dy: float
    liver_warp: _Fourier
    liver: Tuple[_Ellipsoid, _Ellipsoid]
    kidney_warps: Tuple[_Fourier, _Fourier]
    kidneys: Tuple[_Ellipsoid, _Ellipsoid]
    hila: Tuple[_Ellipsoid, _Ellipsoid]
    lesion_warp: _Fourier
    lesion: _Ellipsoid
    bowel_field: _Fourier
    fat_fraction: float
    gas_field: _Fourier
    aorta: Tuple[float, float, float]  # x, y, radius
    ivc: Tuple[float, float, float, float]  # x, y, semi x, semi y
    spine: Tuple[float, float, float, float]  # x, y, semi x, semi y (vertebral body)
    disc_period: float
    disc_phase: float
    rib_period: float
    rib_phase: float


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Random anatomy parameters in normalised coordinates (1 = half the field of view)."""
    j = lambda s: rng.uniform(-s, s)  # noqa: E731
    body_ax, body_ay = 0.88 + j(0.05), 0.72 + j(0.05)
    fat, wall = rng.uniform(0.06, 0.13), rng.uniform(0.05, 0.08)

    liver_scale = rng.uniform(0.9, 1.1)
    right_lobe = _Ellipsoid(
        np.array([-0.33 + j(0.04), -0.06 + j(0.04), 0.24 + j(0.06)]),
        np.array([0.40, 0.38, 0.50]) * liver_scale * rng.uniform(0.93, 1.07, size=3),
        _rot3(rng, (8, 8, 12)),
    )
    left_lobe = _Ellipsoid(
        np.array([0.08 + j(0.05), -0.28 + j(0.03), 0.30 + j(0.06)]),
        np.array([0.32, 0.16, 0.28]) * liver_scale * rng.uniform(0.9, 1.1, size=3),
        _rot3(rng, (8, 8, 15)),
    )
    liver_warp = _Fourier(rng, 6, 0.8, 0.05)

    kidney_scale = rng.uniform(0.9, 1.1)
    kidneys, hila, kidney_warps = [], [], []
    for side in (-1, 1):  # -1: patient right (LPS -x), beside the liver
        semi = np.array([0.14, 0.17, 0.32]) * kidney_scale * rng.uniform(0.93, 1.07, size=3)
        # upper pole tilted towards the spine, hilum turned forward
        rot = _rotation(1, side * rng.uniform(8, 20)) @ _rotation(2, -side * rng.uniform(10, 25))
        centre = np.array([side * 0.38 + j(0.03), 0.18 + j(0.03), -0.25 + j(0.06)])
        kidneys.append(_Ellipsoid(centre, semi, rot))
        hilum = centre + rot @ np.array([-side * 0.95 * semi[0], -0.3 * semi[1], 0.0])
        hila.append(_Ellipsoid(hilum, np.full(3, 0.5 * semi[0]), np.eye(3)))
        kidney_warps.append(_Fourier(rng, 5, 1.5, 0.02))

    # the lesion sits well inside the liver, away from the kidney
    for _ in range(200):
        radius = rng.uniform(0.13, 0.17)
        centre = right_lobe.centre + rng.uniform(-0.5, 0.5, size=3) * right_lobe.semi
        p = liver_warp.warp(centre[:, None])
        inside = float(np.minimum(right_lobe.r2(p), left_lobe.r2(p))[0]) < 0.45
        clear = min(float(k.r2(centre[:, None])[0]) for k in kidneys) > 1.8
        if inside and clear:
            break
    lesion = _Ellipsoid(centre, radius * rng.uniform(0.85, 1.15, size=3), _rot3(rng, (90, 90, 90)))

    return _Anatomy(
        body_warp=_Fourier(rng, 5, 0.5, 0.03),
        body_ax=body_ax,
        body_ay=body_ay,
        body_taper=j(0.06),
        fat=fat,
        wall=wall,
        cavity_dy=-0.03 + j(0.02),
        liver_warp=liver_warp,
        liver=(right_lobe, left_lobe),
        kidney_warps=tuple(kidney_warps),  # type: ignore[arg-type]
        kidneys=tuple(kidneys),  # type: ignore[arg-type]
        hila=tuple(hila),  # type: ignore[arg-type]
        lesion_warp=_Fourier(rng, 6, 3.0, 0.025),
        lesion=lesion,
        bowel_field=_Fourier(rng, 24, 2.5, 1.0, dims=1),
        fat_fraction=rng.uniform(0.2, 0.35),
        gas_field=_Fourier(rng, 16, 3.0, 1.0, dims=1),
        aorta=(0.10 + j(0.03), 0.22 + j(0.02), 0.065 * rng.uniform(0.85, 1.15)),
        ivc=(-0.15 + j(0.03), 0.14 + j(0.02), 0.08, 0.055),
        spine=(j(0.03), 0.38 + j(0.02), 0.11 * rng.uniform(0.9, 1.1), 0.09 * rng.uniform(0.9, 1.1)),
        disc_period=rng.uniform(0.34, 0.42),
        disc_phase=rng.uniform(0, 1),
        rib_period=rng.uniform(0.28, 0.36),
        rib_phase=rng.uniform(0, 1),
    )


def _paint(u: np.ndarray, a: _Anatomy) -> Tuple[np.ndarray, np.ndarray]:
    """Tissue map and label map (both ``(nx, ny, nz)`` uint8) at points ``u`` (3, nx, ny, nz)."""
    tissue = np.full(u.shape[1:], _T.AIR, dtype=np.uint8)
    label = np.zeros(u.shape[1:], dtype=np.uint8)

    q = a.body_warp.warp(u)
    taper = 1.0 + a.body_taper * q[2]
    ax, ay = a.body_ax * taper, a.body_ay * taper
    ell = lambda sx, sy, dy=0.0: (q[0] / sx) ** 2 + ((q[1] - dy) / sy) ** 2 <= 1.0  # noqa: E731
    body = ell(ax, ay)
    inner = ell(ax - a.fat, ay - a.fat)
    cax, cay = ax - a.fat - a.wall, ay - a.fat - a.wall
    cavity = ell(cax, cay, a.cavity_dy)
    tissue[body] = _T.FAT
    tissue[inner] = _T.MUSCLE

    # peritoneal cavity: bowel and fat patches, gas in the bowel
    g = a.bowel_field(u)[0]
    fat_level = np.quantile(g[cavity], a.fat_fraction) if cavity.any() else 0.0
    tissue[cavity] = np.where(g[cavity] < fat_level, _T.FAT, _T.BOWEL)
    gas = cavity & (g > fat_level + 0.35) & (a.gas_field(u)[0] > 1.1) & (q[1] < 0.1)
    tissue[gas] = _T.GAS

    x, y = q[0], q[1]
    ox, oy, orad = a.aorta
    tissue[cavity & (((x - ox) ** 2 + (y - oy) ** 2) <= orad**2)] = _T.BLOOD
    vx, vy, vsx, vsy = a.ivc
    tissue[cavity & (((x - vx) / vsx) ** 2 + ((y - vy) / vsy) ** 2 <= 1.0)] = _T.BLOOD

    kid_r2 = [k.r2(w.warp(u)) for k, w in zip(a.kidneys, a.kidney_warps)]
    for r2 in kid_r2:  # perirenal fat capsule, before the liver so that the liver can touch
        tissue[cavity & (r2 <= 1.45**2)] = _T.FAT

    ql = a.liver_warp.warp(u)
    liver = cavity & (np.minimum(a.liver[0].r2(ql), a.liver[1].r2(ql)) <= 1.0)
    tissue[liver] = _T.LIVER
    label[liver] = 1

    for r2, hilum in zip(kid_r2, a.hila):
        kidney = cavity & (r2 <= 1.0) & (hilum.r2(u) > 1.0)
        tissue[kidney] = np.where(r2[kidney] <= 0.45, _T.KIDNEY_MEDULLA, _T.KIDNEY_CORTEX)
        label[kidney] = 2

    lesion = cavity & (a.lesion.r2(a.lesion_warp.warp(u)) <= 1.0) & (label != 2)
    tissue[lesion] = _T.LESION
    label[lesion] = 3

    # bone, only outside the organs: spine (vertebral bodies and discs, canal, arch) and ribs
    free = body & (label == 0)
    sx, sy, ssx, ssy = a.spine
    vb = ((x - sx) / ssx) ** 2 + ((y - sy) / ssy) ** 2
    disc = np.mod((q[2] - a.disc_phase) / a.disc_period, 1.0) < 0.2
    tissue[free & (vb <= 1.0)] = _T.MARROW
    tissue[free & (vb <= 1.0) & (vb > 0.6)] = _T.BONE_CORTEX
    tissue[free & (vb <= 1.0) & disc] = _T.DISC
    canal_y = sy + ssy + 0.055
    rc = np.sqrt((x - sx) ** 2 + (y - canal_y) ** 2)
    tissue[free & (rc <= 0.075) & (rc > 0.045) & (y > canal_y - 0.01)] = _T.BONE_CORTEX
    tissue[free & (rc <= 0.045)] = _T.CSF
    spinous = (np.abs(x - sx) < 0.025) & (y > canal_y + 0.06) & (y < canal_y + 0.17)
    tissue[free & spinous & inner] = _T.BONE_CORTEX
    rho = np.sqrt((x / (cax + 0.035)) ** 2 + ((y - a.cavity_dy) / (cay + 0.035)) ** 2)
    rib_level = np.mod((q[2] + 0.25 * y - a.rib_phase) / a.rib_period, 1.0) < 0.22
    anterior = (y < -0.2) & (np.abs(x) < 0.35)
    ribs = free & (np.abs(rho - 1.0) < 0.04) & rib_level & ~anterior & (q[2] > -0.4)
    tissue[ribs] = _T.BONE_CORTEX
    return tissue, label


# ----------------------------------------------------------------------------- intensities


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


# ----------------------------------------------------------------------------- public API

# smallest share of the grid each organ must cover; anatomy is redrawn otherwise
_MIN_FRACTION = {1: 0.01, 2: 0.003, 3: 0.0006}


def make_case(
    rng: SeedLike = 0,
    modality: str = "ct",
    shape: Sequence[int] = (64, 64, 48),
    spacing: Optional[Sequence[float]] = None,
    *,
    orientation: Optional[str] = None,
    anisotropic: Optional[bool] = None,
) -> Tuple[sitk.Image, sitk.Image]:
    """One synthetic case: ``(image, label)``, two SimpleITK images on the same grid.

    Args:
        rng: a numpy Generator (advanced in place) or a seed for ``numpy.random.default_rng``.
        modality: ``"ct"`` (int16 HU) or ``"mri"`` (or ``"mr"``; float32, arbitrary scale).
        shape: approximate grid size (x, y, z) of an isotropic case; the field of view is about
            ``shape * spacing`` mm (``NOMINAL_SPACING_MM`` when ``spacing`` is None).
        spacing: voxel size (x, y, z) in mm for the case; None draws one: isotropic ~1.5 mm, or
            anisotropic ~1.3 x 1.3 x 2.6 mm (more voxels in-plane, fewer slices).
        orientation: one of ``ORIENTATIONS``; None draws one.
        anisotropic: with ``spacing=None``, force the anisotropic (True) or isotropic (False)
            profile; None draws one.

    Returns:
        ``image`` and ``label`` (uint8, values ``LABELS``; every foreground class present).
        For the same ``rng`` the anatomy is the same in world coordinates whatever
        ``orientation``, ``anisotropic`` or ``modality``.
    """
    modality = _check_modality(modality)
    shape3 = _check_shape(shape)
    spacing3 = _check_spacing(spacing)
    if orientation is not None:
        check_choice("orientation", orientation, list(ORIENTATIONS))
    gen = _as_generator(rng)
    geom = _draw_geometry(gen, shape3, spacing3, orientation, anisotropic)
    u = _anatomy_coords(geom)
    n = int(np.prod(geom.size))
    for attempt in range(20):
        tissue, label = _paint(u, _draw_anatomy(gen))
        counts = np.bincount(label.ravel(), minlength=len(LABELS))
        short = {c: int(counts[c]) for c, f in _MIN_FRACTION.items() if counts[c] < f * n}
        if not short:
            break
        log.debug("synthetic anatomy attempt %d too small on grid %s (voxels per class %s); redrawing", attempt, geom.size, short)
    else:
        raise RuntimeError(f"could not fit every class into a {geom.size} grid (voxels per class {short}); use a larger shape.")
    image = _to_image(_render(gen, tissue, u, geom, modality), geom)
    lab = _to_image(label, geom)
    return image, lab


def make_dataset(
    out_dir: Union[str, Path],
    cases: int = 8,
    modality: str = "ct",
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 48),
    spacing: Optional[Sequence[float]] = None,
    test_cases: int = 2,
) -> Path:
    """Write a Decathlon-style synthetic dataset and return its ``dataset.json`` path.

    Layout under ``out_dir``: ``imagesTr/``, ``labelsTr/`` (``cases`` cases), ``imagesTs/``,
    ``labelsTs/`` (``test_cases`` held-out cases, labels included for evaluation), each
    ``<name>.nii.gz`` with ``name = synth<modality>_<index:03d>`` (test indices follow the
    training ones), and ``dataset.json`` (``name``, ``description``, ``modality``, ``labels``,
    ``numTraining``, ``numTest``, ``training`` and ``test`` as lists of ``{"image", "label"}``
    with paths relative to ``out_dir``). Case ``i`` is ``make_case((seed, i), ...)`` with the
    orientation ``ORIENTATIONS[i % 3]`` and, when ``spacing`` is None, anisotropic spacing
    for odd ``i``, so any three consecutive cases cover every orientation and both spacings.
    Files are written atomically; existing files of the same names are replaced.
    """
    modality = _check_modality(modality)
    shape3 = _check_shape(shape)
    spacing3 = _check_spacing(spacing)
    for name, value, low in (("cases", cases, 1), ("test_cases", test_cases, 0), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
    out = Path(out_dir)
    t0 = time.perf_counter()
    entries: Dict[str, List[Dict[str, str]]] = {"Tr": [], "Ts": []}
    for index in range(cases + test_cases):
        split = "Tr" if index < cases else "Ts"
        name = f"synth{modality}_{index:03d}"
        image, label = make_case(
            np.random.default_rng((int(seed), index)),
            modality,
            shape3,
            spacing3,
            orientation=ORIENTATIONS[index % len(ORIENTATIONS)],
            anisotropic=index % 2 == 1,
        )
        rel = {"image": f"./images{split}/{name}.nii.gz", "label": f"./labels{split}/{name}.nii.gz"}
        for img, key in ((image, "image"), (label, "label")):
            write_image(img, out / rel[key])
        entries[split].append(rel)
        log.debug("wrote %s: size %s, spacing %s", name, image.GetSize(), image.GetSpacing())
    manifest = {
        "name": f"VolsegSynth{MODALITIES[modality]}",
        "description": (
            f"Synthetic abdominal {MODALITIES[modality]} phantoms (liver, kidneys, liver lesion; "
            "spine and ribs present but unlabelled) made by volseg.data.synth.make_dataset"
        ),
        "reference": "volseg.data.synth",
        "licence": "CC0-1.0",
        "release": __version__,
        "tensorImageSize": "3D",
        "modality": {"0": MODALITIES[modality]},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": cases,
        "numTest": test_cases,
        "training": entries["Tr"],
        "test": entries["Ts"],
        "synth": {
            "generator_version": _GENERATOR_VERSION,
            "seed": int(seed),
            "shape": list(shape3),
            "spacing": list(spacing3) if spacing3 is not None else None,
        },
    }
    path = write_text(out / "dataset.json", json.dumps(manifest, indent=2) + "\n")
    log.info(
        "wrote %d training and %d test synthetic %s cases to %s in %.1f s",
        cases, test_cases, MODALITIES[modality], out, time.perf_counter() - t0,
    )
    return path
