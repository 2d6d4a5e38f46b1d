"""Training: manifest -> plan -> cached preprocessed cases -> ignite engine -> run folder.

:func:`train` reads as its steps: lock the run folder, set up (config, split, plan), build the
data, build model/optimiser/loss/schedule, restore (``--resume``), attach handlers, run.

The run folder describes itself, so ``volseg infer --model RUN`` needs nothing else::

    RUN/config.yaml     resolved config (CLI overrides applied, channels filled in)
    RUN/plan.json       preprocessing plan (spacing, orientation, normalisation, labels, patch)
    RUN/planned_config.yaml, RUN/fingerprint.json   without a config: the planner's commented
                        config and the dataset fingerprint it was planned from
    RUN/dataset.json    manifest name, labels, channels and the train/validation split
    RUN/versions.json   volseg, torch, monai, python versions
    RUN/last.pt         model, optimiser, scheduler, scaler, engine and RNG state (every epoch)
    RUN/best.pt         the best validation mean foreground Dice so far
    RUN/metrics.csv     one row per epoch (loss, lr, validation Dice, data wait, times)
    RUN/tb/             TensorBoard events; RUN/train.log; RUN/.lock (held while training)

Determinism: ``monai.utils.set_determinism(train.seed)`` seeds torch, numpy and python; the
patch sampler and the augmentation have their own seeded streams (per epoch), so on the CPU
the same seed, data and config give bit-identical weights (tested). On CUDA, cuDNN is asked
for deterministic algorithms (``set_determinism``), and two runs of a small default-config
network gave bit-identical weights with and without AMP on an H100 (torch 2.11, 2026-11-25);
but ``torch.use_deterministic_algorithms`` is not enforced, so kernels that accumulate with
atomics (e.g. some interpolation and scatter backward passes), another GPU model, driver or
library version can change the last bits: bitwise equality is promised on the CPU only. With
``data.num_workers > 0`` each worker's augmentation stream is seeded from the torch seed, so
runs stay reproducible for a fixed worker count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

from ..config import Config, ConfigError, replace
from ..data.manifest import Manifest, load_manifest, split_cases, validate_cases
from ..data.preprocess import Plan, make_plan
from .handlers import EpochRecord, attach_nan_stop, attach_timing, attach_validation, dice_per_class, raise_if_diverged
from .run_folder import (RunLock, attach_log_file, load_checkpoint, read_config, read_plan, set_rng_state, stored_split,
                         truncate_csv, write_run_files)

log = logging.getLogger(__name__)

__all__ = ["train", "dice_per_class", "poly_schedule"]


@dataclass
class Parts:
    """What a step needs: network, optimiser, schedule, AMP scaler, loss, device, sampler RNG."""

    model: Any
    opt: Any
    sched: Any
    scaler: Any
    loss: Any
    device: Any
    amp: bool
    generator: Any


def train(
    manifest: Union[str, Path],
    cfg: Optional[Config],
    output: Union[str, Path],
    resume: bool = False,
    device: str = "auto",
    progress: bool = False,
    overrides: Sequence[str] = (),
    plan: Optional[Plan] = None,
) -> Path:
    """Train a network on ``manifest`` into the run folder ``output``; return its path.

    ``resume=True`` continues from ``output/last.pt`` with optimiser, scheduler, scaler, epoch
    and RNG state, on the train/validation split stored in ``output/dataset.json``. The stored
    config is used; a given ``cfg`` only contributes ``train.epochs`` (to extend the run; the
    poly schedule is rebuilt for the new total). ``cfg=None`` on a new run plans one from the data
    (:mod:`volseg.data.planning`, for ``device``; ``RUN/planned_config.yaml`` and
    ``RUN/fingerprint.json`` keep the plan) with ``overrides`` (``section.key=value``) on top.
    While it runs, ``output/.lock`` refuses a second ``train`` on the same folder.
    ``plan``: use this preprocessing plan instead of fingerprinting the split's training cases
    (cross-validation folds share one, :mod:`.folds`). At the end the validation cases are
    segmented into ``output/val_predictions/`` and the postprocessing rule is learned from them
    (:func:`volseg.evaluation.cv.finish_validation`).
    """
    run = Path(output)
    if resume and not (run / "last.pt").is_file():
        raise FileNotFoundError(f"--resume: {run / 'last.pt'} does not exist; start a new run without --resume.")
    man = load_manifest(manifest)  # before the folder is made: a bad manifest leaves nothing behind
    run.mkdir(parents=True, exist_ok=True)
    with RunLock(run):
        if not resume and (run / "last.pt").exists():
            raise FileExistsError(f"{run} already holds a run (last.pt); pass --resume to continue it or choose another --output.")
        attach_log_file(run / "train.log")
        if cfg is None and not resume:
            cfg = _planned(man, run, device, overrides)
        cfg, plan, split = _setup(man, cfg, run, resume, plan)
        _fit(run, cfg, plan, split, resume, device, progress)
        from ..evaluation.cv import finish_validation

        finish_validation(run, split[1], device)
        return run


def _planned(man: Manifest, run: Path, device: str, overrides: Sequence[str]) -> Config:
    """The planner's config for ``man`` on ``device``, with ``overrides`` applied (checked
    first: a mistyped key fails before the data are read)."""
    from ..config import load_config
    from ..data.planning import plan_manifest
    from ..inference.predictor import resolve_device

    load_config(None, overrides)
    return plan_manifest(man, run / "planned_config.yaml", device=resolve_device(device).type,
                         fingerprint_path=run / "fingerprint.json", overrides=overrides)


def _setup(man: Manifest, cfg: Optional[Config], run: Path, resume: bool, plan: Optional[Plan] = None) -> Tuple[Config, Plan, tuple]:
    """(config, plan, (train cases, validation cases)): read back from the run folder on
    resume, else computed and written to it."""
    if resume:
        stored = read_config(run)
        cfg = stored if cfg is None else replace(stored, train={"epochs": cfg.train.epochs})
        plan, split = read_plan(run), stored_split(run, man)
        validate_cases(man, split[0] + split[1], min_cases=cfg.data.min_cases)
    else:
        cfg = cfg if cfg is not None else Config()
        split = split_cases(man, cfg.data.val_fraction, cfg.train.seed, cfg.data.folds, cfg.data.fold)
        validate_cases(man, tuple(split[0]) + tuple(split[1]), min_cases=cfg.data.min_cases)
        if plan is None:
            log.info("fingerprinting %d training cases", len(split[0]))
            plan = make_plan(man, split[0], cfg, seed=cfg.train.seed)
        cfg = _resolve(cfg, man, plan)
        write_run_files(run, cfg, plan, man, split)
    log.info("%s: %d training, %d validation cases", man.name, len(split[0]), len(split[1]))
    log.info("plan: spacing %s mm, orientation %s, patch %s, %d classes", plan.spacing, plan.orientation, plan.patch_size, plan.num_classes)
    return cfg, plan, split


def _resolve(cfg: Config, manifest: Manifest, plan: Plan) -> Config:
    m = cfg.model
    n_in, n_out = len(manifest.modalities), plan.out_channels
    if m.in_channels not in (None, n_in):
        raise ConfigError(f"model.in_channels={m.in_channels} but the manifest declares {n_in} channel(s) {list(manifest.modalities)}.")
    if m.out_channels not in (None, n_out):
        raise ConfigError(
            f"model.out_channels={m.out_channels} but the manifest's labels {manifest.labels} need {n_out} "
            "(1 sigmoid output for a single foreground label, else one per label including background)."
        )
    return replace(cfg, model={"in_channels": n_in, "out_channels": n_out})


def _fit(run: Path, cfg: Config, plan: Plan, split: tuple, resume: bool, device: str, progress: bool) -> Path:
    from ignite.engine import Engine
    from ignite.handlers.tensorboard_logger import TensorboardLogger
    from monai.utils import set_determinism

    from ..inference.predictor import Predictor

    t = cfg.train
    set_determinism(seed=t.seed)
    parts = build_parts(cfg, plan, device)
    loader, val_ds, transform = _loaders(cfg, plan, split, run, parts.generator)
    trainer = Engine(_step(parts, t.grad_clip))
    best = -1.0
    if resume:
        done, best = _restore(run, parts, trainer, t.epochs * t.steps_per_epoch, t.poly_power)
        if done >= t.epochs:
            log.info("run already complete (%d/%d epochs); raise train.epochs to continue it", done, t.epochs)
            return run
        trainer.state.max_epochs = t.epochs  # extend: a finished state with the old total would restart at epoch 0
    row: dict = {}
    tb = TensorboardLogger(log_dir=str(run / "tb"))
    _attach(trainer, parts, Predictor(parts.model, plan, cfg.infer, parts.device), val_ds, plan, cfg, transform, row, progress)
    EpochRecord(run, plan, parts, row, best).attach(trainer, tb)
    if len(val_ds) == 0:
        log.warning("no validation cases: best.pt is not written; inference uses last.pt")
    try:
        trainer.run(loader, max_epochs=t.epochs, epoch_length=t.steps_per_epoch)
    finally:
        tb.close()
    raise_if_diverged(trainer, t.lr, run)
    return run


def _loaders(cfg: Config, plan: Plan, split: tuple, run: Path, generator):
    """(training loader of ``steps_per_epoch`` batches per epoch, validation dataset, training
    transform)."""
    import torch
    from monai.data import DataLoader

    from .data import build_datasets

    t = cfg.train
    num_samples = max(1, min(cfg.data.samples_per_volume, t.batch_size))
    loader_batch = max(1, t.batch_size // num_samples)
    train_ds, val_ds, transform = build_datasets(split[0], split[1], plan, cfg, run, num_samples)
    sampler = torch.utils.data.RandomSampler(train_ds, replacement=True, num_samples=t.steps_per_epoch * loader_batch, generator=generator)
    loader = DataLoader(train_ds, batch_size=loader_batch, sampler=sampler, num_workers=cfg.data.num_workers, drop_last=True)
    return loader, val_ds, transform


def poly_schedule(opt, total_iters: int, power: float):
    """``lr = base_lr * (1 - iteration / total_iters) ** power`` (closed form, so a resumed run
    with a new total follows the new curve from where it stands)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda it: max(0.0, 1.0 - it / total_iters) ** power)


