"""The built-in demo: phantoms -> training -> inference -> evaluation -> HTML report.

Everything goes under one folder (``demo/`` by default): ``data/`` (synthetic CT phantoms and
their ``dataset.json``), ``run/`` (the run folder), ``predictions/``, ``run/eval/`` and
``run/report.html``. Re-running reuses the data, resumes an unfinished run and redoes the rest.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence, Union

from ..config import load_config
from ..data.synth import make_dataset
from ..evaluation import evaluate, write_report
from ..inference import collect_inputs, infer_many
from ..training import train

log = logging.getLogger(__name__)

__all__ = ["run_demo", "demo_config"]


def demo_config(overrides: Sequence[str] = ()):
    """The shipped ``demo`` config (``configs/demo.yaml``, package data once installed) with
    ``overrides`` applied."""
    return load_config("demo", overrides)


def run_demo(output: Union[str, Path] = "demo", device: str = "auto", overrides: Sequence[str] = (), progress: bool = False,
             cases: int = 10, test_cases: int = 4, shape: Sequence[int] = (64, 64, 48)) -> dict:
    """Run the whole pipeline on synthetic CT phantoms; return paths, minutes and test Dice."""
    t0 = time.perf_counter()
    out = Path(output)
    data = out / "data"
    manifest = data / "dataset.json"
    if not manifest.is_file():
        log.info("generating %d + %d synthetic CT phantoms in %s", cases, test_cases, data)
        make_dataset(data, cases=cases, modality="ct", seed=0, test_cases=test_cases, shape=shape)
    cfg = demo_config(overrides)
    run = out / "run"
    train(manifest, cfg, run, resume=(run / "last.pt").is_file(), device=device, progress=progress)
    pred_dir = out / "predictions"
    failures = infer_many(collect_inputs([manifest], pred_dir), run, device=device, progress=progress)
    if failures:
        raise RuntimeError(f"demo inference failed for {[j.name for j, _ in failures]}")
    eval_dir = run / "eval"  # where `volseg report` and the notebook look by default
    result = evaluate(pred_dir, manifest, labels=manifest, output=eval_dir, images=manifest)
    report = write_report(run, eval_dir=eval_dir)
    return {
        "minutes": (time.perf_counter() - t0) / 60,
        "dice": result.summary["mean_foreground_dice"],
        "data": str(data),
        "run": str(run),
        "predictions": str(pred_dir),
        "evaluation": str(eval_dir),
        "report": str(report),
    }
