"""A case's scan, prediction and truth packed small for the viewer page.

Each volume is cropped to the foreground box (prediction or truth > 0) plus a margin, stored as
uint8 / uint16 NIfTI (the scan with NIfTI's ``scl_slope``/``scl_inter``, so NiiVue shows HU or
the scan's own units), gzipped and base64-encoded for a ``<script>`` block. When a case is still
over its byte budget it is subsampled by 2, 3, ... along every axis (every k-th voxel: exact
values at existing voxel centres, which keeps label borders honest, unlike interpolation) and
the case says so. Geometry comes from the files (SimpleITK, LPS) and is written as the NIfTI
RAS affine, so each layer lands where the scan is.
"""

from __future__ import annotations

import base64
import gzip
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import numpy as np

from ..data.io import read_image
from ..data.io.write import nifti_affine
from .niivue import ViewerError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
Layer = Union["sitk.Image", np.ndarray, str, Path]

#: windows (lo, hi) in HU offered for CT scans: (level - width/2, level + width/2)
CT_WINDOWS: Dict[str, Tuple[float, float]] = {
    "soft tissue (W400 L40)": (-160.0, 240.0),
    "lung (W1500 L-600)": (-1350.0, 150.0),
    "bone (W1800 L400)": (-500.0, 1300.0),
    "brain (W80 L40)": (0.0, 80.0),
    "liver (W150 L60)": (-15.0, 135.0),
}

__all__ = ["CT_WINDOWS", "ViewerCase", "pack_case"]


@dataclass(frozen=True)
class ViewerCase:
    """One case ready for the page: base64 .nii.gz layers and what was done to them."""

    name: str
    image: Optional[str]  #: base64 of a .nii.gz (uint8/uint16 with scl_slope/inter), or None
    pred: Optional[str]  #: base64 .nii.gz label map (uint8/uint16), or None
    truth: Optional[str]
    ct: bool  #: the scan looks like CT in HU (integer, values below -500): offer CT windows
    window: Tuple[float, float]  #: default display window (1st-99th percentile of the crop)
    value_range: Tuple[float, float]  #: min, max of the stored scan
    crop: Tuple[Tuple[int, int], ...]  #: (start, stop) voxel indices along x, y, z of the original grid
    shape: Tuple[int, int, int]  #: stored grid (x, y, z) after cropping and subsampling
    step: int  #: subsampling step (1: every voxel)
    note: str  #: one line for the page: crop, subsampling, quantisation
    label_values: Tuple[int, ...] = ()  #: foreground values found in the prediction and truth

    @property
    def nbytes(self) -> int:
        """Characters the case adds to the page (base64)."""
        return sum(len(s) for s in (self.image, self.pred, self.truth) if s)

    def to_json(self) -> dict:
        return {"name": self.name, "image": self.image, "pred": self.pred, "truth": self.truth, "ct": self.ct,
                "window": list(self.window), "range": list(self.value_range), "note": self.note}  # fmt: skip


def _as_image(x: Optional[Layer], what: str, like: Optional[sitk.Image] = None) -> Optional[sitk.Image]:
    import SimpleITK as sitk

    if x is None:
        return None
    if isinstance(x, (str, Path)):
        return read_image(x)
    if isinstance(x, np.ndarray):
        if x.ndim != 3:
            raise ViewerError(f"{what}: expected a 3D array [z, y, x], got shape {x.shape}.")
        img = sitk.GetImageFromArray(x)
        if like is not None and like.GetSize() == img.GetSize():
            img.CopyInformation(like)
        return img
    if not hasattr(x, "GetSize"):
        raise ViewerError(f"{what}: expected a path, a SimpleITK image or a numpy array [z, y, x], got {type(x).__name__}.")
    if x.GetDimension() != 3 or x.GetNumberOfComponentsPerPixel() != 1:
        raise ViewerError(f"{what}: expected one 3D scalar volume, got {x.GetDimension()}D with {x.GetNumberOfComponentsPerPixel()} component(s).")
    return x


