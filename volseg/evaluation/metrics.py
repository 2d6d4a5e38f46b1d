"""Segmentation metrics per case and class, their per-class summaries and the summary table.

Arrays are label maps indexed ``[z, y, x]`` (SimpleITK order); ``spacing`` given to
:func:`evaluate_case` is in mm **in the same axis order as the arrays** (the reverse of
``sitk.Image.GetSpacing()``, which is ``(x, y, z)``). :func:`~volseg.evaluation.files.evaluate`
reads images and does the reversal itself.

Metrics per foreground class (MONAI implementations; surfaces are the mask's edge voxels, i.e.
voxels removed by a binary erosion, and distances are between edge-voxel centres in mm):

- ``dice``, ``iou``: overlap, in [0, 1].
- ``hd95``: 95th-percentile symmetric Hausdorff distance (mm): the larger of the two directed
  95th percentiles, as MONAI computes it.
- ``assd``: average symmetric surface distance (mm): mean over the edge voxels of both masks.
- ``nsd``: normalised surface Dice at ``tolerance_mm``: the fraction of edge voxels of both masks
  lying within the tolerance of the other mask's surface.
- ``volume_pred_ml``, ``volume_true_ml``: voxel count x voxel volume / 1000.

Empty-mask convention (a class absent from the prediction and/or the truth):

- both empty: ``dice = iou = nsd = 1``, ``hd95 = assd = 0`` (correctly predicted absence);
- exactly one empty: ``dice = iou = nsd = 0``, ``hd95 = assd = NaN``. The NaN is kept in the
  per-case rows (``metrics.csv``) but **excluded from the means**; the summary counts it per
  class and metric as ``n_nan`` next to ``n`` (valid values), so no NaN enters a mean silently.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..metrics import EvaluationError

__all__ = [
    "METRICS",
    "VOLUMES",
    "FIGURES",
    "CSV_COLUMNS",
    "EvaluationError",
    "EvaluationResult",
    "evaluate_case",
    "summarize",
    "worst_cases",
    "format_summary_table",
]

METRICS: Tuple[str, ...] = ("dice", "iou", "hd95", "assd", "nsd")
VOLUMES: Tuple[str, ...] = ("volume_pred_ml", "volume_true_ml")
# the structure figures (.figures): components of each mask, mean intensity under it when the scan is known
FIGURES: Tuple[str, ...] = ("mean_pred", "mean_true", "components_pred", "components_true")
CSV_COLUMNS: Tuple[str, ...] = ("case", "label", "class") + METRICS + VOLUMES + FIGURES + ("pred_path", "truth_path", "image_path")
EMPTY_CONVENTION = (
    "both masks empty: dice=iou=nsd=1, hd95=assd=0; exactly one empty: dice=iou=nsd=0, "
    "hd95=assd=NaN (kept per case, excluded from means, counted as n_nan)"
)


@dataclass
class EvaluationResult:
    """``rows``: one dict per case x foreground class (keys :data:`CSV_COLUMNS`); ``summary``:
    per-class statistics as written to ``summary.json``; ``output``: the folder written, if any."""

    rows: List[dict]
    summary: dict
    output: Optional[Path] = None
    labels: Dict[int, str] = field(default_factory=dict)

    def worst_cases(self) -> List[str]:
        return worst_cases(self.rows)


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


def evaluate_case(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[int, str],
    tolerance_mm: float = 2.0,
    regions: Optional[Mapping[int, Sequence[int]]] = None,
) -> List[dict]:
    """Metrics of one case, one dict per foreground class (label 0 is skipped).

    ``pred``, ``truth``: integer label maps of equal shape ``(*spatial)`` (2D or 3D, e.g.
    ``[z, y, x]``); ``spacing``: voxel size in mm in the same axis order as the arrays;
    ``labels``: value -> class name; ``tolerance_mm``: NSD tolerance; ``regions``: value ->
    the label values whose union is that class (region evaluation: ``labels`` maps each
    region's ``regions_class_order`` value to the region's name). Each dict holds ``label``,
    ``class`` and :data:`METRICS` + :data:`VOLUMES` (distances in mm, volumes in ml). Empty masks
    follow the module's convention (NaN distances when exactly one mask is empty).
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise EvaluationError(f"prediction shape {pred.shape} differs from reference shape {truth.shape}.")
    if len(spacing) != pred.ndim:
        raise EvaluationError(f"spacing {tuple(spacing)} has {len(spacing)} values for {pred.ndim}D arrays of shape {pred.shape}.")
    spacing = tuple(float(s) for s in spacing)
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise EvaluationError(f"spacing {spacing} must be positive finite mm values.")
    if not (tolerance_mm >= 0 and math.isfinite(tolerance_mm)):
        raise EvaluationError(f"tolerance_mm must be a finite value >= 0 mm, got {tolerance_mm}.")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for value, name in sorted(labels.items()):
        if int(value) == 0:
            continue
        if regions is not None:
            p, t = np.isin(pred, list(regions[value])), np.isin(truth, list(regions[value]))
        else:
            p, t = pred == value, truth == value
        n_p, n_t = int(p.sum()), int(t.sum())
        row = {"label": int(value), "class": str(name)}
        if n_p == 0 and n_t == 0:
            row.update(dice=1.0, iou=1.0, hd95=0.0, assd=0.0, nsd=1.0)
        elif n_p == 0 or n_t == 0:
            row.update(dice=0.0, iou=0.0, hd95=math.nan, assd=math.nan, nsd=0.0)
        else:
            row.update(_monai_metrics(p, t, spacing, tolerance_mm))
        row.update(volume_pred_ml=n_p * voxel_ml, volume_true_ml=n_t * voxel_ml)
        rows.append(row)
    return rows


