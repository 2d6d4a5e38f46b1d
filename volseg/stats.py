"""Per-structure statistics of a label map on its scan: what a radiologist measures by hand.

For each foreground label of ``labels`` (a ``[z, y, x]`` array on the grid of ``image``):

- ``voxels``: the voxel count; ``volume_ml``: voxel count x voxel volume (spacing product) / 1000;
- ``intensity``: mean, std (population, ddof=0), median, 5th and 95th percentile of the scan's
  voxels under the mask, in the scan's own units: the values the reader returns, which for DICOM
  are after each file's Rescale Slope/Intercept (HU for CT) and for NIfTI after ``scl_slope``/
  ``scl_inter``; never the network's normalised intensities;
- ``bbox_mm``: ``{"min": [x, y, z], "max": [x, y, z]}`` of the voxel *centres* under the mask,
  in world coordinates (mm, DICOM patient LPS: +x left, +y posterior, +z superior, SimpleITK's
  convention for every format, NIfTI included); for an oblique scan this is the world-axis box
  around the mask's voxel centres;
- ``centroid_mm``: the mean of those voxel centres (world LPS, mm);
- ``components``: connected components (26-connectivity, as ``scipy.ndimage.label`` with a full
  structuring element).

An empty label has ``voxels = 0``, ``volume_ml = 0`` and ``null`` intensity, bbox, centroid
(``None`` in Python; never NaN, which JSON cannot hold and a mean would swallow).
"""

from __future__ import annotations

import csv
import io
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["COORDINATES", "CSV_COLUMNS", "statistics", "label_statistics", "statistics_csv"]

COORDINATES = "LPS (DICOM patient: +x left, +y posterior, +z superior), mm, voxel centres"
CSV_COLUMNS = (
    "case", "label", "name", "voxels", "volume_ml", "mean", "std", "median", "p5", "p95",
    "bbox_min_x", "bbox_min_y", "bbox_min_z", "bbox_max_x", "bbox_max_y", "bbox_max_z",
    "centroid_x", "centroid_y", "centroid_z", "components",
)


def _world(image, index_zyx: np.ndarray) -> np.ndarray:
    """World LPS points (n, 3) of ``[z, y, x]`` voxel indices (n, 3): origin + D diag(s) i."""
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    s = np.array(image.GetSpacing(), dtype=float)
    return np.array(image.GetOrigin(), dtype=float) + (index_zyx[:, ::-1] * s) @ d.T


def label_statistics(mask: np.ndarray, values: Optional[np.ndarray], image) -> dict:
    """The figures of one binary ``mask`` (``[z, y, x]`` bool); ``values``: the scan's voxels
    (same shape) or ``None`` for no intensity figures; ``image``: the SimpleITK grid."""
    from scipy import ndimage

    n = int(np.count_nonzero(mask))
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    out: dict = {"voxels": n, "volume_ml": n * voxel_ml, "intensity": None, "bbox_mm": None, "centroid_mm": None, "components": 0}
    if n == 0:
        return out
    if values is not None:
        v = values[mask].astype(np.float64)
        p5, median, p95 = np.percentile(v, [5, 50, 95])
        out["intensity"] = {"mean": float(v.mean()), "std": float(v.std()), "median": float(median), "p5": float(p5), "p95": float(p95)}
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    sub = np.argwhere(mask[box]) + np.array([sl.start for sl in box])  # only the box's voxels: cheap on a big scan
    pts = _world(image, sub.astype(float))
    out["bbox_mm"] = {"min": pts.min(axis=0).tolist(), "max": pts.max(axis=0).tolist()}
    out["centroid_mm"] = pts.mean(axis=0).tolist()
    out["components"] = int(ndimage.label(mask, structure=np.ones((3,) * mask.ndim))[1])
    return out


def statistics(labels, image, label_names: Optional[Mapping[int, str]] = None, case: str = "", unit: str = "") -> dict:
    """Per-label figures of a label map on its scan (see the module docstring); ``volseg.statistics``.

    ``labels``: a label file, a SimpleITK label image, or a ``[z, y, x]`` integer array on
    ``image``'s grid; ``image``: the scan (a file or DICOM folder, read as volseg reads scans, or
    a SimpleITK image; a list of channels: the first gives the intensities); ``label_names``:
    value -> name (0, background, is skipped; default: ``label_<value>`` for each value found).
    ``unit``: what the intensities are (``"HU"`` for CT), recorded as given. Returns ``{"case",
    "coordinates", "intensity_unit", "labels": {name: {"label": value, ...figures}}}``, JSON-ready.
    A label file on another grid than the scan raises ``ValueError`` naming both grids."""
    import SimpleITK as sitk

    from .data.io import read_image, read_label, same_geometry

    if isinstance(image, (list, tuple)):
        image = image[0]
    if not isinstance(image, sitk.Image):
        image = read_image(image)
    if not isinstance(labels, (sitk.Image, np.ndarray)):
        labels = read_label(labels)
    if isinstance(labels, sitk.Image):
        diff = same_geometry(labels, image)
        if diff:
            raise ValueError(f"the label map and the scan are on different voxel grids ({diff}); resample the labels onto the scan first.")
    arr = sitk.GetArrayViewFromImage(labels) if isinstance(labels, sitk.Image) else np.asarray(labels)
    if label_names is None:
        label_names = {int(v): f"label_{int(v)}" for v in np.unique(arr) if v != 0}
    values = sitk.GetArrayViewFromImage(image)
    if arr.shape != values.shape:
        raise ValueError(f"label map of shape {list(arr.shape)} is not on the scan's grid {list(values.shape)} ([z, y, x]); resample it first.")
    per: Dict[str, dict] = {}
    for value, name in sorted(label_names.items()):
        if int(value) != 0:
            per[str(name)] = {"label": int(value), **label_statistics(arr == value, values, image)}
    return {"case": case, "coordinates": COORDINATES, "intensity_unit": unit or "scanner units", "labels": per}


def _row(case: str, name: str, s: dict) -> List:
    inten = s["intensity"] or {}
    box = s["bbox_mm"] or {"min": [None] * 3, "max": [None] * 3}
    cen = s["centroid_mm"] or [None] * 3
    return [case, s["label"], name, s["voxels"], s["volume_ml"], *(inten.get(k) for k in ("mean", "std", "median", "p5", "p95")),
            *box["min"], *box["max"], *cen, s["components"]]


def statistics_csv(results: Sequence[dict]) -> str:
    """One CSV (header :data:`CSV_COLUMNS`) of several :func:`statistics` results: one row per
    case and label; an empty figure is an empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for res in results:
        for name, s in res["labels"].items():
            w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in _row(res["case"], name, s)])
    return buf.getvalue()
