"""ignite handlers of a training run: timing, periodic validation, the epoch record
(metrics.csv, TensorBoard, best.pt, last.pt) and the stop on a diverging loss."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from .. import distributed
from ..config import ConfigError
from ..data.io import save_torch, write_text
from ..metrics import dice_per_output

log = logging.getLogger(__name__)

__all__ = ["TrainingDivergedError", "EpochRecord", "attach_timing", "attach_validation", "attach_nan_stop"]


class TrainingDivergedError(ConfigError):
    """The training loss became NaN or infinite; the message names the iteration."""




def attach_timing(trainer, row: Dict[str, float]) -> None:
    """Per epoch: ``data_wait_s`` (time the loop waited for batches, ignite's
    GET_BATCH_STARTED/COMPLETED) and ``train_s`` (all training steps, data wait included)."""
    from ignite.engine import Events

    clock: Dict[str, float] = {}

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine):
        row.clear()
        row.update(data_wait_s=0.0, losses=[])
        clock["epoch"] = clock["train"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_STARTED)
    def _wait(engine):
        clock["batch"] = time.perf_counter()

    @trainer.on(Events.GET_BATCH_COMPLETED)
    def _got(engine):
        row["data_wait_s"] += time.perf_counter() - clock["batch"]

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step(engine):
        row["losses"].append(engine.state.output)
        row["train_s"] = time.perf_counter() - clock["train"]
        row["epoch_t0"] = clock["epoch"]


def attach_validation(trainer, model, predictor, val_ds, plan, every: int, row: Dict) -> None:
    """Every ``every`` epochs and after the last one: mean foreground Dice per class over the
    validation cases, with the predictor ``volseg infer`` uses. The network runs in eval mode
    (MONAI ``eval_mode``: no dropout, batch-norm statistics neither used from the batch nor
    updated) and its previous mode is restored afterwards.

    With several processes ``val_ds`` is this rank's shard of the cases; the per-case scores of
    all ranks are gathered (a few numbers per case) and put back in the cases' order, so the mean
    is exactly that of one process predicting them all."""
    from ignite.engine import Events
    from monai.networks import eval_mode

    names = list(plan.region_names) if plan.has_regions else list(plan.label_names[1:])
    told: List[bool] = []

    def due(engine, epoch: int) -> bool:
        return epoch % every == 0 or epoch == engine.state.max_epochs

    @trainer.on(Events.EPOCH_COMPLETED(event_filter=due))
    def _validate(engine):
        with eval_mode(model):
            mine = [(v["name"], dice_per_output(predictor.predict_index(v["image"]), np.asarray(v["label"])[0], plan)[1])
                    for v in (val_ds[i] for i in range(len(val_ds)))]
        shares = distributed.all_gather(mine)
        if len(shares) > 1:
            log.info("validation split over %d processes: %s cases", len(shares), "+".join(str(len(s)) for s in shares))
            if not told:  # the names once per run
                told.append(True)
                log.info("validation cases per rank: %s", "; ".join(f"rank {r}: {' '.join(n for n, _ in s)}" for r, s in enumerate(shares)))
        scores = np.array([d for _, d in distributed.unshard(shares)])
        if len(scores) == 0:
            return
        per_class = scores.mean(0)
        row["val_dice_mean"] = float(per_class.mean())
        row.update({f"val_dice_{n}": float(d) for n, d in zip(names, per_class)})


def attach_nan_stop(trainer) -> None:
    """ignite's ``TerminateOnNan``: the run stops after the step whose loss is not finite,
    before that epoch's checkpoint is written; :func:`raise_if_diverged` then reports it."""
    from ignite.engine import Events
    from ignite.handlers import TerminateOnNan

    stop = TerminateOnNan()
    stop.logger.setLevel(logging.ERROR)  # raise_if_diverged says it in one line instead
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)


def raise_if_diverged(trainer, lr: float, run: Path) -> None:
    out = trainer.state.output
    if isinstance(out, float) and not math.isfinite(out):
        raise TrainingDivergedError(
            f"training loss became {out} at iteration {trainer.state.iteration} (epoch {trainer.state.epoch}); "
            f"{run / 'last.pt'} keeps the last completed epoch. Lower train.lr (now {lr:g}), e.g. --set train.lr={lr / 10:g}."
        )


class EpochRecord:
    """At the end of every epoch: one metrics.csv row, TensorBoard scalars, best.pt when the
    validation Dice improves, then last.pt (model, optimiser, scheduler, scaler, engine, and the
    RNG states of every process, ``engine.state.rng_states``). Attached on rank 0 only."""

    def __init__(self, run: Path, plan, parts, row: Dict, best: float = -1.0):
        self.run, self.parts, self.row, self.best = run, parts, row, best
        self.names = list(plan.region_names) if plan.has_regions else list(plan.label_names[1:])
        self.header = (["epoch", "train_loss", "lr", "val_dice_mean"] + [f"val_dice_{n}" for n in self.names]
                       + ["data_wait_s", "train_s", "epoch_time_s"])
        self.csv = run / "metrics.csv"

    def attach(self, trainer, tb_logger) -> None:
        from ignite.engine import Events
        from ignite.handlers.tensorboard_logger import OutputHandler

        if not self.csv.exists():
            write_text(self.csv, ",".join(self.header) + "\n")
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.summarise)
        # TensorBoard gets this epoch's row (engine.state.metrics) before the checkpoints
        tb_logger.attach(trainer, OutputHandler(tag="epoch", metric_names="all"), Events.EPOCH_COMPLETED)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def summarise(self, engine) -> None:
        r = self.row
        r["epoch"] = engine.state.epoch
        r["train_loss"] = float(np.mean(r.pop("losses")))
        r["lr"] = self.parts.opt.param_groups[0]["lr"]
        r["epoch_time_s"] = time.perf_counter() - r.pop("epoch_t0")
        metrics = engine.state.metrics
        for k in [k for k in metrics if k.startswith("val_")]:  # no stale validation scores in TensorBoard
            del metrics[k]
        metrics.update({k: v for k, v in r.items() if k != "epoch"})

    def save(self, engine) -> None:
        r, p, ep = self.row, self.parts, engine.state.epoch
        mean = r.get("val_dice_mean")
        if mean is not None and mean > self.best:
            self.best = mean
            save_torch({"model": p.model.state_dict(), "epoch": ep, "val_dice_mean": mean}, self.run / "best.pt")
        with open(self.csv, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([_fmt(r.get(h)) for h in self.header])
        state = {"model": p.model.state_dict(), "optimizer": p.opt.state_dict(), "scheduler": p.sched.state_dict(),
                 "scaler": p.scaler.state_dict(), "engine": engine.state_dict(), "epoch": ep, "best": self.best,
                 "rng": engine.state.rng_states}
        save_torch(state, self.run / "last.pt")
        msg = f"epoch {ep}/{engine.state.max_epochs} loss {r['train_loss']:.4f}"
        if mean is not None:
            msg += f" val dice {mean:.4f} (" + ", ".join(f"{n} {r[f'val_dice_{n}']:.3f}" for n in self.names) + ")"
        log.info(msg + f" [{r['epoch_time_s']:.1f}s, data wait {r['data_wait_s']:.1f}s]")


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)