def _label_array(img: sitk.Image, what: str) -> np.ndarray:
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(img)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ViewerError(f"{what}: label values must be whole numbers; found fractions or NaN (is this a probability map?).")
    if arr.size and arr.min() < 0:
        raise ViewerError(f"{what}: label values must be >= 0, found {arr.min()}.")
    return arr


def _box(masks: List[np.ndarray], shape: Tuple[int, ...], margin: Tuple[int, int, int]) -> Tuple[Tuple[int, int], ...]:
    """(start, stop) per array axis z, y, x of the union of ``masks > 0``, widened by ``margin``."""
    fg = np.zeros(shape, dtype=bool)
    for m in masks:
        fg |= m > 0
    if not fg.any():
        return tuple((0, n) for n in shape)
    box = []
    for axis, n in enumerate(shape):
        hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((max(0, int(hit[0]) - margin[axis]), min(n, int(hit[-1]) + 1 + margin[axis])))
    return tuple(box)


def _looks_like_ct(img: sitk.Image) -> bool:
    """Whole-number values reaching below -500 (air in HU) over every 4th voxel of the whole
    scan: the air outside the crop is what tells a CT in HU apart from other scans."""
    import SimpleITK as sitk

    sample = sitk.GetArrayViewFromImage(img)[::4, ::4, ::4]
    if not sample.size or float(sample.min()) > -500:
        return False
    return sample.dtype.kind == "i" or bool(np.array_equal(sample, np.round(sample)))


def _nifti_b64(img: sitk.Image, dtype: type, label: bool) -> str:
    """base64 of a gzipped NIfTI-1 of ``img`` (RAS affine), stored as ``dtype``; a scan whose
    values do not fit is scaled by nibabel (scl_slope/scl_inter), labels never are."""
    import nibabel as nib
    import SimpleITK as sitk

    arr = np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))  # [z,y,x] -> [x,y,z]
    if label:
        arr = arr.astype(dtype)
    nii = nib.Nifti1Image(arr, nifti_affine(img))
    nii.set_data_dtype(dtype)
    nii.header.set_xyzt_units("mm")
    if label:
        nii.header.set_intent("label")
    raw = nii.to_bytes()
    return base64.b64encode(gzip.compress(raw, compresslevel=6, mtime=0)).decode("ascii")


def _scan_dtype(arr: np.ndarray) -> Tuple[type, str]:
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if arr.dtype.kind in "iub" and lo >= 0 and hi <= 255:
        return np.uint8, "uint8"
    if arr.dtype.kind in "iub" and hi - lo <= 65535:
        return np.uint16, "uint16 (exact, offset by scl_inter)"
    return np.uint16, f"uint16 (quantised: steps of {(hi - lo) / 65535:.3g})"


def _encode(name: str, img, pred, truth, box, step: int, stats) -> ViewerCase:
    (z0, z1), (y0, y1), (x0, x1) = box
    parts = []
    for what, layer in (("image", img), ("pred", pred), ("truth", truth)):
        if layer is None:
            parts.append(None)
            continue
        sub = layer[x0:x1:step, y0:y1:step, z0:z1:step]  # SimpleITK slicing keeps the geometry right
        if what == "image":
            dtype, how = _scan_dtype(stats["arr"])
        else:
            dtype = np.uint8 if stats["max_label"] <= 255 else np.uint16
        parts.append(_nifti_b64(sub, dtype, label=what != "image"))
        shape = sub.GetSize()
    full = stats["ref"]
    note = [f"cropped to {x1 - x0}x{y1 - y0}x{z1 - z0} of {'x'.join(map(str, full.GetSize()))} voxels (foreground box + margin)"
            if (x1 - x0, y1 - y0, z1 - z0) != tuple(full.GetSize()) else "whole volume"]  # fmt: skip
    if step > 1:
        note.append(f"every {step}th voxel along each axis (to keep the page under its size cap)")
    if img is not None:
        note.append(f"scan stored as {how}")
    return ViewerCase(name=name, image=parts[0], pred=parts[1], truth=parts[2], ct=stats["ct"], window=stats["window"],
                      value_range=stats["range"], crop=((x0, x1), (y0, y1), (z0, z1)), shape=tuple(shape), step=step,
                      note="; ".join(note), label_values=stats["values"])  # fmt: skip