def build_parts(cfg: Config, plan: Plan, device: str) -> Parts:
    """Network, optimiser, poly schedule, AMP scaler and loss for ``cfg`` and ``plan``."""
    import torch
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    from ..inference.predictor import resolve_device
    from ..nets import build_network

    t, dev = cfg.train, resolve_device(device)
    model = build_network(cfg.model, len(plan.channels), plan.out_channels).to(dev)
    if t.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay)
    if t.class_weights and len(t.class_weights) != plan.out_channels:
        raise ConfigError(f"train.class_weights has {len(t.class_weights)} entries; the network has {plan.out_channels} output channel(s).")
    weight = torch.tensor(t.class_weights, dtype=torch.float32, device=dev) if t.class_weights else None
    loss = DiceCELoss(include_background=plan.binary, to_onehot_y=not plan.binary, softmax=not plan.binary, sigmoid=plan.binary,
                      weight=weight, lambda_dice=t.lambda_dice, lambda_ce=t.lambda_ce, batch=True)
    if cfg.model.deep_supervision:
        loss = DeepSupervisionLoss(loss, weight_mode="exp")
    amp = t.amp and dev.type == "cuda"
    return Parts(model, opt, poly_schedule(opt, t.epochs * t.steps_per_epoch, t.poly_power), torch.amp.GradScaler("cuda", enabled=amp),
                 loss, dev, amp, torch.Generator().manual_seed(t.seed))


