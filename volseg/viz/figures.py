"""Figures for scans, label maps and training runs (matplotlib, loaded on first use).

Volumes are numpy arrays indexed ``[z, y, x]`` with ``spacing`` in mm given as ``(x, y, z)``,
exactly as SimpleITK returns them (``GetArrayFromImage`` / ``GetSpacing``); a ``sitk.Image`` or
an image path is accepted wherever an array is, and then brings its own spacing. Views are drawn
in voxel index order (no reorientation by the direction cosines): axial ``[y, x]`` with row 0
on top, coronal ``[z, x]`` and sagittal ``[z, y]`` with z pointing up, each with the pixel aspect
ratio given by the spacing.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot, so no backend is set or
needed and nothing leaks into pyplot's figure list; in Jupyter (``%matplotlib inline``) a returned
figure displays itself. Save with :func:`save_figure`.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..data.io import atomic_write, read_image

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
Volume = Union[np.ndarray, "sitk.Image", str, Path]
Spacing = Tuple[float, float, float]

VIEWS = ("axial", "coronal", "sagittal")  # array axis 0, 1, 2 held fixed
ERROR_COLORS = {"true positive": (0.2, 0.8, 0.2), "false positive": (0.9, 0.1, 0.1),
                "false negative": (0.1, 0.35, 1.0), "wrong class": (1.0, 0.6, 0.0)}  # fmt: skip

__all__ = ["overlay", "montage", "error_map", "browse", "plot_training_curves", "save_figure", "VIEWS"]


def _to_array(x: Volume, spacing: Optional[Sequence[float]], what: str) -> Tuple[np.ndarray, Optional[Spacing]]:
    """(array [z, y, x], spacing (x, y, z) or None) from an array, a sitk.Image or a path."""
    if isinstance(x, (str, Path)):
        x = read_image(x)
    if not isinstance(x, np.ndarray) and hasattr(x, "GetSpacing"):
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(x), tuple(float(s) for s in (spacing or x.GetSpacing()))  # type: ignore
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"{what}: expected a 3D array [z, y, x], got shape {arr.shape}.")
    return arr, (tuple(float(s) for s in spacing) if spacing is not None else None)  # type: ignore


def _inputs(image: Optional[Volume], spacing: Optional[Sequence[float]], **labels: Optional[Volume]):
    """Image, label arrays and one spacing (x, y, z); all arrays must share a shape."""
    arrays: Dict[str, Optional[np.ndarray]] = {}
    sp = tuple(spacing) if spacing is not None else None
    for name, vol in [("image", image)] + list(labels.items()):
        if vol is None:
            arrays[name] = None
            continue
        arrays[name], s = _to_array(vol, spacing, name)
        sp = sp or s
    shapes = {k: v.shape for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"arrays differ in shape: {shapes}; all must share one [z, y, x] grid.")
    if sp is None:
        log.debug("no spacing given; assuming 1 mm isotropic.")
        sp = (1.0, 1.0, 1.0)
    if len(sp) != 3 or not all(float(s) > 0 for s in sp):
        raise ValueError(f"spacing must be 3 positive mm values (x, y, z), got {sp}.")
    return arrays, tuple(float(s) for s in sp)


def _axis(axis: Union[int, str]) -> int:
    if isinstance(axis, str):
        if axis not in VIEWS:
            raise ValueError(f"unknown view {axis!r}; expected one of {list(VIEWS)} or an array axis 0, 1, 2.")
        return VIEWS.index(axis)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0 (axial, z), 1 (coronal, y) or 2 (sagittal, x), got {axis!r}.")
    return int(axis)


def _slice(arr: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(arr, index, axis=axis)


def _aspect_origin(axis: int, spacing: Spacing) -> Tuple[float, str]:
    """imshow aspect (row height / column width in mm) and origin for a view; spacing (x, y, z)."""
    sx, sy, sz = spacing
    return {0: (sy / sx, "upper"), 1: (sz / sx, "lower"), 2: (sz / sy, "lower")}[axis]


def _window(image: np.ndarray) -> Tuple[float, float]:
    sample = image[:: max(1, image.shape[0] // 32)].astype(np.float32)  # a few slices are enough
    lo, hi = np.percentile(sample, [1, 99]) if sample.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1)


def _class_colors(values: Sequence[int]) -> Dict[int, Tuple[float, float, float]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {int(v): tuple(cmap((int(v) - 1) % 10)[:3]) for v in values if int(v) != 0}


def _rgba(label2d: np.ndarray, colors: Mapping[int, Tuple[float, float, float]], alpha: float) -> np.ndarray:
    out = np.zeros(label2d.shape + (4,), dtype=np.float32)
    for v, c in colors.items():
        out[label2d == v] = (*c, alpha)
    return out


def _centre(label: Optional[np.ndarray], shape: Sequence[int]) -> List[int]:
    if label is not None and np.any(label > 0):
        return [int(round(c)) for c in np.argwhere(label > 0).mean(axis=0)]
    return [s // 2 for s in shape]


def _new_figure(fig: Optional[Figure], figsize: Tuple[float, float]) -> Figure:
    if fig is not None:
        return fig
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _legend(fig: Figure, items: Mapping[str, Tuple[float, float, float]]) -> None:
    from matplotlib.patches import Patch

    if items:
        handles = [Patch(facecolor=c, label=n) for n, c in items.items()]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize="small", frameon=False)


def _draw(ax, image: Optional[np.ndarray], rgba: Optional[np.ndarray], axis: int, spacing: Spacing, window, title: str) -> None:
    aspect, origin = _aspect_origin(axis, spacing)
    if image is not None:
        ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, origin=origin, interpolation="nearest")
    if rgba is not None:
        ax.imshow(rgba, aspect=aspect, origin=origin, interpolation="nearest")
    ax.set_title(title, fontsize="small")
    ax.set_axis_off()


def _class_items(values: Sequence[int], labels: Optional[Mapping[int, str]]) -> Dict[int, str]:
    labels = {int(k): str(v) for k, v in (labels or {}).items()}
    return {int(v): labels.get(int(v), f"label {int(v)}") for v in values if int(v) != 0}


def overlay(
    image: Optional[Volume],
    label: Optional[Volume] = None,
    spacing: Optional[Sequence[float]] = None,
    labels: Optional[Mapping[int, str]] = None,
    slices: Optional[Sequence[int]] = None,
    fig: Optional[Figure] = None,
    alpha: float = 0.45,
    title: Optional[str] = None,
) -> Figure:
    """Axial, coronal and sagittal views of ``image`` with ``label`` filled in class colours.

    ``image``, ``label``: arrays ``[z, y, x]`` (or sitk Images / paths); ``spacing``: mm
    ``(x, y, z)``; ``labels``: value -> class name for the legend; ``slices``: ``(z, y, x)``
    indices, default the centre of the label's foreground (else of the volume). Returns a
    figure with 3 axes.
    """
    arrays, sp = _inputs(image, spacing, label=label)
    img, lab = arrays["image"], arrays["label"]
    ref = img if img is not None else lab
    if ref is None:
        raise ValueError("overlay needs an image or a label map.")
    idx = list(slices) if slices is not None else _centre(lab, ref.shape)
    if len(idx) != 3 or any(not 0 <= i < n for i, n in zip(idx, ref.shape)):
        raise ValueError(f"slices {idx} must be 3 indices (z, y, x) within the shape {ref.shape}.")
    classes = _class_items(sorted(set(np.unique(lab).tolist()) | set(labels or {})) if lab is not None else [], labels)
    colors = _class_colors(list(classes))
    fig = _new_figure(fig, (12, 4.6))
    window = _window(img) if img is not None else (0, 1)
    for axis, ax in enumerate(fig.subplots(1, 3)):
        i = idx[axis]
        rgba = _rgba(_slice(lab, axis, i), colors, alpha) if lab is not None else None
        _draw(ax, _slice(img, axis, i) if img is not None else None, rgba, axis, sp, window, f"{VIEWS[axis]} {'zyx'[axis]}={i}")
    _legend(fig, {classes[v]: colors[v] for v in classes})
    if title:
        fig.suptitle(title)
    return fig


def error_map(
    image: Optional[Volume],
    pred: Volume,
    truth: Volume,
    spacing: Optional[Sequence[float]] = None,
    slices: Optional[Sequence[int]] = None,
    fig: Optional[Figure] = None,
    alpha: float = 0.6,
    title: Optional[str] = None,
) -> Figure:
    """Axial, coronal and sagittal views of where ``pred`` and ``truth`` disagree: false
    positives (predicted foreground on background) red, false negatives blue, a wrong foreground
    class orange, agreement green. Arrays ``[z, y, x]``, spacing mm ``(x, y, z)``; ``slices``
    ``(z, y, x)`` default to the slices with the most errors along each axis. 3 axes."""
    arrays, sp = _inputs(image, spacing, pred=pred, truth=truth)
    img, p, t = arrays["image"], arrays["pred"], arrays["truth"]
    if p is None or t is None:
        raise ValueError("error_map needs both pred and truth.")
    cats = {
        "true positive": (p == t) & (t > 0),
        "false positive": (p > 0) & (t == 0),
        "false negative": (t > 0) & (p == 0),
        "wrong class": (p > 0) & (t > 0) & (p != t),
    }
    code = np.zeros(p.shape, dtype=np.uint8)
    for k, mask in enumerate(cats.values(), start=1):
        code[mask] = k
    errors = code >= 2
    if slices is not None:
        idx = list(slices)
    elif errors.any():
        idx = [int(np.argmax(errors.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)]
    else:
        idx = _centre(t, t.shape)
    colors = {k: c for k, c in enumerate(ERROR_COLORS.values(), start=1)}
    fig = _new_figure(fig, (12, 4.6))
    window = _window(img) if img is not None else (0, 1)
    for axis, ax in enumerate(fig.subplots(1, 3)):
        i = idx[axis]
        rgba = _rgba(_slice(code, axis, i), colors, alpha)
        _draw(ax, _slice(img, axis, i) if img is not None else None, rgba, axis, sp, window, f"{VIEWS[axis]} {'zyx'[axis]}={i}")
    counts = {n: int(m.sum()) for n, m in cats.items()}
    _legend(fig, {f"{n} ({counts[n]} vox)": c for n, c in ERROR_COLORS.items()})
    if title:
        fig.suptitle(title)
    return fig


def montage(
    image: Optional[Volume],
    label: Optional[Volume] = None,
    spacing: Optional[Sequence[float]] = None,
    axis: Union[int, str] = 0,
    n: int = 9,
    labels: Optional[Mapping[int, str]] = None,
    fig: Optional[Figure] = None,
    alpha: float = 0.45,
) -> Figure:
    """``n`` evenly spaced slices along array ``axis`` (0/'axial' = z, 1/'coronal' = y,
    2/'sagittal' = x) of ``image`` with ``label`` overlaid, spanning the label's foreground
    extent (else the volume). One axis per slice (fewer if the volume has fewer slices)."""
    ax_i = _axis(axis)
    arrays, sp = _inputs(image, spacing, label=label)
    img, lab = arrays["image"], arrays["label"]
    ref = img if img is not None else lab
    if ref is None:
        raise ValueError("montage needs an image or a label map.")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    size = ref.shape[ax_i]
    if lab is not None and np.any(lab > 0):
        nz = np.flatnonzero(np.any(lab > 0, axis=tuple(a for a in range(3) if a != ax_i)))
        lo, hi = int(nz[0]), int(nz[-1])
    else:
        lo, hi = 0, size - 1
    idx = sorted(set(np.linspace(lo, hi, min(n, size)).round().astype(int).tolist()))
    if len(idx) < min(n, size):  # a thin foreground: widen to the whole volume
        idx = sorted(set(np.linspace(0, size - 1, min(n, size)).round().astype(int).tolist()))
    classes = _class_items(sorted(set(np.unique(lab).tolist()) | set(labels or {})) if lab is not None else [], labels)
    colors = _class_colors(list(classes))
    ncols = math.ceil(math.sqrt(len(idx)))
    nrows = math.ceil(len(idx) / ncols)
    fig = _new_figure(fig, (2.6 * ncols, 2.6 * nrows + 0.5))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    window = _window(img) if img is not None else (0, 1)
    for ax, i in zip(axes, idx):
        rgba = _rgba(_slice(lab, ax_i, i), colors, alpha) if lab is not None else None
        _draw(ax, _slice(img, ax_i, i) if img is not None else None, rgba, ax_i, sp, window, f"{'zyx'[ax_i]}={i}")
    for ax in axes[len(idx):]:
        fig.delaxes(ax)
    _legend(fig, {classes[v]: colors[v] for v in classes})
    return fig


def browse(
    image: Optional[Volume],
    label: Optional[Volume] = None,
    spacing: Optional[Sequence[float]] = None,
    axis: Union[int, str] = 0,
    labels: Optional[Mapping[int, str]] = None,
):
    """Interactive slice browser for Jupyter: an ipywidgets slider over array ``axis``. Without
    ipywidgets, logs a warning and returns a static :func:`montage` figure instead."""
    try:
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        log.warning("ipywidgets is not installed (pip install ipywidgets); showing a static montage instead.")
        return montage(image, label, spacing, axis=axis, labels=labels)
    ax_i = _axis(axis)
    arrays, sp = _inputs(image, spacing, label=label)
    img, lab = arrays["image"], arrays["label"]
    ref = img if img is not None else lab
    classes = _class_items(sorted(set(np.unique(lab).tolist()) | set(labels or {})) if lab is not None else [], labels)
    colors = _class_colors(list(classes))
    window = _window(img) if img is not None else (0, 1)

    def show(index: int) -> None:
        fig = _new_figure(None, (6, 6))
        rgba = _rgba(_slice(lab, ax_i, index), colors, 0.45) if lab is not None else None
        _draw(fig.subplots(), _slice(img, ax_i, index) if img is not None else None, rgba, ax_i, sp, window, f"{VIEWS[ax_i]} {'zyx'[ax_i]}={index}")
        _legend(fig, {classes[v]: colors[v] for v in classes})
        display(fig)

    start = _centre(lab, ref.shape)[ax_i]
    slider = widgets.IntSlider(value=start, min=0, max=ref.shape[ax_i] - 1, description=VIEWS[ax_i], continuous_update=False)
    return widgets.interactive(show, index=slider)


def _read_curves(path: Path) -> Dict[str, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cols: Dict[str, List[float]] = {}
    for r in rows:
        for k in rows[0].keys() if rows else ():
            try:
                v = float(r.get(k) or "nan")
            except ValueError:
                v = math.nan
            cols.setdefault(k, []).append(v)
    return {k: np.array(v, dtype=float) for k, v in cols.items()}


def plot_training_curves(metrics_csv: PathLike, fig: Optional[Figure] = None) -> Figure:
    """Loss, validation dice (mean and per class) and learning rate against epoch, from a run's
    ``metrics.csv`` (columns ``epoch, train_loss, val_dice_mean, val_dice_<class>, lr``; a run
    folder is accepted too). Missing columns are skipped and empty / NaN cells leave gaps
    (validation every k epochs is fine). Panels: loss, dice, and lr when present."""
    path = Path(metrics_csv)
    if path.is_dir():
        path = path / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a training run writes metrics.csv in its folder).")
    cols = _read_curves(path)
    n = len(next(iter(cols.values()))) if cols else 0
    epoch = cols.get("epoch", np.arange(1, n + 1, dtype=float))
    dice_cols = [k for k in cols if k.startswith("val_dice_") and k != "val_dice_mean"]
    panels = [("loss", [k for k in cols if k.endswith("loss")]), ("validation dice", (["val_dice_mean"] if "val_dice_mean" in cols else []) + dice_cols)]
    if "lr" in cols:
        panels.append(("learning rate", ["lr"]))
    fig = _new_figure(fig, (4.2 * len(panels), 3.6))
    for ax, (name, keys) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
        for k in keys:
            ok = np.isfinite(cols[k]) & np.isfinite(epoch)
            if ok.any():
                main = k in ("train_loss", "val_dice_mean", "lr")
                ax.plot(epoch[ok], cols[k][ok], marker="." if ok.sum() < 30 else None, lw=2 if main else 1,
                        alpha=1 if main else 0.7, label=k.removeprefix("val_dice_") if name == "validation dice" else k)  # fmt: skip
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif name == "learning rate" and np.nanmin(cols["lr"]) > 0:
            ax.set_yscale("log")
        if len(ax.lines) > 1:
            ax.legend(fontsize="small")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    return fig


def save_figure(fig: Figure, path: PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` atomically to ``path`` (format from the suffix: .png, .pdf, .svg, ...)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path
