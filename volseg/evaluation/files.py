"""The evaluation of prediction files: :func:`evaluate` (folders, files or a manifest, matched
by :mod:`.cases`) and :func:`evaluate_pairs` score them with :mod:`.metrics` and write
``metrics.csv`` and ``summary.json``; :func:`load_results` reads them back."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..data.io import atomic_write, write_text
from ..metrics import load_label_pair
from .cases import LabelsArg, PathLike, _collect, _image_paths, _is_manifest, _labels_from, _match, _references, _regions_from
from .figures import case_figures
from .metrics import CSV_COLUMNS, FIGURES, METRICS, VOLUMES, EvaluationError, EvaluationResult, evaluate_case, summarize

log = logging.getLogger(__name__)

__all__ = ["evaluate", "evaluate_pairs", "load_results"]


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
    # regions and the ignore value come with a manifest (``labels`` or ``truth``); a labels dict scores labels
    source = None if isinstance(labels, Mapping) else labels if labels is not None else truth if _is_manifest(truth) else None
    regions, ignore = _regions_from(source)
    if regions:  # the manifest's regions are what is scored, named by the regions
        label_map = {v: n for v, n in zip(regions, regions.names)}
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
    return evaluate_pairs(pairs, label_map, output, tolerance_mm, dict(regions) or None, ignore)


def evaluate_pairs(pairs: Sequence[Tuple[str, PathLike, PathLike, PathLike]], label_map: Mapping[int, str],
                   output: Optional[PathLike] = None, tolerance_mm: float = 2.0, regions: Optional[Mapping[int, Sequence[int]]] = None,
                   ignore: Optional[int] = None) -> EvaluationResult:
    """Evaluate ``(case, prediction file, reference file, scan file or "")`` tuples with the
    classes of ``label_map``; ``output`` as in :func:`evaluate`. ``regions``: class value ->
    its label values (region evaluation, see :func:`evaluate_case`); ``ignore``: the reference
    value of unannotated voxels, which count for neither map (both read as background there)."""
    rows: List[dict] = []
    for name, pred_path, truth_path, image_path in pairs:
        p_arr, t_arr, spacing = load_label_pair(Path(pred_path), Path(truth_path), name)
        if ignore is not None:
            keep = t_arr != ignore
            p_arr, t_arr = np.where(keep, p_arr, 0), np.where(keep, t_arr, 0)
        known = set(label_map) | {v for vs in (regions or {}).values() for v in vs}
        unknown = _values(p_arr, t_arr) - known - {0}
        if unknown:
            log.warning("%s: label values %s are not in labels %s; ignored.", name, sorted(unknown), sorted(label_map))
        paths = dict(pred_path=str(pred_path), truth_path=str(truth_path), image_path=str(image_path))
        figures = case_figures(p_arr, t_arr, str(image_path), label_map, name)
        blank = dict.fromkeys(FIGURES)  # region rows have no per-label figures
        scored = evaluate_case(p_arr, t_arr, spacing, label_map, tolerance_mm, regions)
        case_rows = [{k: {**row, **blank, **figures.get(row["label"], {}), "case": name, **paths}[k] for k in CSV_COLUMNS} for row in scored]
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
            row.update({k: float(r[k]) if r.get(k) not in (None, "") else math.nan for k in METRICS + VOLUMES + FIGURES})
            row.update({k: os.path.normpath(base / r[k]) if r.get(k) else "" for k in _PATH_COLUMNS})
            rows.append(row)
    labels = {r["label"]: r["class"] for r in rows}
    summary_path = eval_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else summarize(rows, labels)
    return EvaluationResult(rows=rows, summary=summary, output=eval_dir, labels=labels)
