"""Training: manifest -> plan -> cached preprocessed cases -> ignite engine -> run folder.

The run folder describes itself, so ``volseg infer --model RUN`` needs nothing else::

    RUN/config.yaml     resolved config (CLI overrides applied, channels filled in)
    RUN/plan.json       preprocessing plan (spacing, orientation, normalisation, labels, patch)
    RUN/dataset.json    manifest name, labels, channels and the train/validation split
    RUN/versions.json   volseg, torch, monai, python versions
    RUN/last.pt         model, optimiser, scheduler, scaler, engine and RNG state (every epoch)
    RUN/best.pt         the best validation mean foreground Dice so far
    RUN/metrics.csv     one row per epoch; RUN/tb/ TensorBoard events; RUN/train.log
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import yaml

from .. import versions
from ..config import Config, ConfigError, from_dict, replace, to_dict
from ..data.io import save_torch, write_text
from ..data.manifest import Case, Manifest, load_manifest, split_cases, validate_cases
from ..data.preprocess import Plan, make_plan, preprocess_case

log = logging.getLogger(__name__)

__all__ = ["train", "dice_per_class"]


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> List[float]:
    """Dice of each foreground class index (1..K-1); both empty counts as 1."""
    import torch
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    p = one_hot(torch.as_tensor(pred[None, None]).long(), num_classes)
    t = one_hot(torch.as_tensor(truth[None, None]).long(), num_classes)
    return compute_dice(p, t, include_background=False, ignore_empty=False)[0].tolist()


class _Preprocess:
    """Deterministic MONAI-style transform: item of paths -> preprocessed arrays (cached)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, item: dict) -> dict:
        case = Case(item["name"], tuple(Path(p) for p in item["images"]), Path(item["label"]))
        return preprocess_case(case, self.plan)


def _items(cases: Sequence[Case]) -> List[dict]:
    return [{"name": c.name, "images": [str(p) for p in c.images], "label": str(c.label)} for c in cases]


