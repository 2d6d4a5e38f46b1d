"""Training: manifest -> plan -> cached preprocessed cases -> ignite engine -> run folder.

:func:`train` reads as its steps: lock the run folder, set up (config, split, plan), build the
data, build model/optimiser/loss/schedule, restore (``--resume``), attach handlers, run.

The run folder describes itself, so ``volseg infer --model RUN`` needs nothing else::

    RUN/config.yaml     resolved config (CLI overrides applied, channels filled in)
    RUN/plan.json       preprocessing plan (spacing, orientation, normalisation, labels, patch)
    RUN/fingerprint.json  the dataset fingerprint (one pass over the training cases) the plan,
                        and without a config the planned config, came from
    RUN/planned_config.yaml   without a config: the planner's commented config
    RUN/dataset.json    manifest name, labels, channels and the train/validation split
    RUN/versions.json   volseg, torch, monai, python versions
    RUN/last.pt         model, optimiser, scheduler, scaler, engine and RNG state (every epoch;
                        under torchrun: the unwrapped model and every process's RNG state)
    RUN/best.pt         the best validation mean foreground Dice so far
    RUN/metrics.csv     one row per epoch (loss, lr, validation Dice, data wait, times)
    RUN/tb/             TensorBoard events; RUN/train.log; RUN/.lock (held while training)

Determinism: ``monai.utils.set_determinism(train.seed)`` seeds torch, numpy and python; the
patch sampler and the augmentation have their own seeded streams (per epoch), so on the CPU
the same seed, data and config give bit-identical weights (tested). On CUDA, cuDNN is asked
for deterministic algorithms (``set_determinism``), but
``torch.use_deterministic_algorithms`` is not enforced, so kernels that accumulate with
atomics (e.g. some interpolation and scatter backward passes), another GPU model, driver or
library version can change the last bits: bitwise equality is promised on the CPU only. With
``data.num_workers > 0`` each worker's augmentation stream is seeded from the torch seed, so
runs stay reproducible for a fixed worker count.

Several processes (``torchrun ... -m volseg train``): see :func:`train` and :func:`_fit` for who
does what, the per-rank shards and seeds, and what the global batch and ``train.lr`` mean; the
same seed, data and number of processes give the same weights on the CPU (gloo), and a resume
by as many processes continues exactly.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

from .. import distributed
from ..config import Config, ConfigError, load_config, replace
from ..data.io import write_text
from ..data.manifest import Manifest, check_case_count, load_manifest, split_cases, validate_cases
from ..data.plan import PreprocessingPlan
from ..inference import ModelBundle, Predictor
from ..nets import build_network
from ..planning import fingerprint, make_plan, plan_from_fingerprint
from ..runfolder import RunFolderError, RunLock, load_checkpoint, read_config, read_plan, stored_split, write_run_files
from ..runtime import amp_dtype, resolve_device
from .data import build_datasets
from .handlers import EpochRecord, attach_nan_stop, attach_timing, attach_validation, raise_if_diverged
from .logfile import run_log
from .loss import build_loss
from .pretrained import load_pretrained
from .state import rng_state, set_rng_state, truncate_csv
from .validation import finish_validation

log = logging.getLogger(__name__)

__all__ = ["train", "poly_schedule", "build_parts"]


@dataclass
class Parts:
    """What a step needs: network, optimiser, schedule, AMP scaler, loss, device, sampler RNG."""

    model: Any
    opt: Any
    sched: Any
    scaler: Any
    loss: Any
    device: Any
    amp: Any  # the autocast dtype (runtime.amp_dtype), None: float32
    generator: Any
    ddp: Any = None  # the DistributedDataParallel wrapper that training steps go through; None in one process


def train(
    manifest: Union[str, Path],
    cfg: Optional[Config],
    output: Union[str, Path],
    resume: bool = False,
    device: str = "auto",
    progress: bool = False,
    overrides: Sequence[str] = (),
    plan: Optional[PreprocessingPlan] = None,
    pretrained: Optional[Union[str, Path]] = None,
) -> Path:
    """Train a network on ``manifest`` into the run folder ``output``; return its path.

    ``resume=True`` continues from ``output/last.pt`` with optimiser, scheduler, scaler, epoch
    and RNG state, on the train/validation split stored in ``output/dataset.json``. The stored
    config is used; a given ``cfg`` only contributes ``train.epochs`` (to extend the run; the
    poly schedule is rebuilt for the new total). ``cfg=None`` on a new run plans one from the data
    (:mod:`volseg.planning`, for ``device``; ``RUN/planned_config.yaml`` and
    ``RUN/fingerprint.json`` keep the plan) with ``overrides`` (``section.key=value``) on top.
    While it runs, ``output/.lock`` refuses a second ``train`` on the same folder.
    ``plan``: use this preprocessing plan instead of fingerprinting the manifest's training cases
    (cross-validation folds share one, :mod:`volseg.workflows.crossval`). At the end the
    validation cases are segmented into ``output/val_predictions/`` and the postprocessing rule
    is learned from them (:func:`volseg.training.validation.finish_validation`). While it runs,
    volseg's log records also go to ``output/train.log`` (attached for this call only).
    ``pretrained``: start from another run's weights (a run, a fold folder, a checkpoint or an
    exported TorchScript file; :mod:`volseg.training.pretrained`), recorded in
    ``output/pretrained.json``; not with ``resume`` (the run's own last.pt is its start).

    Under ``torchrun`` (:mod:`volseg.distributed`) every process calls this: rank 0 alone reads
    the manifest, plans, locks and writes the run folder and gives the others config, plan and
    split; each rank trains on its own shard of the training cases, validation is split over the
    ranks, and the DDP gradients are averaged, so the global batch is ``world_size x
    train.batch_size`` (see :func:`_fit`).
    """
    run = Path(output)
    if pretrained is not None and resume:
        raise ConfigError("--pretrained starts a new run from another run's weights; --resume continues this run from its last.pt: give one.")
    distributed.quiet_other_ranks()
    distributed.init(resolve_device(device).type)
    with ExitStack() as hold:  # rank 0 holds the run folder's lock and its log until training ends
        cfg, plan, split = distributed.on_main(_prepare, manifest, cfg, run, resume, device, overrides, hold, plan)
        _fit(run, cfg, plan, split, resume, device, progress and distributed.is_main(), pretrained)
        if distributed.is_main():  # one process segments the validation cases and learns the rule
            finish_validation(run, split[1], device)
        # the others wait for it: a rank that leaves (and tears its group down) while rank 0 still
        # works made gloo abort that rank now and then (SIGABRT in a 2-process test)
        distributed.barrier()
        return run


def _prepare(manifest, cfg: Optional[Config], run: Path, resume: bool, device: str, overrides: Sequence[str],
             hold: ExitStack, plan: Optional[PreprocessingPlan] = None) -> Tuple[Config, PreprocessingPlan, tuple]:
    """Rank 0: check and lock the run folder (the lock and the log file join ``hold``), then
    :func:`_setup`."""
    if resume and not (run / "last.pt").is_file():
        raise FileNotFoundError(f"--resume: {run / 'last.pt'} does not exist; start a new run without --resume.")
    man = load_manifest(manifest)  # before the folder is made: a bad manifest leaves nothing behind
    run.mkdir(parents=True, exist_ok=True)
    hold.enter_context(RunLock(run))
    if not resume and (run / "last.pt").exists():
        raise FileExistsError(f"{run} already holds a run (last.pt); pass --resume to continue it or choose another --output.")
    hold.enter_context(run_log(run / "train.log"))
    cfg, plan, split = _setup(man, cfg, run, resume, plan, device, overrides)
    world = distributed.world_size()
    if len(split[0]) < world:
        raise ConfigError(f"{len(split[0])} training case(s) cannot be shared by {world} processes (each trains on its own cases); "
                          f"start at most {len(split[0])} processes (torchrun --nproc_per_node x --nnodes).")
    if world > 1:
        log.info("%d processes: global batch %d patches (%d per process), each training on its own ~%d cases and validating ~%d",
                 world, world * cfg.train.batch_size, cfg.train.batch_size, -(-len(split[0]) // world), -(-len(split[1]) // world))
    return cfg, plan, split


def _setup(man: Manifest, cfg: Optional[Config], run: Path, resume: bool, plan: Optional[PreprocessingPlan] = None,
           device: str = "auto", overrides: Sequence[str] = ()) -> Tuple[Config, PreprocessingPlan, tuple]:
    """(config, plan, (train cases, validation cases)): read back from the run folder on
    resume, else computed and written to it. ``cfg=None``: planned from the data for ``device``
    with ``overrides`` on top (``RUN/planned_config.yaml``, ``RUN/fingerprint.json``)."""
    if resume:
        stored = read_config(run)
        cfg = stored if cfg is None else replace(stored, train={"epochs": cfg.train.epochs})
        plan, split = read_plan(run), stored_split(run, man)
        validate_cases(man, split[0] + split[1], min_cases=cfg.data.min_cases)
    else:
        # the split and the fingerprint's orientation and normalisation come from what the
        # planner does not change: the given config, or the defaults with the overrides (checked
        # here, before any scan is read)
        base = cfg if cfg is not None else load_config(None, overrides)
        check_case_count(man, base.data.min_cases)
        # every case a split can use, checked before splitting (whose warnings assume training goes ahead)
        validate_cases(man, man.training + man.validation, min_cases=base.data.min_cases)
        split = split_cases(man, base.data.val_fraction, base.train.seed, base.data.folds, base.data.fold)
        if plan is None:
            cfg, plan = _plan_from_data(man, split[0], cfg, base, run, device, overrides)
        elif cfg is None:
            cfg = base
        cfg = _resolve(cfg, man, plan)
        write_run_files(run, cfg, plan, man, split)
    log.info("%s: %d training, %d validation cases", man.name, len(split[0]), len(split[1]))
    log.info("plan: spacing %s mm, orientation %s, patch %s, %d classes", plan.spacing, plan.orientation, plan.patch_size, plan.num_classes)
    return cfg, plan, split


def _plan_from_data(man: Manifest, train_cases, cfg: Optional[Config], base: Config, run: Path, device: str,
                    overrides: Sequence[str]) -> Tuple[Config, PreprocessingPlan]:
    """One fingerprint pass over the manifest's training cases (``RUN/fingerprint.json``), then
    the planned config (when ``cfg`` is None) and the preprocessing plan, both from it; the
    normalisation's statistics come from ``train_cases`` (the split) alone."""
    log.info("fingerprinting %d training cases", len(man.training))
    fp = fingerprint(man, man.training, orientation=base.data.orientation, normalization=base.data.normalization, seed=base.train.seed,
                     norm_cases=train_cases)
    if cfg is None:
        cfg = plan_from_fingerprint(fp, man, run / "planned_config.yaml", device=resolve_device(device).type,
                                    fingerprint_path=run / "fingerprint.json", overrides=overrides)
    else:
        write_text(run / "fingerprint.json", json.dumps(dict(manifest=str(man.path), **fp), indent=2) + "\n")
    return cfg, make_plan(fp, man, cfg)


def _resolve(cfg: Config, manifest: Manifest, plan: PreprocessingPlan) -> Config:
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


def _fit(run: Path, cfg: Config, plan: PreprocessingPlan, split: tuple, resume: bool, device: str, progress: bool,
         pretrained: Optional[Union[str, Path]] = None) -> Path:
    """Build, restore and run the engine. With several processes each rank takes its shard of
    the training cases (``distributed.shard``: cached by that rank only) and draws its own
    patches: sampler and augmentation streams are seeded with ``train.seed + rank`` (rank 0's are
    those of a single-process run). ``train.batch_size`` is per rank; one optimiser step averages
    the gradients of all ``world_size x batch_size`` patches, and ``train.lr`` is the step size
    for that average: it is not scaled with the number of processes (set a larger one by hand if
    the bigger batch wants it). ``train.steps_per_epoch`` counts optimiser steps, so an epoch sees
    N x the patches."""
    from ignite.engine import Engine
    from ignite.handlers.tensorboard_logger import TensorboardLogger
    from monai.utils import set_determinism

    t = cfg.train
    set_determinism(seed=t.seed)  # the same initial weights on every rank
    parts = build_parts(cfg, plan, device)
    if pretrained is not None:  # every rank reads the file: the same weights everywhere
        load_pretrained(parts.model, pretrained, plan, run if distributed.is_main() else None)
    if distributed.rank() > 0:  # own dropout masks and loader-worker seeds
        set_determinism(seed=t.seed + distributed.rank())
    loader, val_ds, transform = _loaders(cfg, plan, split, run, parts.generator)
    trainer = Engine(_step(parts, t.grad_clip))
    best = -1.0
    if resume:
        done, best = _restore(run, parts, trainer, cfg)
        if done >= t.epochs:
            log.info("run already complete (%d/%d epochs); raise train.epochs to continue it", done, t.epochs)
            return run
        trainer.state.max_epochs = t.epochs  # extend: a finished state with the old total would restart at epoch 0
    parts.ddp = distributed.wrap(parts.model)
    row: dict = {}
    _attach(trainer, parts, Predictor(ModelBundle.of(parts.model, plan, cfg), cfg.infer, parts.device), val_ds, plan, cfg, transform, row, progress)
    tb = None
    if distributed.is_main():  # the run folder is rank 0's alone
        tb = TensorboardLogger(log_dir=str(run / "tb"))
        EpochRecord(run, plan, parts, row, best).attach(trainer, tb)
        if not split[1]:
            log.warning("no validation cases: best.pt is not written; inference uses last.pt")
    try:
        trainer.run(loader, max_epochs=t.epochs, epoch_length=t.steps_per_epoch)
    finally:
        if tb is not None:
            tb.close()
    raise_if_diverged(trainer, t.lr, run)
    return run


def _loaders(cfg: Config, plan: PreprocessingPlan, split: tuple, run: Path, generator):
    """(training loader of ``steps_per_epoch`` batches per epoch, validation dataset, training
    transform), each over this rank's shard of the cases."""
    from monai.data import DataLoader

    t = cfg.train
    num_samples = max(1, min(cfg.data.samples_per_volume, t.batch_size))
    loader_batch = max(1, t.batch_size // num_samples)
    train_ds, val_ds, transform = build_datasets(distributed.shard(split[0]), distributed.shard(split[1]), plan, cfg, run, num_samples)
    sampler = _sampler(train_ds, t.steps_per_epoch * loader_batch, generator)
    loader = DataLoader(train_ds, batch_size=loader_batch, sampler=sampler, num_workers=cfg.data.num_workers, drop_last=True)
    return loader, val_ds, transform


def _sampler(dataset, num_samples: int, generator):
    """Cases drawn with replacement: an epoch is a number of steps, not a pass over the cases."""
    import torch

    return torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=num_samples, generator=generator)


def poly_schedule(opt, total_iters: int, power: float):
    """``lr = base_lr * (1 - iteration / total_iters) ** power`` (closed form, so a resumed run
    with a new total follows the new curve from where it stands)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda it: max(0.0, 1.0 - it / total_iters) ** power)


def build_parts(cfg: Config, plan: PreprocessingPlan, device: str) -> Parts:
    """Network, optimiser, poly schedule, AMP scaler and loss for ``cfg`` and ``plan``."""
    import torch
    from monai.losses import DeepSupervisionLoss

    t, dev = cfg.train, resolve_device(device)
    model = build_network(cfg.model, len(plan.channels), plan.out_channels).to(dev)
    if t.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay)
    if t.class_weights and len(t.class_weights) != plan.out_channels:
        raise ConfigError(f"train.class_weights has {len(t.class_weights)} entries; the network has {plan.out_channels} output channel(s).")
    weight = torch.tensor(t.class_weights, dtype=torch.float32, device=dev) if t.class_weights else None
    loss = build_loss(plan, t.lambda_dice, t.lambda_ce, weight)
    if cfg.model.deep_supervision:
        loss = DeepSupervisionLoss(loss, weight_mode="exp")
    amp = amp_dtype(dev) if t.amp else None
    # loss scaling only for float16: bfloat16 has float32's exponent range
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    return Parts(model, opt, poly_schedule(opt, t.epochs * t.steps_per_epoch, t.poly_power), scaler,
                 loss, dev, amp, torch.Generator().manual_seed(t.seed + distributed.rank()))


def _step(p: Parts, grad_clip: float):
    import torch

    def step(engine, batch) -> float:
        net = p.ddp if p.ddp is not None else p.model
        net.train()
        x = batch["image"].to(p.device, non_blocking=True)
        y = batch["label"].to(p.device, non_blocking=True).float()
        p.opt.zero_grad(set_to_none=True)
        with torch.autocast(p.device.type, dtype=p.amp, enabled=p.amp is not None):
            out = net(x)
        out = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
        loss = p.loss(out, y)
        p.scaler.scale(loss).backward()
        if grad_clip > 0:
            p.scaler.unscale_(p.opt)
            torch.nn.utils.clip_grad_norm_(p.model.parameters(), grad_clip)
        p.scaler.step(p.opt)
        p.scaler.update()
        p.sched.step()
        # the mean over the ranks (one scalar all-reduce): every rank sees the same value, so
        # TerminateOnNan stops all of them at the same step (one rank stopping alone would leave
        # the others waiting in the next gradient all-reduce); metrics.csv gets the global loss
        return distributed.average(loss.detach())

    return step


def _restore(run: Path, p: Parts, trainer, cfg: Config) -> Tuple[int, float]:
    """Load last.pt (read by rank 0, given to all) into ``p`` and ``trainer``; return (epochs
    done, best validation Dice). The schedule keeps its position but follows the poly curve of
    the (possibly extended) ``train.epochs``."""
    t = cfg.train
    total_iters = t.epochs * t.steps_per_epoch
    ckpt = distributed.on_main(load_checkpoint, run / "last.pt")
    try:
        p.model.load_state_dict(ckpt["model"])
        p.opt.load_state_dict(ckpt["optimizer"])
        p.sched.load_state_dict(ckpt["scheduler"])
        p.scaler.load_state_dict(ckpt["scaler"])
        trainer.load_state_dict(ckpt["engine"])
        epoch, best = int(ckpt["epoch"]), float(ckpt["best"])
        _restore_rng(ckpt["rng"], p.generator, t.seed, epoch)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise RunFolderError(f"{run / 'last.pt'}: does not match this run ({type(exc).__name__}: {str(exc)[:160]}); "
                             "start a new run or restore the file.") from None
    it = p.sched.last_epoch
    for group, base in zip(p.opt.param_groups, p.sched.base_lrs):
        group["lr"] = base * max(0.0, 1.0 - it / total_iters) ** t.poly_power
    if distributed.is_main():
        truncate_csv(run / "metrics.csv", epoch)
    log.info("resumed from %s at epoch %d (lr %.3g)", run / "last.pt", epoch, p.opt.param_groups[0]["lr"])
    return epoch, best


def _restore_rng(stored, generator, seed: int, epoch: int) -> None:
    """Each rank continues its own stored RNG streams (torch, numpy, python, sampler) when as
    many processes resume as wrote the checkpoint, so the resumed run equals an uninterrupted
    one. With another number (say a 2-process run resumed by 1) there is no stream to continue
    for some ranks, so every rank re-seeds all four from ``train.seed + rank + world_size x
    epoch``: reproducible, but not the patches an uninterrupted run would have drawn."""
    from monai.utils import set_determinism

    states = stored if isinstance(stored, list) else [stored]  # one state: written by one process
    rank, world = distributed.rank(), distributed.world_size()
    if len(states) == world:
        set_rng_state(states[rank], generator)
        return
    new_seed = seed + rank + world * epoch
    set_determinism(seed=new_seed)
    generator.manual_seed(new_seed)
    log.info("last.pt was written by %d process(es), resumed by %d: random streams re-seeded from train.seed + rank + %d x epoch",
             len(states), world, world)


def _attach(trainer, p: Parts, predictor, val_ds, plan: PreprocessingPlan, cfg: Config, transform, row: dict, progress: bool) -> None:
    """Timing, augmentation seeding, RNG states, validation, the NaN stop and (on a terminal) a
    progress bar. On every rank: the collectives inside must run on all of them."""
    from ignite.engine import Events

    seed = cfg.train.seed + distributed.rank()

    @trainer.on(Events.EPOCH_STARTED)
    def _seed_epoch(engine):
        # per-epoch (and per-rank) transform seed: reproducible, and a resumed run continues the same stream
        transform.set_random_state(seed=(seed * 100_003 + engine.state.epoch) % 2**32)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _gather_rng(engine):
        # every rank's streams, for last.pt (EpochRecord, rank 0): a resume continues each of them
        engine.state.rng_states = distributed.all_gather(rng_state(p.generator))

    attach_timing(trainer, row)
    attach_nan_stop(trainer)
    attach_validation(trainer, p.model, predictor, val_ds, plan, cfg.train.val_every, row)
    if progress:  # the CLI turns it off when stderr is not a terminal (no carriage-return frames in logs)
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda loss: {"loss": loss})
