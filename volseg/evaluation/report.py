"""A self-contained HTML report of a run: training curves, evaluation tables, worst cases,
then an interactive 3D viewer of the evaluated cases (NiiVue, :mod:`volseg.viz.page`).

Images are embedded as base64 PNG and the viewer's script and volumes as text, so the single
file can be mailed or archived and opens offline; the whole page stays under ``max_bytes``.
The static part comes first and prints to PDF; the viewer is left out of print.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import math
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .. import viz
from ..data.io import atomic_write
from .files import load_results
from .metrics import METRICS, VOLUMES, EvaluationError, EvaluationResult, worst_cases
from .report_viewer import pick_cases, run_labels, viewer_html

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

__all__ = ["write_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0} td:first-child,th:first-child{text-align:left}
img{max-width:100%} .note{color:#777} pre{background:#f7f7f7;padding:1em;overflow:auto}
""" + viz.VIEWER_CSS


def _img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(v: object, digits: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "NaN" if isinstance(v, float) else "-"
    return f"{v:.{digits}f}"


def _digits(metric: str) -> int:
    return 2 if metric in ("hd95", "assd") or metric in VOLUMES else 3


def _table(head: List[str], rows: List[List[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _summary_table(result: EvaluationResult) -> str:
    s = result.summary
    head = ["class", "n"] + [f"{m} (mm)" if m in ("hd95", "assd") else m for m in METRICS]
    rows = []
    for name, c in s["classes"].items():
        cells = [name, str(max(c[m]["n"] + c[m]["n_nan"] for m in METRICS))]
        for m in METRICS:
            st = c[m]
            cell = "-" if st["mean"] is None else f"{_num(st['mean'], _digits(m))} ± {_num(st['sd'], _digits(m))}"
            cells.append(cell + (f" ({st['n_nan']} NaN excluded)" if st["n_nan"] else ""))
        rows.append(cells)
    mfd = s.get("mean_foreground_dice")
    extra = (
        f"<p>Mean foreground dice: <b>{_num(mfd, 4)}</b>; {s.get('n_cases', '?')} case(s); "
        f"NSD tolerance {s.get('tolerance_mm', '?')} mm.</p>"
        f"<p class=note>Empty masks: {html.escape(str(s.get('empty_mask_convention', '')))}</p>"
    )
    return _table(head, rows) + extra


def _cases_table(result: EvaluationResult) -> str:
    order = {c: i for i, c in enumerate(worst_cases(result.rows))}
    rows = sorted(result.rows, key=lambda r: (order[r["case"]], r["label"]))
    head = ["case", "class"] + list(METRICS) + list(VOLUMES)
    return _table(head, [[r["case"], r["class"]] + [_num(r[m], _digits(m)) for m in METRICS + VOLUMES] for r in rows])


def _case_figures(result: EvaluationResult, cases: Sequence[str]) -> str:
    parts = []
    by_case = {r["case"]: r for r in result.rows}
    for case in cases:
        r = by_case[case]
        pred, truth, image = r.get("pred_path"), r.get("truth_path"), r.get("image_path")
        if not pred or not truth:
            continue
        if not (Path(pred).exists() and Path(truth).exists()):
            parts.append(f"<p class=note>{html.escape(case)}: {html.escape(pred)} or {html.escape(truth)} not found.</p>")
            continue
        img = image if image and Path(image).exists() else None
        dice = ", ".join(f"{x['class']} {_num(x['dice'], 3)}" for x in result.rows if x["case"] == case)
        try:
            err = viz.error_map(img, pred, truth, title=f"{case}: errors")
            ov = viz.overlay(img if img else truth, pred, labels=result.labels, title=f"{case}: prediction")
        except (ValueError, OSError) as exc:  # a broken file should not cost the whole report
            parts.append(f"<p class=note>{html.escape(case)}: cannot draw ({html.escape(str(exc))}).</p>")
            continue
        parts.append(f"<h3>{html.escape(case)} <small>(dice {html.escape(dice)})</small></h3>{_img(err, case)}{_img(ov, case)}")
    if not parts:
        return "<p class=note>No prediction/reference paths recorded in metrics.csv; no case images.</p>"
    return "".join(parts)


def write_report(
    run_dir: PathLike,
    eval_dir: Optional[PathLike] = None,
    output: Optional[PathLike] = None,
    n_cases: int = 3,
    viewer: bool = True,
    cases: Optional[Sequence[str]] = None,
    max_bytes: int = viz.MAX_PAGE_BYTES,
) -> Path:
    """Write an HTML report of ``run_dir`` and return its path.

    Sections: training curves from ``run_dir/metrics.csv``; the evaluation summary (mean ± sd per
    class and metric) and per-case table, worst case first, from ``eval_dir`` (default
    ``run_dir/eval``, as written by :func:`~volseg.evaluation.evaluate`) with a dice-per-class
    plot; error maps and overlays of the ``n_cases`` worst cases and of the best one when their
    files are recorded; then, with
    ``viewer``, the interactive viewer of ``cases`` (default: every evaluated case, worst first;
    an unknown name raises :class:`EvaluationError`), labels named as in the run folder. The
    page is at most ``max_bytes`` long (default 25 MB): viewer cases are cropped, subsampled or
    left out (with a note) to fit. A missing part is noted in the report, not an error.
    ``output`` defaults to ``run_dir/report.html``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir}: no such folder.")
    eval_dir = Path(eval_dir) if eval_dir is not None else run_dir / "eval"
    output = Path(output) if output is not None else run_dir / "report.html"
    now = _dt.datetime.now().isoformat(timespec="seconds")
    body = [f"<h1>volseg run {html.escape(run_dir.name)}</h1>",
            f"<p class=note>{html.escape(str(run_dir.resolve()))} — generated {now}</p>", "<h2>Training</h2>"]  # fmt: skip
    curves = run_dir / "metrics.csv"
    if curves.is_file():
        body.append(_img(viz.plot_training_curves(curves), "training curves"))
    else:
        body.append(f"<p class=note>{html.escape(str(curves))} not found.</p>")
    for cfg in ("config.yaml", "config.yml", "config.json"):
        if (run_dir / cfg).is_file():
            body.append(f"<details><summary>{cfg}</summary><pre>{html.escape((run_dir / cfg).read_text(encoding='utf-8')[:20000])}</pre></details>")
            break
    body.append("<h2>Evaluation</h2>")
    try:
        result = load_results(eval_dir)
    except EvaluationError as exc:
        body.append(f"<p class=note>{html.escape(str(exc))}</p>")
        result = None
    else:
        order = worst_cases(result.rows)
        body += [_summary_table(result), _img(viz.plot_metric_per_class(result.rows, "dice"), "dice per class"),
                 "<h3>Cases, worst first</h3>", _cases_table(result), "<h2>Worst cases</h2>", _case_figures(result, order[:n_cases])]  # fmt: skip
        if n_cases > 0 and len(order) > n_cases:
            body += ["<h2>Best case</h2>", _case_figures(result, order[-1:])]
    head = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>volseg report: {html.escape(run_dir.name)}</title><style>{_CSS}</style></head><body>"
    page = head + "\n".join(body)
    if viewer and result is not None:
        names = pick_cases(result, cases)
        page += "\n<h2>Viewer</h2>\n" + viewer_html(result, run_labels(run_dir, result.labels), names, max_bytes - len(page) - 100)
    page += "</body></html>\n"
    if len(page) > max_bytes:
        log.warning("%s: %.1f MB, over the %.1f MB cap (the static part alone is that big).", output, len(page) / 1e6, max_bytes / 1e6)
    with atomic_write(output) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("wrote %s", output)
    return output