def _dataset(items: List[dict], plan: Plan, cfg: Config, run: Path, num_samples: int):
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.transforms import Compose

    from ..data.transforms import cached_transforms, random_transforms

    transform = Compose([_Preprocess(plan), cached_transforms(plan), random_transforms(plan, cfg, num_samples)])
    if cfg.data.cache == "memory":
        return CacheDataset(items, transform, num_workers=None if cfg.data.num_workers else 0, progress=False), transform
    if cfg.data.cache == "disk":
        key = hashlib.sha1(plan.to_json().encode()).hexdigest()[:12]
        return PersistentDataset(items, transform, cache_dir=run / "cache" / key), transform
    return Dataset(items, transform), transform


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


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    manifest: Union[str, Path],
    cfg: Optional[Config],
    output: Union[str, Path],
    resume: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> Path:
    """Train a network on ``manifest`` into the run folder ``output``; return its path.

    ``resume=True`` continues from ``output/last.pt`` with optimiser, scheduler, scaler, epoch
    and RNG state. The stored config is used; a given ``cfg`` only contributes
    ``train.epochs`` (to extend the run). ``cfg=None`` on a new run means the defaults.
    """
    import torch
    from ignite.engine import Engine, Events
    from ignite.metrics import RunningAverage
    from monai.data import DataLoader
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    from ..inference.predictor import Predictor, resolve_device
    from ..nets import build_network

    run = Path(output)
    last = run / "last.pt"
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: {last} does not exist; start a new run without --resume.")
        stored = from_dict(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")))
        cfg = stored if cfg is None else replace(stored, train={"epochs": cfg.train.epochs})
    elif last.exists():
        raise FileExistsError(f"{run} already holds a run (last.pt); pass --resume to continue it or choose another --output.")
    cfg = cfg if cfg is not None else Config()
    run.mkdir(parents=True, exist_ok=True)
    _attach_log_file(run / "train.log")

    man = load_manifest(manifest)
    train_cases, val_cases = split_cases(man, cfg.data.val_fraction, cfg.train.seed, cfg.data.folds, cfg.data.fold)
    validate_cases(man, tuple(train_cases) + tuple(val_cases), min_cases=cfg.data.min_cases)
    log.info("%s: %d training, %d validation cases", man.name, len(train_cases), len(val_cases))
    if resume:
        plan = Plan.from_json((run / "plan.json").read_text(encoding="utf-8"))
    else:
        log.info("fingerprinting %d training cases", len(train_cases))
        plan = make_plan(man, train_cases, cfg, seed=cfg.train.seed)
        cfg = _resolve(cfg, man, plan)
        write_text(run / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_text(run / "plan.json", plan.to_json())
        write_text(run / "versions.json", json.dumps(versions(), indent=2))
        write_text(
            run / "dataset.json",
            json.dumps(
                {
                    "manifest": str(man.path.resolve()),
                    "name": man.name,
                    "modality": dict(enumerate(man.modalities)),
                    "labels": man.labels,
                    "training": [c.name for c in train_cases],
                    "validation": [c.name for c in val_cases],
                },
                indent=2,
            ),
        )
    log.info("plan: spacing %s mm, orientation %s, patch %s, %d classes", plan.spacing, plan.orientation, plan.patch_size, plan.num_classes)

    t = cfg.train
    dev = resolve_device(device)
    _seed_all(t.seed)
    num_samples = max(1, min(cfg.data.samples_per_volume, t.batch_size))
    loader_batch = max(1, t.batch_size // num_samples)
    ds, transform = _dataset(_items(train_cases), plan, cfg, run, num_samples)
    gen = torch.Generator().manual_seed(t.seed)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=t.steps_per_epoch * loader_batch, generator=gen)
    loader = DataLoader(ds, batch_size=loader_batch, sampler=sampler, num_workers=cfg.data.num_workers, drop_last=True)
    val_data = [preprocess_case(c, plan) for c in val_cases]

    model = build_network(cfg.model, len(plan.channels), plan.out_channels).to(dev)
    if t.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=t.epochs * t.steps_per_epoch, power=t.poly_power)
    amp = t.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    weight = torch.tensor(t.class_weights, dtype=torch.float32, device=dev) if t.class_weights else None
    if weight is not None and len(t.class_weights) != plan.out_channels:
        raise ConfigError(f"train.class_weights has {len(t.class_weights)} entries; the network has {plan.out_channels} output channel(s).")
    loss_fn = DiceCELoss(
        include_background=plan.binary,
        to_onehot_y=not plan.binary,
        softmax=not plan.binary,
        sigmoid=plan.binary,
        weight=weight,
        lambda_dice=t.lambda_dice,
        lambda_ce=t.lambda_ce,
        batch=True,
    )
    if cfg.model.deep_supervision:
        loss_fn = DeepSupervisionLoss(loss_fn, weight_mode="exp")

    def step(engine, batch):
        model.train()
        x = batch["image"].to(dev, non_blocking=True)
        y = batch["label"].to(dev, non_blocking=True).float()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, enabled=amp):
            out = model(x)
        out = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
        loss = loss_fn(out, y)
        scaler.scale(loss).backward()
        if t.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        return loss.item()

    trainer = Engine(step)
    RunningAverage(output_transform=lambda v: v).attach(trainer, "loss")
    state = {"best": -1.0, "epoch_losses": []}
    predictor = Predictor(model, plan, cfg.infer, dev)
    names = list(plan.label_names[1:])
    csv_path = run / "metrics.csv"
    header = ["epoch", "train_loss", "lr", "val_dice_mean"] + [f"val_dice_{n}" for n in names] + ["epoch_time_s"]

    if resume:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        trainer.load_state_dict(ckpt["engine"])
        state["best"] = ckpt["best"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        gen.set_state(ckpt["rng"]["sampler"])
        _truncate_csv(csv_path, ckpt["epoch"])
        log.info("resumed from %s at epoch %d", last, ckpt["epoch"])
        if ckpt["epoch"] >= t.epochs:
            # ignite restarts a finished engine from epoch 0; a finished run is left as it is
            log.info("run already complete (%d/%d epochs); raise train.epochs to continue it", ckpt["epoch"], t.epochs)
            return run
    if not csv_path.exists():
        write_text(csv_path, ",".join(header) + "\n")

    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(run / "tb"))

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch_start(engine):
        # per-epoch transform seed: reproducible, and a resumed run continues the same stream
        transform.set_random_state(seed=(t.seed * 100_003 + engine.state.epoch) % 2**32)
        state["t0"] = time.perf_counter()
        state["epoch_losses"] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        state["epoch_losses"].append(engine.state.output)
        if not math.isfinite(engine.state.output):
            raise FloatingPointError(f"training loss became {engine.state.output} at iteration {engine.state.iteration}; lower train.lr.")

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_end(engine):
        ep = engine.state.epoch
        row = {"epoch": ep, "train_loss": float(np.mean(state["epoch_losses"])), "lr": opt.param_groups[0]["lr"]}
        if val_data and (ep % t.val_every == 0 or ep == engine.state.max_epochs):
            scores = np.array([dice_per_class(predictor.predict_index(v["image"]), v["label"][0], plan.num_classes) for v in val_data])
            per_class = scores.mean(0)
            row["val_dice_mean"] = float(per_class.mean())
            row.update({f"val_dice_{n}": float(d) for n, d in zip(names, per_class)})
            model.train()
        row["epoch_time_s"] = time.perf_counter() - state["t0"]
        mean = row.get("val_dice_mean")
        if mean is not None and mean > state["best"]:
            state["best"] = mean
            save_torch({"model": model.state_dict(), "epoch": ep, "val_dice_mean": mean}, run / "best.pt")
        with open(csv_path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([_fmt(row.get(h)) for h in header])
        for k, v in row.items():
            if k != "epoch" and v is not None:
                tb.add_scalar(k, v, ep)
        tb.flush()
        save_torch(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "engine": engine.state_dict(),
                "epoch": ep,
                "best": state["best"],
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(), "sampler": gen.get_state()},
            },
            last,
        )
        msg = f"epoch {ep}/{engine.state.max_epochs} loss {row['train_loss']:.4f}"
        if mean is not None:
            msg += f" val dice {mean:.4f} (" + ", ".join(f"{n} {row[f'val_dice_{n}']:.3f}" for n in names) + ")"
        log.info(msg + f" [{row['epoch_time_s']:.1f}s]")

    if progress:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, metric_names=["loss"])
    if not val_data:
        log.warning("no validation cases: best.pt is not written; inference uses last.pt")
    try:
        trainer.run(loader, max_epochs=t.epochs, epoch_length=t.steps_per_epoch)
    finally:
        tb.close()
    return run


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _truncate_csv(path: Path, epoch: int) -> None:
    """Drop rows written after the checkpoint being resumed (a kill between the two writes)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = [lines[0]] + [ln for ln in lines[1:] if ln and int(ln.split(",")[0]) <= epoch]
    write_text(path, "\n".join(keep) + "\n")


def _attach_log_file(path: Path) -> None:
    root = logging.getLogger("volseg")
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