def _step(p: Parts, grad_clip: float):
    import torch

    def step(engine, batch) -> float:
        p.model.train()
        x = batch["image"].to(p.device, non_blocking=True)
        y = batch["label"].to(p.device, non_blocking=True).float()
        p.opt.zero_grad(set_to_none=True)
        with torch.autocast(p.device.type, enabled=p.amp):
            out = p.model(x)
        out = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
        loss = p.loss(out, y)
        p.scaler.scale(loss).backward()
        if grad_clip > 0:
            p.scaler.unscale_(p.opt)
            torch.nn.utils.clip_grad_norm_(p.model.parameters(), grad_clip)
        p.scaler.step(p.opt)
        p.scaler.update()
        p.sched.step()
        return loss.item()

    return step


def _restore(run: Path, p: Parts, trainer, total_iters: int, power: float) -> Tuple[int, float]:
    """Load last.pt into ``p`` and ``trainer``; return (epochs done, best validation Dice).
    The schedule keeps its position but follows the poly curve of ``total_iters``."""
    ckpt = load_checkpoint(run / "last.pt")
    try:
        p.model.load_state_dict(ckpt["model"])
        p.opt.load_state_dict(ckpt["optimizer"])
        p.sched.load_state_dict(ckpt["scheduler"])
        p.scaler.load_state_dict(ckpt["scaler"])
        trainer.load_state_dict(ckpt["engine"])
        set_rng_state(ckpt["rng"], p.generator)
        epoch, best = int(ckpt["epoch"]), float(ckpt["best"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        from .run_folder import RunFolderError

        raise RunFolderError(f"{run / 'last.pt'}: does not match this run ({type(exc).__name__}: {str(exc)[:160]}); "
                             "start a new run or restore the file.") from None
    it = p.sched.last_epoch
    for group, base in zip(p.opt.param_groups, p.sched.base_lrs):
        group["lr"] = base * max(0.0, 1.0 - it / total_iters) ** power
    truncate_csv(run / "metrics.csv", epoch)
    log.info("resumed from %s at epoch %d (lr %.3g)", run / "last.pt", epoch, p.opt.param_groups[0]["lr"])
    return epoch, best


def _attach(trainer, p: Parts, predictor, val_ds, plan: Plan, cfg: Config, transform, row: dict, progress: bool) -> None:
    """Timing, augmentation seeding, validation, the NaN stop and (on a terminal) a progress bar."""
    from ignite.engine import Events

    seed = cfg.train.seed

    @trainer.on(Events.EPOCH_STARTED)
    def _seed_epoch(engine):
        # per-epoch transform seed: reproducible, and a resumed run continues the same stream
        transform.set_random_state(seed=(seed * 100_003 + engine.state.epoch) % 2**32)

    attach_timing(trainer, row)
    attach_nan_stop(trainer)
    attach_validation(trainer, p.model, predictor, val_ds, plan, cfg.train.val_every, row)
    if progress:  # the CLI turns it off when stderr is not a terminal (no carriage-return frames in logs)
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda loss: {"loss": loss})
