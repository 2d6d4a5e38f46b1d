"""Fine-tuning: a new run's network starts from the weights of another (``--pretrained``).

The source is a run folder (its ``best.pt``, else ``last.pt``), one fold of a cross-validation
run (``PARENT/fold_k``: a run folder), a checkpoint file (``best.pt`` / ``last.pt``, read with
``weights_only=True``) or a TorchScript file written by ``volseg export`` (its wrapper's ``net.``
prefix dropped). Checks are strict: every tensor of the new network must exist in the source with
the same shape, except the output head (``heads.*``), which is re-initialised (and said so) when
its shape or the source's outputs (its label or region names) differ. Anything else that differs
is one error listing the mismatched tensors. ``RUN/pretrained.json`` records the source, what was
loaded and whether the head was reused.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..config import ConfigError
from ..data.io import write_text
from ..data.plan import PreprocessingPlan
from ..runfolder import RunFolderError, is_cv_parent, load_checkpoint, read_plan

log = logging.getLogger(__name__)

__all__ = ["load_pretrained", "PRETRAINED_FILE", "HEAD_PREFIX"]

PRETRAINED_FILE = "pretrained.json"
#: the output convolutions of every network of :mod:`volseg.nets` (one per deep-supervision level)
HEAD_PREFIX = "heads."


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _source_state(source: Path) -> Tuple[Dict, Optional[Tuple[str, ...]], str, Path]:
    """(state dict, the source's output names or None, kind, the file read)."""
    import torch

    if source.is_dir():
        if is_cv_parent(source):
            folds = sorted(p.name for p in source.glob("fold_*"))
            raise ConfigError(f"--pretrained {source} is a cross-validation parent; name one of its folds ({', '.join(folds)}).")
        if not (source / "plan.json").is_file():
            raise ConfigError(f"--pretrained {source}: not a run folder (no plan.json); give a run, a fold folder, a checkpoint or an exported model.")
        file = next((source / n for n in ("best.pt", "last.pt") if (source / n).is_file()), None)
        if file is None:
            raise ConfigError(f"--pretrained {source}: the run has no best.pt or last.pt (has it trained?).")
        return load_checkpoint(file)["model"], read_plan(source).output_names, "run", file
    if not source.is_file():
        raise ConfigError(f"--pretrained {source}: no such run folder or file.")
    if _is_torchscript(source):
        net = torch.jit.load(str(source), map_location="cpu")
        state = {k[len("net."):]: v for k, v in net.state_dict().items() if k.startswith("net.")}
        meta = source.with_name(source.name.split(".")[0] + ".json")
        names = None
        if meta.is_file():
            names = tuple(json.loads(meta.read_text(encoding="utf-8")).get("output", {}).get("names") or ()) or None
        return state, names, "exported", source
    plan_file = source.parent / "plan.json"
    names = read_plan(source.parent).output_names if plan_file.is_file() else None
    return load_checkpoint(source)["model"], names, "checkpoint", source


def load_pretrained(model, source: Union[str, Path], plan: PreprocessingPlan, run: Optional[Path] = None) -> dict:
    """Load ``source``'s weights into ``model`` (see the module's text); write
    ``RUN/pretrained.json`` when ``run`` is given; return that record."""
    import torch

    source = Path(source)
    state, names, kind, file = _source_state(source)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)}
    body_bad = [k for k in missing + unexpected + list(shapes) if not k.startswith(HEAD_PREFIX)]
    if body_bad:
        parts: List[str] = []
        parts += [f"{k}: {shapes[k][0]} in the source, {shapes[k][1]} here" for k in sorted(shapes) if not k.startswith(HEAD_PREFIX)]
        parts += [f"{k}: not in the source" for k in missing if not k.startswith(HEAD_PREFIX)]
        parts += [f"{k}: not in this network" for k in unexpected if not k.startswith(HEAD_PREFIX)]
        shown = "; ".join(parts[:8]) + (f"; ... ({len(parts)} in all)" if len(parts) > 8 else "")
        raise RunFolderError(f"--pretrained {file}: its network does not match this run's ({len(parts)} mismatched tensors: {shown}); "
                             "use the same model settings (variant, features, levels, channels) as the source run.")
    head_keys = [k for k in own if k.startswith(HEAD_PREFIX)]
    new_names = plan.output_names
    reinit = any(k.startswith(HEAD_PREFIX) for k in missing + unexpected + list(shapes)) or (names is not None and tuple(names) != tuple(new_names))
    load = {k: v for k, v in state.items() if k in own and not (reinit and k.startswith(HEAD_PREFIX))}
    with torch.no_grad():
        model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in load.items()}})
    if reinit:
        log.warning("--pretrained %s: output head re-initialised: the source predicts %s, this run %s (%d tensors loaded, %d head tensors new)",
                    file, list(names) if names is not None else "other outputs", list(new_names), len(load), len(head_keys))
    else:
        log.info("--pretrained %s: all %d tensors loaded (output head reused)", file, len(load))
    record = {"source": str(source.resolve()), "file": str(file.resolve()), "kind": kind, "tensors_loaded": len(load),
              "head": "reinitialised" if reinit else "reused", "source_outputs": list(names) if names is not None else None,
              "outputs": list(new_names)}
    if run is not None:
        write_text(Path(run) / PRETRAINED_FILE, json.dumps(record, indent=2) + "\n")
    return record
