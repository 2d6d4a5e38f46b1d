"""The interactive viewer as HTML: a section for the report, or a one-case page (``volseg view``).

The section holds NiiVue's script (:mod:`volseg.viz.niivue`), volseg's own controller
(``viewer.js`` beside this module) and the cases as one JSON block of base64 .nii.gz layers
(:mod:`volseg.viz.volumes`), so the page needs no server and no network. One WebGL2 canvas shows
one case at a time (browsers allow only a few WebGL contexts per page); a menu picks the case.
"""

from __future__ import annotations

import html
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ..data.io import atomic_write
from .niivue import NPM_PACKAGE, NiivueScript, niivue_script
from .volumes import CT_WINDOWS, Layer, ViewerCase, pack_case

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: default size cap of a page with the viewer (report or ``volseg view``), bytes
MAX_PAGE_BYTES = 25_000_000

VIEWER_CSS = """
#volseg-viewer{border:1px solid #ccc;padding:8px;margin:1em 0;background:#fafafa}
#volseg-viewer .vs-bar{display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;margin:4px 0;font-size:0.9em}
#volseg-viewer .vs-canvas-box{height:560px;background:#000}
#volseg-viewer canvas{width:100%;height:100%;display:block}
#volseg-viewer .vs-on{font-weight:bold;background:#dde}
#volseg-viewer .vs-swatch{display:inline-block;width:0.9em;height:0.9em;vertical-align:middle;border:1px solid #555}
#volseg-viewer .vs-readout{font-family:monospace;min-height:1.3em}
#volseg-viewer .vs-status{color:#a00}
@media print{#volseg-viewer{display:none}}
"""

_VIEWS = (("axial", 0), ("coronal", 1), ("sagittal", 2), ("multiplanar + 3D", 3), ("3D", 4))

__all__ = ["MAX_PAGE_BYTES", "VIEWER_CSS", "label_table", "viewer_section", "write_viewer"]


def label_table(labels: Mapping[int, str]) -> list:
    """``[{value, name, color: [r, g, b]}]`` for foreground labels, in the static figures'
    colours (matplotlib tab10 by label value), so a label looks the same everywhere."""
    from .figures import _class_colors

    colors = _class_colors(sorted(int(k) for k in labels))
    return [{"value": v, "name": str(labels[v]), "color": [round(255 * c) for c in colors[v]]} for v in sorted(colors)]


def _controls() -> str:
    views = "".join(f"<button type=button class='vs-view{' vs-on' if s == 3 else ''}' data-slice={s}>{n}</button>" for n, s in _VIEWS)
    return (
        "<div class=vs-bar><label>case <select class=vs-case></select></label>"
        f"<span>{views}</span>"
        "<label>window <select class=vs-window></select></label>"
        "<label>opacity <input class=vs-opacity type=range min=0 max=1 step=0.05 value=0.5></label>"
        "<label><input type=checkbox class=vs-layer-pred> prediction</label>"
        "<label><input type=checkbox class=vs-layer-truth> truth</label></div>"
        "<div class='vs-bar vs-labels'></div>"
        "<div class=vs-canvas-box><canvas class=vs-canvas></canvas></div>"
        "<div class=vs-readout></div><div class='vs-note note'></div><div class=vs-status></div>"
    )


def _safe_json(obj: object) -> str:
    # inside <script>, "</" would end the block; base64 and names never need it
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def viewer_section(cases: Sequence[ViewerCase], labels: Mapping[int, str], script: Optional[NiivueScript] = None) -> str:
    """The viewer's HTML (controls, canvas, NiiVue, data, controller) for ``cases``; put
    :data:`VIEWER_CSS` in the page's style. ``script``: default :func:`niivue_script`."""
    script = script or niivue_script()
    own = resources.files("volseg.viz").joinpath("viewer.js").read_text(encoding="utf-8")
    js = script.text.replace("</script", "<\\/script")
    # a value the masks hold but the names miss still gets a colour and a checkbox: hiding it
    # would show a cleaner mask than the file is
    names = {int(k): str(v) for k, v in labels.items()}
    for v in sorted({v for c in cases for v in c.label_values} - set(names)):
        log.warning("label value %d is in the masks but not in the label names %s; shown as 'label %d (unnamed)'.", v, sorted(names), v)
        names[v] = f"label {v} (unnamed)"
    data = {"labels": label_table(names), "cases": [c.to_json() for c in cases], "ct_windows": {k: list(v) for k, v in CT_WINDOWS.items()}}
    return (
        f"<div id=volseg-viewer data-state=loading>{_controls()}"
        f"<p class=note>Drag to move the crosshair, scroll to change slice, right-drag to window; in 3D drag to rotate. "
        f"Viewer: NiiVue {html.escape(script.version)} (BSD-2-Clause, npm {NPM_PACKAGE}), embedded; works offline.</p></div>\n"
        f"<script>{js}</script>\n"
        f"<script type=application/json id=volseg-viewer-data>{_safe_json(data)}</script>\n"
        f"<script>{own}</script>"
    )


def write_viewer(
    output: PathLike,
    image: Optional[Layer] = None,
    pred: Optional[Layer] = None,
    truth: Optional[Layer] = None,
    labels: Optional[Mapping[int, str]] = None,
    name: Optional[str] = None,
    max_bytes: int = MAX_PAGE_BYTES,
) -> Path:
    """Write a self-contained one-case viewer page (scan with prediction and truth overlays) to
    ``output`` and return its path. ``labels``: value -> name (default: the values found, named
    ``label N``). The page stays under ``max_bytes`` (the case is subsampled to fit, else
    :class:`~volseg.viz.niivue.ViewerError`)."""
    output = Path(output)
    script = niivue_script()
    title = name or (Path(str(image)).name if isinstance(image, (str, Path)) else "case")
    case = pack_case(title, image, pred, truth, max_bytes=max_bytes - len(script.text) - 20_000)
    labels = dict(labels) if labels else {v: f"label {v}" for v in case.label_values}
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>volseg view: {html.escape(title)}</title><style>body{{font-family:system-ui,sans-serif;margin:1em}}"
        f".note{{color:#777}}{VIEWER_CSS}</style></head><body><h2>{html.escape(title)}</h2>"
        f"{viewer_section([case], labels, script)}</body></html>\n"
    )
    with atomic_write(output) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.1f MB)", output, len(page) / 1e6)
    return output
