"""Segmentation metrics per case and class, and the evaluation of prediction folders.

Arrays are label maps indexed ``[z, y, x]`` (SimpleITK order); ``spacing`` given to
:func:`evaluate_case` is in mm **in the same axis order as the arrays** (the reverse of
``sitk.Image.GetSpacing()``, which is ``(x, y, z)``). :func:`evaluate` reads images and does the
reversal itself.

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

import csv
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..data.io import atomic_write, case_name, is_image_path, write_text
from ..data.manifest import load_manifest
from ..metrics import EvaluationError, load_label_pair

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
LabelsArg = Union[None, Mapping[int, str], PathLike]

METRICS: Tuple[str, ...] = ("dice", "iou", "hd95", "assd", "nsd")
VOLUMES: Tuple[str, ...] = ("volume_pred_ml", "volume_true_ml")
CSV_COLUMNS: Tuple[str, ...] = ("case", "label", "class") + METRICS + VOLUMES + ("pred_path", "truth_path", "image_path")
EMPTY_CONVENTION = (
    "both masks empty: dice=iou=nsd=1, hd95=assd=0; exactly one empty: dice=iou=nsd=0, "
    "hd95=assd=NaN (kept per case, excluded from means, counted as n_nan)"
)

__all__ = [
    "METRICS",
    "EvaluationError",
    "EvaluationResult",
    "evaluate_case",
    "evaluate",
    "evaluate_pairs",
    "summarize",
    "load_results",
    "worst_cases",
    "format_summary_table",
]




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
) -> List[dict]:
    """Metrics of one case, one dict per foreground class (label 0 is skipped).

    ``pred``, ``truth``: integer label maps of equal shape ``(*spatial)`` (2D or 3D, e.g.
    ``[z, y, x]``); ``spacing``: voxel size in mm in the same axis order as the arrays;
    ``labels``: value -> class name; ``tolerance_mm``: NSD tolerance. Each dict holds ``label``,
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
        classes[str(name)] = {"label": int(value), **{m: _stats([r[m] for r in sel]) for m in METRICS}}
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


def format_summary_table(result: Union[EvaluationResult, dict]) -> str:
    """Plain-text table (classes x metrics, ``mean ± sd``) of an :class:`EvaluationResult` or a
    ``summary.json`` dict; NaN counts are shown next to the values they were excluded from."""
    summary = result.summary if isinstance(result, EvaluationResult) else result
    heads = ["class", "n"] + [f"{m} (mm)" if m in ("hd95", "assd") else m for m in METRICS]
    lines = []
    for name, c in summary["classes"].items():
        cells = [name, str(max(c[m]["n"] + c[m]["n_nan"] for m in METRICS))]
        for m in METRICS:
            s, digits = c[m], 2 if m in ("hd95", "assd") else 3
            cell = "-" if s["mean"] is None else f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"
            cells.append(cell + (f" ({s['n_nan']} NaN)" if s["n_nan"] else ""))
        lines.append(cells)
    widths = [max(len(r[i]) for r in [heads] + lines) for i in range(len(heads))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(heads), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines]
    mfd = summary.get("mean_foreground_dice")
    out.append(f"mean foreground dice: {mfd:.4f}" if mfd is not None else "mean foreground dice: -")
    out.append(f"cases: {summary.get('n_cases', '?')}, NSD tolerance: {summary.get('tolerance_mm', '?')} mm")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Files and folders
# --------------------------------------------------------------------------------------------


def _strip(name: str, suffixes: Sequence[str]) -> str:
    for s in suffixes:
        if name.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return name


def _collect(path: Path, what: str, strip: Sequence[str] = ()) -> Dict[str, Path]:
    """Case name -> image file, for a file or a folder of image files."""
    if not path.exists():
        raise EvaluationError(f"{what} {path}: no such file or folder.")
    if path.is_file():
        return {_strip(case_name(path), strip): path}
    found: Dict[str, Path] = {}
    for p in sorted(path.iterdir()):
        if p.name.startswith(".") or not p.is_file() or not is_image_path(p):
            continue
        name = _strip(case_name(p), strip)
        if name in found:
            raise EvaluationError(f"{what} folder {path}: {found[name].name} and {p.name} both name case {name!r}.")
        found[name] = p
    if not found:
        raise EvaluationError(f"{what} folder {path} holds no image files (.nii, .nii.gz, .nrrd, .mha, ...).")
    return found


def _labels_from(arg: LabelsArg) -> Optional[Dict[int, str]]:
    if arg is None:
        return None
    if isinstance(arg, Mapping):
        try:
            return {int(k): str(v) for k, v in arg.items()}
        except (TypeError, ValueError):
            raise EvaluationError(f"labels must map integer values to names, got {dict(arg)!r}.") from None
    return dict(load_manifest(arg).labels)


