"""The viewer in Jupyter: :func:`view` shows NiiVue through ``ipyniivue`` (the ``viewer`` extra).

The layers are the ones the report embeds (:func:`~volseg.viz.volumes.pack_case`: foreground
crop, uint8/uint16), handed to ipyniivue as bytes, so the notebook and the report show the same
thing in the same colours. Without ipyniivue or ipywidgets it logs one warning and returns the
static :func:`~volseg.viz.figures.overlay` figure instead.
"""

from __future__ import annotations

import base64
import logging
from typing import Mapping, Optional

from .page import label_table
from .volumes import Layer, pack_case

log = logging.getLogger(__name__)

__all__ = ["view"]


def _lut(table: list, shown: Mapping[int, bool]) -> dict:
    top = max([t["value"] for t in table] or [0])
    by = {t["value"]: t for t in table}
    rgb = [by[v]["color"] if v in by else [0, 0, 0] for v in range(top + 1)]
    return {"R": [c[0] for c in rgb], "G": [c[1] for c in rgb], "B": [c[2] for c in rgb],
            "A": [255 if v in by and shown.get(v, True) else 0 for v in range(top + 1)], "I": list(range(top + 1)),
            "labels": [by[v]["name"] if v in by else ("background" if v == 0 else f"label {v}") for v in range(top + 1)]}  # fmt: skip


def view(
    scan: Optional[Layer] = None,
    prediction: Optional[Layer] = None,
    truth: Optional[Layer] = None,
    labels: Optional[Mapping[int, str]] = None,
    opacity: float = 0.5,
    height: int = 480,
):
    """An interactive NiiVue view of ``scan`` with ``prediction`` (and ``truth``, hidden until
    ticked) overlaid in the label colours: multiplanar with a 3D render, a per-label checkbox, a
    view menu. Arguments as :func:`~volseg.viz.volumes.pack_case` (paths, SimpleITK images or
    arrays ``[z, y, x]``); ``labels``: value -> name. Returns an ipywidgets box (display it, or
    leave it last in a cell); without ``ipyniivue`` (``pip install 'volseg[viewer]'``) a warning
    and the static overlay figure."""
    try:
        import ipywidgets as widgets
        from ipyniivue import NiiVue, SliceType
    except ImportError:
        log.warning("the notebook viewer needs ipyniivue: pip install 'volseg[viewer]'; showing the static overlay instead.")
        from .figures import overlay

        return overlay(scan, prediction if prediction is not None else truth, labels=labels)
    case = pack_case("case", scan, prediction, truth)
    names = dict(labels) if labels else {v: f"label {v}" for v in case.label_values}
    table = label_table(names)
    shown = {t["value"]: True for t in table}
    nv = NiiVue(height=height)
    vols = []
    for kind, b64 in (("image", case.image), ("pred", case.pred), ("truth", case.truth)):
        if b64 is None:
            continue
        opts = {"data": base64.b64decode(b64), "name": f"{kind}.nii.gz"}
        if kind == "image":
            opts.update(colormap="gray", cal_min=case.window[0], cal_max=case.window[1])
        else:
            opts.update(opacity=opacity if kind == "pred" else 0.0)
        vols.append((kind, opts))
    nv.load_volumes([o for _, o in vols])
    layers = {kind: vol for (kind, _), vol in zip(vols, nv.volumes)}
    for kind in ("pred", "truth"):
        if kind in layers:
            layers[kind].set_colormap_label(_lut(table, shown))
    nv.set_slice_type(SliceType.MULTIPLANAR)

    def relabel(_=None) -> None:
        for kind in ("pred", "truth"):
            if kind in layers:
                layers[kind].set_colormap_label(_lut(table, shown))

    boxes = []
    for t in table:
        box = widgets.Checkbox(value=True, description=f"{t['name']} ({t['value']})", indent=False, layout=widgets.Layout(width="auto"))
        box.style.background = "rgb({},{},{})".format(*t["color"])

        def toggle(change, value=t["value"]) -> None:
            shown[value] = bool(change["new"])
            relabel()

        box.observe(toggle, names="value")
        boxes.append(box)
    layer_boxes = []
    for kind, start in (("pred", True), ("truth", False)):
        if kind not in layers:
            continue
        lb = widgets.Checkbox(value=start, description="prediction" if kind == "pred" else "truth", indent=False, layout=widgets.Layout(width="auto"))

        def show_layer(change, kind=kind) -> None:
            layers[kind].opacity = opacity if change["new"] else 0.0

        lb.observe(show_layer, names="value")
        layer_boxes.append(lb)
    views = widgets.Dropdown(options=[("multiplanar + 3D", SliceType.MULTIPLANAR), ("axial", SliceType.AXIAL), ("coronal", SliceType.CORONAL),
                                      ("sagittal", SliceType.SAGITTAL), ("3D", SliceType.RENDER)], description="view")  # fmt: skip
    views.observe(lambda ch: nv.set_slice_type(ch["new"]), names="value")
    note = widgets.HTML(f"<small>{case.note}</small>")
    return widgets.VBox([widgets.HBox([views, *layer_boxes, *boxes]), nv, note])
