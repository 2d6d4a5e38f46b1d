"""Where a phantom sits: each case's voxel grid (spacing, direction, origin) placed in the
anatomy's world space, and the normalised anatomy coordinates of its voxels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

Shape3 = Tuple[int, int, int]
Spacing3 = Tuple[float, float, float]

#: Voxel axis codes of the written NIfTI (nibabel's ``aff2axcodes``). In SimpleITK terms "LPS"
#: is the identity direction and "RAS" is ``diag(-1, -1, 1)``; "oblique" is either of them
#: rotated by 5-20 degrees about one axis.
ORIENTATIONS: Tuple[str, ...] = ("LPS", "RAS", "oblique")
#: Spacing of an isotropic case when no ``spacing`` is given; the field of view is about
#: ``shape * NOMINAL_SPACING_MM`` for every case.
NOMINAL_SPACING_MM = 1.5
_MIN_SIZE = 16  # voxels per axis; smaller grids cannot hold the small lesion


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
