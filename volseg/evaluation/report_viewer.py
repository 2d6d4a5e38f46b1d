"""The report's interactive section: evaluated cases in the NiiVue viewer, under a byte cap."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from .. import viz
from .metrics import EvaluationError, EvaluationResult

log = logging.getLogger(__name__)

__all__ = ["pick_cases", "run_labels", "viewer_html"]


def run_labels(run_dir: Path, fallback: Mapping[int, str]) -> Dict[int, str]:
    """Label value -> name from the run folder's ``dataset.json`` (what training saw), else
    ``fallback`` (the evaluation's names)."""
    path = run_dir / "dataset.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8")).get("labels") if path.is_file() else None
        if isinstance(raw, dict) and raw:
            names = {int(k): str(v) for k, v in raw.items()}
            return {k: v for k, v in names.items() if k != 0} or dict(fallback)
    except (ValueError, OSError) as exc:
        log.warning("%s: labels unreadable (%s); using the evaluation's label names.", path, exc)
    return dict(fallback)


def pick_cases(result: EvaluationResult, cases: Optional[Sequence[str]]) -> List[str]:
    """The cases to show: ``cases`` in the order given, else every evaluated case, worst first."""
    known = result.worst_cases()
    if cases is None:
        return known
    unknown = [c for c in cases if c not in known]
    if unknown:
        raise EvaluationError(f"--cases {', '.join(unknown)}: not in the evaluation; its cases are {', '.join(known)}.")
    return list(cases)


def viewer_html(result: EvaluationResult, labels: Mapping[int, str], names: Sequence[str], budget: int) -> str:
    """The viewer section for ``names`` in at most ``budget`` characters, or a note saying why
    there is none. The budget is shared out as the cases are packed (a case that packs small
    leaves more for the rest); a case that cannot fit its share is left out, with a note."""
    try:
        script = viz.niivue_script()
    except viz.ViewerError as exc:
        log.warning("report without the 3D viewer: %s", exc)
        return f"<p class=note>No interactive viewer: {html.escape(str(exc))}</p>"
    by_case = {r["case"]: r for r in result.rows}
    left = budget - len(script.text) - 60_000  # controls, controller script, JSON framing
    packed, notes = [], []
    for i, name in enumerate(names):
        r = by_case[name]
        paths = {k: r.get(k) for k in ("image_path", "pred_path", "truth_path")}
        missing = [str(p) for p in paths.values() if p and not Path(p).is_file()]
        if not paths["pred_path"] or missing:
            notes.append(f"{name}: {'files not found: ' + ', '.join(missing) if missing else 'no prediction path recorded'}")
            continue
        share = left // (len(names) - i)
        try:
            case = viz.pack_case(name, paths["image_path"], paths["pred_path"], paths["truth_path"], max_bytes=max(share, 0))
        except (viz.ViewerError, ValueError, OSError) as exc:  # one bad case must not cost the viewer
            notes.append(f"{name}: left out ({exc})")
            continue
        left -= case.nbytes
        packed.append(case)
    note = "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes)
    if not packed:
        return note or "<p class=note>No case to show in the viewer.</p>"
    return viz.viewer_section(packed, labels, script) + note