def _is_manifest(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".json"


def _fmt_names(names: Sequence[str], limit: int = 10) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _references(truth: Path) -> Tuple[Dict[str, Path], Dict[str, Path], bool, Optional[Dict[int, str]]]:
    """(case -> reference file, case -> scan, restrict to predicted cases?, manifest labels)."""
    if not _is_manifest(truth):
        return _collect(truth, "reference"), {}, False, None
    man = load_manifest(truth)
    cases = [c for c in man.test if c.label is not None]
    restrict = not cases
    if restrict:
        cases = list(man.training)
        log.info("%s: no labelled test cases; evaluating against its training labels.", truth)
    return {c.name: c.label for c in cases}, {c.name: c.images[0] for c in cases}, restrict, dict(man.labels)


def _image_paths(images: Union[Mapping[str, PathLike], PathLike]) -> Dict[str, Path]:
    if isinstance(images, Mapping):
        return {str(k): Path(v) for k, v in images.items()}
    if _is_manifest(Path(images)):
        m = load_manifest(images)
        return {c.name: c.images[0] for c in m.training + m.validation + m.test}
    return _collect(Path(images), "image", strip=("_0000",))


def _match(pred: Path, truth: Path, pred_cases: Dict[str, Path], truth_cases: Dict[str, Path], restrict_to_pred: bool, allow_missing: bool) -> List[str]:
    """The case names to evaluate; see :func:`evaluate` for the rules."""
    common = sorted(set(pred_cases) & set(truth_cases))
    if not common:
        raise EvaluationError(
            f"no prediction in {pred} matches a reference case in {truth}.\n"
            f"  predictions: {_fmt_names(list(pred_cases))}\n  references: {_fmt_names(list(truth_cases))}"
        )
    extra = set(pred_cases) - set(truth_cases)
    if extra:
        log.warning("%d prediction(s) without a reference, skipped: %s", len(extra), _fmt_names(list(extra)))
    missing = set(truth_cases) - set(pred_cases)
    if missing and not restrict_to_pred:
        msg = f"{len(missing)} reference case(s) in {truth} have no prediction in {pred}: {_fmt_names(list(missing))}"
        if not allow_missing:
            raise EvaluationError(msg + " (pass allow_missing=True to evaluate the others).")
        log.warning("%s; evaluating the other %d.", msg, len(common))
    return common




def _values(*arrays: np.ndarray) -> set:
    return set().union(*(np.unique(a).astype(int).tolist() for a in arrays))


def evaluate(
    pred: PathLike,
    truth: PathLike,
    labels: LabelsArg = None,
    output: Optional[PathLike] = None,
    tolerance_mm: float = 2.0,
    images: Union[None, Mapping[str, PathLike], PathLike] = None,
    allow_missing: bool = False,
) -> EvaluationResult:
    """Compare predicted label maps with references and (optionally) write the tables.

    ``pred``: a label file or a folder of them; a trailing ``_seg`` in a file's name is ignored
    when matching (``case_01_seg.nii.gz`` is case ``case_01``). ``truth``: a file, a folder, or a
    manifest (``dataset.json``): its ``test`` cases that have a ``label``, else its ``training``
    cases. Cases are matched by name; two single files are compared whatever their names.
    ``labels``: value -> name dict or a manifest path; else the manifest's labels when ``truth``
    is one; else the values found in the arrays (an extra reading pass). ``images``: case -> scan
    path, a folder of scans (an nnU-Net ``_0000`` channel suffix is ignored) or a manifest (first
    channel of every section), recorded in ``metrics.csv`` for reports; a manifest truth provides
    them for its cases.

    Matching rules: no common case -> :class:`EvaluationError`; a reference case without a
    prediction -> error listing them (a silent drop would bias the means), or a warning with
    ``allow_missing=True``; a manifest's *training* cases (the fallback) are restricted to those
    predicted, since predictions there usually cover a validation split; a prediction without a
    reference -> warning, skipped. A prediction whose grid differs from its reference -> error
    naming both files.

    ``output``: folder that receives ``metrics.csv`` (one row per case x class, NaN written as
    ``nan``; case file paths relative to ``output``, so :func:`load_results` finds them from any
    working directory) and ``summary.json`` (see :func:`summarize`), both written atomically.
    """
    pred, truth = Path(pred), Path(truth)
    truth_cases, image_paths, restrict_to_pred, man_labels = _references(truth)
    label_map = _labels_from(labels)
    label_map = label_map if label_map is not None else man_labels
    pred_cases = _collect(pred, "prediction", strip=("_seg",))
    if pred.is_file() and len(truth_cases) == 1 and not _is_manifest(truth):
        pred_cases = {next(iter(truth_cases)): pred}
    if images is not None:
        image_paths.update(_image_paths(images))
    common = _match(pred, truth, pred_cases, truth_cases, restrict_to_pred, allow_missing)
    load = lambda name: load_label_pair(pred_cases[name], truth_cases[name], name)  # noqa: E731

    if label_map is None:
        values = set().union(*(_values(*load(name)[:2]) for name in common))
        label_map = {v: f"label_{v}" for v in sorted(values | {0})}
        log.info("labels inferred from the arrays: %s", label_map)
    if not any(v != 0 for v in label_map):
        raise EvaluationError(f"labels {label_map} declare no foreground class to evaluate.")

    pairs = [(name, pred_cases[name], truth_cases[name], image_paths.get(name, "")) for name in common]
    return evaluate_pairs(pairs, label_map, output, tolerance_mm)


def evaluate_pairs(pairs: Sequence[Tuple[str, PathLike, PathLike, PathLike]], label_map: Mapping[int, str],
                   output: Optional[PathLike] = None, tolerance_mm: float = 2.0) -> EvaluationResult:
    """Evaluate ``(case, prediction file, reference file, scan file or "")`` tuples with the
    classes of ``label_map``; ``output`` as in :func:`evaluate`."""
    rows: List[dict] = []
    for name, pred_path, truth_path, image_path in pairs:
        p_arr, t_arr, spacing = load_label_pair(Path(pred_path), Path(truth_path), name)
        unknown = _values(p_arr, t_arr) - set(label_map) - {0}
        if unknown:
            log.warning("%s: label values %s are not in labels %s; ignored.", name, sorted(unknown), sorted(label_map))
        paths = dict(pred_path=str(pred_path), truth_path=str(truth_path), image_path=str(image_path))
        case_rows = [{k: {**row, "case": name, **paths}[k] for k in CSV_COLUMNS} for row in evaluate_case(p_arr, t_arr, spacing, label_map, tolerance_mm)]
        log.info("%s: dice %s", name, ", ".join(f"{r['class']}={r['dice']:.3f}" for r in case_rows))
        rows += case_rows

    summary = summarize(rows, label_map, tolerance_mm)
    out_dir = None
    if output is not None:
        out_dir = Path(output)
        _write_csv(_paths_relative_to(rows, out_dir), out_dir / "metrics.csv")
        write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
        log.info("wrote %s and %s", out_dir / "metrics.csv", out_dir / "summary.json")
    return EvaluationResult(rows=rows, summary=summary, output=out_dir, labels=dict(label_map))


_PATH_COLUMNS: Tuple[str, ...] = ("pred_path", "truth_path", "image_path")


def _paths_relative_to(rows: Sequence[dict], folder: Path) -> List[dict]:
    """Rows whose file paths are relative to ``folder`` (where ``metrics.csv`` goes), so they
    resolve from any working directory (:func:`load_results` resolves them) and survive moving
    the run and its data together. Paths given relative to the cwd are valid only in that cwd."""
    base = folder.resolve()

    def rel(p: str) -> str:
        if not p:
            return p
        try:
            return os.path.relpath(Path(p).resolve(), base)
        except ValueError:  # another drive on Windows: no relative path exists
            return str(Path(p).resolve())

    return [{**r, **{k: rel(r[k]) for k in _PATH_COLUMNS}} for r in rows]


def _write_csv(rows: Sequence[dict], final: Path) -> None:
    with atomic_write(final) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def load_results(eval_dir: PathLike) -> EvaluationResult:
    """Read ``metrics.csv`` (and ``summary.json`` when present; else recomputed) written by
    :func:`evaluate`. Relative paths are resolved against ``eval_dir`` (absolute on return);
    path columns that are empty or absent read as ``""``."""
    eval_dir = Path(eval_dir)
    csv_path = eval_dir / "metrics.csv"
    if not csv_path.is_file():
        raise EvaluationError(f"{csv_path}: no such file (run `volseg evaluate ... --output {eval_dir}` first).")
    rows, base = [], eval_dir.resolve()
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            row = {"case": r["case"], "label": int(r["label"]), "class": r["class"]}
            row.update({k: float(r[k]) if r.get(k) not in (None, "") else math.nan for k in METRICS + VOLUMES})
            row.update({k: os.path.normpath(base / r[k]) if r.get(k) else "" for k in _PATH_COLUMNS})
            rows.append(row)
    labels = {r["label"]: r["class"] for r in rows}
    summary_path = eval_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else summarize(rows, labels)
    return EvaluationResult(rows=rows, summary=summary, output=eval_dir, labels=labels)
