"""The built-in demo: phantoms -> training -> inference -> evaluation -> HTML report.

Everything goes under one folder (``demo/`` by default): ``data/`` (synthetic CT phantoms and
their ``dataset.json``), ``run/`` (the run folder), ``predictions/``, ``run/eval/`` and
``run/report.html``. Re-running reuses the data, resumes an unfinished run and redoes the rest.
"""

from __future__ import annotations

import csv
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
    """Run the whole pipeline on synthetic CT phantoms; return paths, test Dice and minutes:
    ``minutes`` the whole pipeline's, including the epochs an earlier, interrupted call trained
    (from the run's metrics.csv), ``minutes_this_call`` this call's alone."""
    t0 = time.perf_counter()
    out = Path(output)
    data = out / "data"
    manifest = data / "dataset.json"
    if not manifest.is_file():
        log.info("generating %d + %d synthetic CT phantoms in %s", cases, test_cases, data)
        make_dataset(data, cases=cases, modality="ct", seed=0, test_cases=test_cases, shape=shape)
    cfg = demo_config(overrides)
    run = out / "run"
    resumed = (run / "last.pt").is_file()
    earlier_s = _trained_seconds(run / "metrics.csv") if resumed else 0.0  # the epochs an earlier call trained
    train(manifest, cfg, run, resume=resumed, device=device, progress=progress)
    pred_dir = out / "predictions"
    failures = infer_many(collect_inputs([manifest], pred_dir), run, device=device, progress=progress)
    if failures:
        raise RuntimeError(f"demo inference failed for {[j.name for j, _ in failures]}")
    eval_dir = run / "eval"  # where `volseg report` and the notebook look by default
    result = evaluate(pred_dir, manifest, labels=manifest, output=eval_dir, images=manifest)
    report = write_report(run, eval_dir=eval_dir)
    this_call = (time.perf_counter() - t0) / 60
    return {
        "minutes": this_call + earlier_s / 60,
        "minutes_this_call": this_call,
        "resumed": resumed,
        "dice": result.summary["mean_foreground_dice"],
        "data": str(data),
        "run": str(run),
        "predictions": str(pred_dir),
        "evaluation": str(eval_dir),
        "report": str(report),
    }


def _trained_seconds(metrics_csv: Path) -> float:
    """Seconds of the epochs already in ``metrics.csv`` (``epoch_time_s``), 0 without the file."""
    if not metrics_csv.is_file():
        return 0.0
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        return float(sum(float(row["epoch_time_s"] or 0) for row in csv.DictReader(f)))
