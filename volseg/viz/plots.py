"""Plots of evaluation rows (one dict per case and class, as ``volseg evaluate`` writes them)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["plot_metric_per_class"]


def plot_metric_per_class(rows: Sequence[dict], metric: str = "dice", fig: Optional[Figure] = None) -> Figure:
    """A box per class of ``metric`` over cases, every case a dot (NaN left out and counted in
    the class's tick label). ``rows``: dicts with ``class`` and ``metric`` keys, e.g.
    :attr:`EvaluationResult.rows <volseg.evaluation.EvaluationResult>`."""
    from .figures import _new_figure

    values: Dict[str, List[float]] = {}
    for r in rows:
        v = r.get(metric)
        values.setdefault(str(r["class"]), []).append(float(v) if v is not None else math.nan)
    if not values:
        raise ValueError(f"no rows to plot {metric!r} of.")
    names = list(values)
    fig = _new_figure(fig, (max(4.0, 1.2 * len(names) + 2), 3.4))
    ax = fig.subplots()
    finite = [np.array([v for v in values[n] if math.isfinite(v)]) for n in names]
    ax.boxplot([f if f.size else [np.nan] for f in finite], showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)  # fixed jitter: the same report twice looks the same
    for i, f in enumerate(finite, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, f.size), f, s=14, alpha=0.7, zorder=3)
    nan = [len(values[n]) - f.size for n, f in zip(names, finite)]
    ax.set_xticks(range(1, len(names) + 1), [n + (f"\n({k} NaN)" if k else "") for n, k in zip(names, nan)])
    ax.set_ylabel(metric)
    if metric in ("dice", "iou", "nsd"):
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{metric} per class, one dot per case", fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return fig