def pack_case(
    name: str,
    image: Optional[Layer] = None,
    pred: Optional[Layer] = None,
    truth: Optional[Layer] = None,
    margin_mm: float = 10.0,
    max_bytes: Optional[int] = None,
    max_step: int = 4,
) -> ViewerCase:
    """Crop, cast and encode one case for the viewer. ``image``/``pred``/``truth``: paths,
    SimpleITK images or arrays ``[z, y, x]`` (an array takes the geometry of the scan when the
    sizes match); all given layers must share one voxel grid. ``max_bytes``: the most base64
    characters the case may take; it is subsampled up to ``max_step`` to fit, else refused with
    :class:`ViewerError`."""
    import SimpleITK as sitk

    img = _as_image(image, "scan")
    p = _as_image(pred, "prediction", like=img)
    t = _as_image(truth, "truth", like=img if img is not None else p)
    given = {k: v for k, v in (("scan", img), ("prediction", p), ("truth", t)) if v is not None}
    if not given:
        raise ViewerError(f"{name}: nothing to show; give a scan, a prediction or a truth.")
    sizes = {k: v.GetSize() for k, v in given.items()}
    if len(set(sizes.values())) > 1:
        raise ViewerError(f"{name}: layers differ in size (x, y, z) {sizes}; the scan, prediction and truth must share one voxel grid.")
    ref = next(iter(given.values()))
    shape_zyx = tuple(reversed(ref.GetSize()))
    masks = [_label_array(v, f"{name} {k}") for k, v in given.items() if k != "scan"]
    spacing_zyx = tuple(reversed(ref.GetSpacing()))
    margin = tuple(int(math.ceil(margin_mm / s)) for s in spacing_zyx)
    box = _box(masks, shape_zyx, margin)  # type: ignore[arg-type]
    crop = tuple(slice(a, b) for a, b in box)
    values = sorted(set().union(*[np.unique(m[crop]).tolist() for m in masks]) - {0}) if masks else []
    stats: dict = {"values": tuple(int(v) for v in values), "ref": ref, "max_label": max([int(m.max()) for m in masks if m.size] or [0]), "ct": False, "window": (0.0, 1.0), "range": (0.0, 1.0)}
    if img is not None:
        (z0, z1), (y0, y1), (x0, x1) = box
        arr = sitk.GetArrayViewFromImage(img)[z0:z1, y0:y1, x0:x1]
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ViewerError(f"{name} scan: holds NaN or infinite values; the viewer cannot window it.")
        lo, hi = np.percentile(arr, [1, 99]) if arr.size else (0.0, 1.0)
        stats.update(arr=arr, range=(float(arr.min()), float(arr.max())), window=(float(lo), float(hi if hi > lo else lo + 1)),
                     ct=_looks_like_ct(img))  # fmt: skip
    for step in range(1, max_step + 1):
        case = _encode(name, img, p, t, box, step, stats)
        if max_bytes is None or case.nbytes <= max_bytes:
            if step > 1:
                log.warning("%s: subsampled by %d to fit the viewer's %d kB share of the size cap.", name, step, max_bytes // 1000)  # type: ignore[operator]
            return case
    raise ViewerError(f"{name}: {case.nbytes // 1000} kB even at every {max_step}th voxel, over its {max_bytes // 1000} kB share of the size cap.")  # type: ignore[operator]