def _monai_metrics(p: np.ndarray, t: np.ndarray, spacing: Tuple[float, ...], tolerance_mm: float) -> dict:
    """Metrics of two non-empty binary masks. One class per call, as a (1, 1, *spatial) one-hot
    tensor: stacking all classes would hold C float copies of a full CT volume at once."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    yp = torch.from_numpy(np.ascontiguousarray(p)[None, None]).float()
    yt = torch.from_numpy(np.ascontiguousarray(t)[None, None]).float()
    with warnings.catch_warnings():
        # MONAI's own internals trigger a FutureWarning (get_mask_edges) on every call.
        warnings.simplefilter("ignore", FutureWarning)
        out = {
            "dice": compute_dice(yp, yt, include_background=True),
            "iou": compute_iou(yp, yt, include_background=True),
            "hd95": compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=spacing),
            "assd": compute_average_surface_distance(yp, yt, include_background=True, symmetric=True, spacing=spacing),
            "nsd": compute_surface_dice(yp, yt, [float(tolerance_mm)], include_background=True, spacing=spacing),
        }
    return {k: float(v.reshape(-1)[0]) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Statistics and tables
# --------------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict:
    vals = np.array([v for v in values if v is not None], dtype=float)
    ok = vals[np.isfinite(vals)]
    n = int(ok.size)
    return {
        "mean": float(ok.mean()) if n else None,
        "sd": float(ok.std(ddof=1)) if n > 1 else (0.0 if n == 1 else None),
        "n": n,
        "n_nan": int(vals.size - n),
    }


def summarize(rows: Sequence[dict], labels: Mapping[int, str], tolerance_mm: float = 2.0) -> dict:
    """Per-class mean, sd (sample, ddof=1; 0 for one case), ``n`` (finite values) and ``n_nan``
    of every metric, plus ``mean_foreground_dice`` (mean over classes of the class mean dice).
    NaN never enters a mean; a statistic without any finite value is ``None`` (JSON null)."""
    classes = {}
    for value, name in sorted(labels.items()):
        if int(value) == 0:
            continue
        sel = [r for r in rows if int(r["label"]) == int(value)]
        classes[str(name)] = {"label": int(value), **{m: _stats([r[m] for r in sel]) for m in METRICS},
                              "figures": {f: _stats([r.get(f) for r in sel]) for f in VOLUMES + FIGURES}}
    dice_means = [c["dice"]["mean"] for c in classes.values() if c["dice"]["mean"] is not None]
    return {
        "n_cases": len({r["case"] for r in rows}),
        "tolerance_mm": float(tolerance_mm),
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "classes": classes,
        "mean_foreground_dice": float(np.mean(dice_means)) if dice_means else None,
        "empty_mask_convention": EMPTY_CONVENTION,
    }


def worst_cases(rows: Sequence[dict]) -> List[str]:
    """Case names ordered by their mean dice over classes, worst first."""
    per_case: Dict[str, List[float]] = {}
    for r in rows:
        per_case.setdefault(r["case"], []).append(float(r["dice"]))
    return sorted(per_case, key=lambda c: (float(np.nanmean(per_case[c])), c))


def _pair(figures: dict, a: str, b: str) -> str:
    """``"pred / true"`` class means of two figures, ``-`` where none."""
    return " / ".join("-" if figures.get(k, {}).get("mean") is None else f"{figures[k]['mean']:.4g}" for k in (a, b))


def format_summary_table(result: Union[EvaluationResult, dict]) -> str:
    """Plain-text table (classes x metrics, ``mean ± sd``) of an :class:`EvaluationResult` or a
    ``summary.json`` dict; NaN counts are shown next to the values they were excluded from."""
    summary = result.summary if isinstance(result, EvaluationResult) else result
    heads = ["class", "n"] + [f"{m} (mm)" if m in ("hd95", "assd") else m for m in METRICS] + ["volume ml pred/true", "mean pred/true"]
    lines = []
    for name, c in summary["classes"].items():
        cells = [name, str(max(c[m]["n"] + c[m]["n_nan"] for m in METRICS))]
        for m in METRICS:
            s, digits = c[m], 2 if m in ("hd95", "assd") else 3
            cell = "-" if s["mean"] is None else f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"
            cells.append(cell + (f" ({s['n_nan']} NaN)" if s["n_nan"] else ""))
        fig = c.get("figures", {})  # summaries written before the figures have none
        cells += [_pair(fig, "volume_pred_ml", "volume_true_ml"), _pair(fig, "mean_pred", "mean_true")]
        lines.append(cells)
    widths = [max(len(r[i]) for r in [heads] + lines) for i in range(len(heads))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(heads), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines]
    mfd = summary.get("mean_foreground_dice")
    out.append(f"mean foreground dice: {mfd:.4f}" if mfd is not None else "mean foreground dice: -")
    out.append(f"cases: {summary.get('n_cases', '?')}, NSD tolerance: {summary.get('tolerance_mm', '?')} mm")
    return "\n".join(out)
