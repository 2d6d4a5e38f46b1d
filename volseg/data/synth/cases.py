"""One synthetic case (:func:`make_case`): the arguments checked, then geometry, anatomy and
intensities drawn in that order from one random generator."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ...config import ConfigError, check_choice
from .anatomy import _draw_anatomy, _paint
from .geometry import _MIN_SIZE, ORIENTATIONS, Shape3, Spacing3, _anatomy_coords, _draw_geometry
from .render import _render, _to_image

if TYPE_CHECKING:  # SimpleITK is imported where used: importing this module is cheap
    import SimpleITK as sitk

log = logging.getLogger(__name__)

SeedLike = Union[int, Sequence[int], np.random.Generator]

LABELS: Dict[int, str] = {0: "background", 1: "liver", 2: "kidney", 3: "lesion"}
MODALITIES: Dict[str, str] = {"ct": "CT", "mri": "MRI"}
#: Other accepted spellings (the CLI offers ``mr``, as DICOM's modality code does).
MODALITY_ALIASES: Dict[str, str] = {"mr": "mri"}


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
        raise ConfigError(f"shape={shape!r} must be 3 integers >= {_MIN_SIZE} (voxels along x, y, z).")
    return out  # type: ignore[return-value]


def _check_output(out_dir, overwrite: bool, **counts: int) -> Path:
    """Each count ``name=value`` an integer >= its floor (1 for ``cases`` and ``sparse``, else 0),
    and ``out_dir`` free of a ``dataset.json`` unless ``overwrite``; returns ``Path(out_dir)``."""
    for name, value in counts.items():
        low = 1 if name in ("cases", "sparse") else 0
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}={value!r} must be an integer >= {low}.")
    out = Path(out_dir)
    if (out / "dataset.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a dataset ({out / 'dataset.json'}); choose another folder, "
                          "or replace it with overwrite=True (volseg synth --force).")
    return out


def _check_spacing(spacing: Optional[Sequence[float]]) -> Optional[Spacing3]:
    if spacing is None:
        return None
    try:
        out = tuple(float(s) for s in spacing)
        ok = len(out) == 3 and all(math.isfinite(s) and s > 0 for s in out)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"spacing={spacing!r} must be None or 3 positive numbers (mm along x, y, z).")
    return out  # type: ignore[return-value]


def _as_generator(rng: SeedLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"rng={rng!r} must be a numpy Generator, a non-negative int or a sequence of them ({exc}).") from None


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
