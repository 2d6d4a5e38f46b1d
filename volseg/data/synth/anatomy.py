"""The phantom's anatomy: random organ shapes in normalised coordinates and the tissue and label
maps painted from them. Nothing here depends on the voxel grid or the modality."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, List, Sequence, Tuple

import numpy as np

from .geometry import _rotation


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


def _draw_kidneys(rng: np.random.Generator, j: Callable[[float], float]) -> Tuple[List[_Ellipsoid], List[_Ellipsoid], List[_Fourier]]:
    """Both kidneys (right first), their hila and their warps; ``j(s)`` draws from [-s, s]."""
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
    return kidneys, hila, kidney_warps


def _draw_lesion(rng: np.random.Generator, right_lobe: _Ellipsoid, left_lobe: _Ellipsoid, liver_warp: _Fourier,
                 kidneys: Sequence[_Ellipsoid]) -> _Ellipsoid:
    """The lesion: it sits well inside the liver, away from the kidney."""
    for _ in range(200):
        radius = rng.uniform(0.13, 0.17)
        centre = right_lobe.centre + rng.uniform(-0.5, 0.5, size=3) * right_lobe.semi
        p = liver_warp.warp(centre[:, None])
        inside = float(np.minimum(right_lobe.r2(p), left_lobe.r2(p))[0]) < 0.45
        clear = min(float(k.r2(centre[:, None])[0]) for k in kidneys) > 1.8
        if inside and clear:
            break
    return _Ellipsoid(centre, radius * rng.uniform(0.85, 1.15, size=3), _rot3(rng, (90, 90, 90)))


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

    kidneys, hila, kidney_warps = _draw_kidneys(rng, j)
    lesion = _draw_lesion(rng, right_lobe, left_lobe, liver_warp, kidneys)

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

    _paint_bone(tissue, q, body & (label == 0), inner, cax, cay, a)
    return tissue, label


def _paint_bone(tissue: np.ndarray, q: np.ndarray, free: np.ndarray, inner: np.ndarray, cax: np.ndarray, cay: np.ndarray,
                a: _Anatomy) -> None:
    """Bone into ``tissue`` where ``free`` (inside the body, outside the organs): the spine
    (vertebral bodies and discs, canal, arch) and the ribs round the cavity (semi-axes ``cax``,
    ``cay``); ``q`` are the body-warped coordinates, ``inner`` the inside of the fat layer."""
    x, y = q[0], q[1]
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
