"""Training speed of the pipeline: volseg's engine against the MONAI tutorial loop, same network.

Both sides train **volseg's own network** (``volseg.nets.build_network`` with the same config),
with the same loss (DiceCE, as volseg builds it), optimiser (AdamW + poly schedule + gradient
clipping), patch size, patches per step and augmentation, on the same data, each in its own
subprocess, so the ratio measures the data pipeline and the training loop, not architectures:

* ``volseg``: ``volseg.training.train`` (the real ignite engine, through its Python API) with
  ``--config`` (default ``configs/demo.yaml``), ``data.val_fraction=0``, ``train.epochs=--epochs``
  and ``train.steps_per_epoch=--steps``; ``data.num_workers`` and ``data.cache`` as the config
  says. Per-step times come from ignite's own events (GET_BATCH_STARTED/COMPLETED,
  ITERATION_COMPLETED), attached from outside: the benchmark does not change volseg.
* ``loop``: the MONAI tutorial recipe: ``CacheDataset`` over ``LoadImaged`` ->
  ``EnsureChannelFirstd`` -> ``Orientationd`` -> ``Spacingd`` -> ``ScaleIntensityRanged`` (the
  plan's spacing and the plan's exact intensity mapping: clip to the foreground 0.5-99.5
  percentiles, then the plan's z-score), the same class-index precomputation and the same random
  chain (``RandCropByLabelClassesd`` + augmentation: volseg's ``cached_transforms`` and
  ``random_transforms`` with the same config), a MONAI ``DataLoader`` with the same batch,
  sampler and ``num_workers``, and a plain PyTorch loop. The plan (spacing, intensity window) is
  computed in the parent, as a tutorial hard-codes it, so it is not in the loop's set-up time.

Data (``--data``): ``demo``: the phantoms ``volseg demo`` trains on (``make_dataset``, 10 cases
of about 64 x 64 x 48); ``ct``: one real-sized CT case, 512 x 512 x 200 voxels at 0.8 x 0.8 x 2 mm
(a ``make_dataset`` phantom drawn at 256 x 256 x 100 / 1.6 x 1.6 x 4 mm and resampled onto the
fine grid, since drawing it at full size takes minutes).

Reported per side (median over ``--repeats`` runs, alternated): s/step (median over the steps of
epochs 2..N; epoch 1 is warm-up), the fraction of step time spent waiting for the next batch
(same steps), the first epoch's time per step against the later epochs', set-up time (everything
from the call to the first batch request: planning, cache fill, model, loader), peak RSS of the
training process and of its largest DataLoader worker (each side's own subprocess tree, read with
``os.wait4``, the per-child form of ``getrusage(RUSAGE_CHILDREN)``, so alternated runs do not
mix). Timings are printed, never asserted.

    python benchmarks/bench_training.py                          # demo data + one real-sized CT
    python benchmarks/bench_training.py --data demo --repeats 5 --set data.num_workers=2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SIDES = ("loop", "volseg")
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
RSS_UNIT = 1024**2 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------- timing (in the workers)


class StepClock:
    """Per-step wall times of a training loop: ``wait`` (requesting the next batch until it is
    there) and ``step`` (the same start until the optimiser step is done), with the epoch."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first_batch: Optional[float] = None
        self.steps: List[dict] = []
        self._start = self._ready = 0.0

    def batch_started(self) -> None:
        self._start = time.perf_counter()
        if self.first_batch is None:
            self.first_batch = self._start

    def batch_ready(self) -> None:
        self._ready = time.perf_counter()

    def step_done(self, epoch: int) -> None:
        end = time.perf_counter()
        self.steps.append({"epoch": epoch, "wait_s": self._ready - self._start, "step_s": end - self._start})

    def result(self) -> dict:
        return {"setup_s": (self.first_batch or time.perf_counter()) - self.t0, "steps": self.steps}


def _clock_the_trainer(clock: StepClock) -> None:
    """Attach ``clock`` to the first ignite Engine that runs (the trainer inside
    ``volseg.training.train``) through ignite's own events, so the real engine is measured
    as it is, from outside."""
    from ignite.engine import Engine, Events

    original = Engine.run

    def run(self, *args, **kwargs):
        if not getattr(clock, "attached", False):
            clock.attached = True
            self.add_event_handler(Events.GET_BATCH_STARTED, lambda e: clock.batch_started())
            self.add_event_handler(Events.GET_BATCH_COMPLETED, lambda e: clock.batch_ready())
            self.add_event_handler(Events.ITERATION_COMPLETED, lambda e: clock.step_done(e.state.epoch))
        return original(self, *args, **kwargs)

    Engine.run = run


# --------------------------------------------------------------------------- the two sides


def _run_volseg(job: dict) -> dict:
    import csv
    import logging

    from volseg.config import from_dict
    from volseg.training import train

    logging.getLogger("volseg").setLevel(logging.WARNING)
    clock = StepClock()
    _clock_the_trainer(clock)
    run = Path(job["out_dir"]) / "run"
    train(job["manifest"], from_dict(job["config"]), run, device=job["device"])
    out = clock.result()
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        out["metrics_csv"] = list(csv.DictReader(f))  # volseg's own per-epoch figures, for comparison
    out["plan_matches"] = json.loads((run / "plan.json").read_text(encoding="utf-8")) == json.loads(job["plan"])
    return out


def _tutorial_dataset(job: dict, plan, cfg, num_samples: int):
    """``CacheDataset`` of the MONAI tutorials; the class-index and random tail is volseg's, so
    both sides crop and augment identically."""
    from monai.data import CacheDataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, ScaleIntensityRanged, Spacingd

    from volseg.data.transforms import cached_transforms, random_transforms

    keys = ["image", "label"]
    norm = plan.norms[0]
    deterministic = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes=plan.orientation),
        Spacingd(keys=keys, pixdim=plan.spacing, mode=("bilinear", "nearest")),
        # volseg's plan normalisation (scheme "ct"): clip to [lo, hi], then (x - mean) / std
        ScaleIntensityRanged(keys="image", a_min=norm.lo, a_max=norm.hi, b_min=(norm.lo - norm.mean) / norm.std,
                             b_max=(norm.hi - norm.mean) / norm.std, clip=True),
    ]  # fmt: skip
    # flat, so that CacheDataset caches up to the first random transform
    transform = Compose(deterministic + list(cached_transforms(plan).transforms) + list(random_transforms(plan, cfg, num_samples).transforms))
    return CacheDataset(job["files"], transform, cache_rate=1.0, progress=False), transform


def _loss(plan, cfg):
    """The loss exactly as volseg's engine builds it."""
    import torch
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    t = cfg.train
    weight = torch.tensor(t.class_weights, dtype=torch.float32) if t.class_weights else None
    loss = DiceCELoss(include_background=plan.binary, to_onehot_y=not plan.binary, softmax=not plan.binary, sigmoid=plan.binary,
                      weight=weight, lambda_dice=t.lambda_dice, lambda_ce=t.lambda_ce, batch=True)  # fmt: skip
    return DeepSupervisionLoss(loss, weight_mode="exp") if cfg.model.deep_supervision else loss


def _run_loop(job: dict) -> dict:
    import torch
    from monai.data import DataLoader
    from monai.utils import set_determinism

    from volseg.config import from_dict
    from volseg.data.plan import PreprocessingPlan
    from volseg.nets import build_network
    from volseg.runtime import amp_dtype

    clock = StepClock()
    cfg, plan = from_dict(job["config"]), PreprocessingPlan.from_json(job["plan"])
    t, dev = cfg.train, torch.device(job["device"])
    set_determinism(seed=t.seed)
    num_samples = max(1, min(cfg.data.samples_per_volume, t.batch_size))  # as volseg: batch_size patches per step
    batch = max(1, t.batch_size // num_samples)
    ds, transform = _tutorial_dataset(job, plan, cfg, num_samples)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=t.steps_per_epoch * batch)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=cfg.data.num_workers, drop_last=True)
    model = build_network(cfg.model, len(plan.channels), plan.out_channels).to(dev).train()
    loss_fn = _loss(plan, cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=t.epochs * t.steps_per_epoch, power=t.poly_power)
    amp = amp_dtype(dev) if t.amp else None  # volseg's precision (bf16 on a CPU with native bf16), so the arithmetic is equal
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    it = iter(loader)  # epoch 1's iterator is made before the first batch request, as in ignite
    for epoch in range(1, t.epochs + 1):
        for _ in range(t.steps_per_epoch):
            clock.batch_started()
            try:
                data = next(it)
            except StopIteration:  # a new epoch: new iterator (and worker processes), as in ignite
                it = iter(loader)
                data = next(it)
            clock.batch_ready()
            x, y = data["image"].to(dev), data["label"].to(dev).float()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                out = model(x)
            loss = loss_fn([o.float() for o in out] if isinstance(out, (list, tuple)) else out.float(), y)
            scaler.scale(loss).backward()
            if t.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss.item()  # synchronises on CUDA
            clock.step_done(epoch)
    return clock.result()


def _worker(side: str, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    import ignite.engine  # noqa: F401  (imported before either clock starts: not set-up time)
    import monai.data  # noqa: F401
    import monai.losses  # noqa: F401
    import monai.transforms  # noqa: F401

    result = (_run_loop if side == "loop" else _run_volseg)(job)
    import gc

    gc.collect()  # DataLoader workers end with their iterator; reap them before reading RUSAGE_CHILDREN
    result["main_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / RSS_UNIT
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["worker_rss_mib"] = children / RSS_UNIT if children else None
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- data (in the parent)


def make_demo_data(folder: Path) -> Path:
    """The phantoms `volseg demo` trains on: 10 training cases of about 64 x 64 x 48."""
    from volseg.data.synth import make_dataset

    return make_dataset(folder, cases=10, test_cases=0, seed=0, shape=(64, 64, 48))


def make_ct_case(folder: Path, size=(512, 512, 200), spacing=(0.8, 0.8, 2.0)) -> Path:
    """One real-sized CT case: a phantom drawn on a grid half as fine (drawing 52 M voxels
    directly takes minutes), resampled onto ``size`` at ``spacing`` (image linear, label
    nearest; air outside)."""
    import SimpleITK as sitk

    from volseg.data.manifest import load_manifest
    from volseg.data.synth import make_dataset

    coarse = tuple(n // 2 for n in size)
    manifest = make_dataset(folder, cases=1, test_cases=0, seed=0, shape=coarse, spacing=tuple(2 * s for s in spacing))
    case = load_manifest(manifest).training[0]
    for path, interp, fill in ((case.images[0], sitk.sitkLinear, -1024), (case.label, sitk.sitkNearestNeighbor, 0)):
        img = sitk.ReadImage(str(path))
        out = sitk.Resample(img, list(size), sitk.Transform(), interp, img.GetOrigin(), list(spacing), img.GetDirection(), fill, img.GetPixelID())
        sitk.WriteImage(out, str(path), useCompression=True)
    return manifest


# --------------------------------------------------------------------------- parent


def _spawn(side: str, job: dict, tmp: Path, timeout: Optional[float]) -> dict:
    """Run one side in a fresh process; its peak RSS (and its reaped children's) via wait4."""
    job_path = tmp / f"{side}.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    with open(tmp / "stdout", "w+") as out, open(tmp / "stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--_worker", side, str(job_path)], stdout=out, stderr=err)
        try:
            _, status, usage = os.wait4(proc.pid, 0) if timeout is None else _wait4_timeout(proc, timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"stopped after --timeout {timeout:g} s"}
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            return {"error": f"exit status {proc.returncode}\n" + "\n".join(err.read().strip().splitlines()[-15:])}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["tree_rss_mib"] = usage.ru_maxrss / RSS_UNIT  # the largest process of the side's tree
    return result


def _wait4_timeout(proc: subprocess.Popen, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        time.sleep(0.2)
    proc.kill()
    os.wait4(proc.pid, 0)
    raise subprocess.TimeoutExpired(proc.args, timeout)


def summarize(result: dict) -> dict:
    """Figures of one run: s/step and data-wait share over epochs 2..N; epoch 1 against them."""
    steps = result["steps"]
    later = [s for s in steps if s["epoch"] > 1] or steps
    first = [s for s in steps if s["epoch"] == 1]
    per_epoch: Dict[int, float] = {}
    for s in steps:
        per_epoch[s["epoch"]] = per_epoch.get(s["epoch"], 0.0) + s["step_s"]
    later_epochs = [v for e, v in per_epoch.items() if e > 1]
    return {
        "s_per_step": statistics.median(s["step_s"] for s in later),
        "mean_s_per_step": statistics.fmean(s["step_s"] for s in later),
        "wait_fraction": sum(s["wait_s"] for s in later) / sum(s["step_s"] for s in later),
        "first_epoch_ratio": per_epoch.get(1, float("nan")) / statistics.median(later_epochs) if later_epochs else float("nan"),
        "setup_s": result["setup_s"],
        "main_rss_mib": result["main_rss_mib"],
        "worker_rss_mib": result.get("worker_rss_mib"),
        "first_epoch_s_per_step": statistics.fmean(s["step_s"] for s in first) if first else float("nan"),
        "csv_wait_fraction": _csv_wait_fraction(result.get("metrics_csv")),
    }


def _csv_wait_fraction(rows: Optional[List[dict]]) -> Optional[float]:
    """Data wait / training time over epochs 2..N as volseg's own metrics.csv records them
    (``data_wait_s``, ``train_s``), a cross-check of the clock above; None if not recorded."""
    rows = [r for r in rows or [] if int(r["epoch"]) > 1 and r.get("data_wait_s") and r.get("train_s")]
    return sum(float(r["data_wait_s"]) for r in rows) / sum(float(r["train_s"]) for r in rows) if rows else None


ROWS = (
    ("s/step (median, epochs 2..N)", "s_per_step", "{:.3f}"),
    ("  mean s/step", "mean_s_per_step", "{:.3f}"),
    ("data wait / step time", "wait_fraction", "{:.1%}"),
    ("  as volseg's metrics.csv says", "csv_wait_fraction", "{:.1%}"),
    ("epoch 1 / later epoch", "first_epoch_ratio", "{:.2f}"),
    ("set-up before step 1 (s)", "setup_s", "{:.1f}"),
    ("peak RSS, training (MiB)", "main_rss_mib", "{:.0f}"),
    ("peak RSS, a worker (MiB)", "worker_rss_mib", "{:.0f}"),
)


def _table(name: str, runs: Dict[str, List[dict]]) -> str:
    med = {side: {k: _median([r[k] for r in rs]) for k in rs[0]} if rs else {} for side, rs in runs.items()}
    lines = [f"{name}", f"{'':30}{'loop (MONAI)':>14}{'volseg':>12}{'loop/volseg':>13}"]
    for label, key, fmt in ROWS:
        a, b = med["loop"].get(key), med["volseg"].get(key)
        cells = [fmt.format(v) if v is not None else "-" for v in (a, b)]
        ratio = f"{a / b:.2f}x" if a is not None and b else "-"
        lines.append(f"{label:30}{cells[0]:>14}{cells[1]:>12}{ratio:>13}")
    for side in SIDES:
        lines.append(f"  {side} s/step per run: " + ", ".join(f"{r['s_per_step']:.3f}" for r in runs[side]))
    return "\n".join(lines)


def _median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _jobs(data: str, tmp: Path, args) -> dict:
    """Data, resolved config and plan for one dataset; the plan as volseg's train() computes it."""
    from volseg.config import load_config, to_dict
    from volseg.data.manifest import load_manifest
    from volseg.planning import plan_cases

    t0 = time.perf_counter()
    manifest = make_demo_data(tmp / "demo") if data == "demo" else make_ct_case(tmp / "ct")
    made = time.perf_counter() - t0
    steps = args.steps if args.steps else (8 if data == "demo" else 5)
    sets = ["data.val_fraction=0", "data.min_cases=1", f"train.epochs={args.epochs}", f"train.steps_per_epoch={steps}"]
    cfg = load_config(args.config, sets + list(args.set or []))
    man = load_manifest(manifest)
    t0 = time.perf_counter()
    plan = plan_cases(man, man.training, cfg, seed=cfg.train.seed)
    planning = time.perf_counter() - t0
    files = [{"image": str(c.images[0]), "label": str(c.label)} for c in man.training]
    print(f"{data}: {len(files)} case(s) made in {made:.0f} s; plan {planning:.1f} s: spacing {[round(s, 3) for s in plan.spacing]} mm, "
          f"patch {list(plan.patch_size)}, {plan.num_classes} classes; batch {cfg.train.batch_size}, {args.epochs} x {steps} steps, "
          f"data.num_workers={cfg.data.num_workers}, data.cache={cfg.data.cache}", flush=True)  # fmt: skip
    return {"manifest": str(manifest), "files": files, "config": to_dict(cfg), "plan": plan.to_json(), "device": args.device,
            "threads": args.threads, "planning_s": planning}  # fmt: skip


def _measure(data: str, args, tmp: Path) -> dict:
    job = _jobs(data, tmp, args)
    runs: Dict[str, List[dict]] = {side: [] for side in SIDES}
    raw: Dict[str, List[dict]] = {side: [] for side in SIDES}
    for rep in range(args.repeats):
        for side in SIDES if rep % 2 == 0 else SIDES[::-1]:  # alternate which side goes first
            out_dir = tmp / f"{data}_{side}_{rep}"
            out_dir.mkdir()
            r = _spawn(side, {**job, "out_dir": str(out_dir)}, tmp, args.timeout)
            raw[side].append(r)
            if "error" in r:
                print(f"  {side} #{rep + 1}: {r['error']}", file=sys.stderr, flush=True)
                continue
            s = summarize(r)
            runs[side].append(s)
            print(f"  {side} #{rep + 1}: {s['s_per_step']:.3f} s/step, wait {s['wait_fraction']:.1%}, set-up {s['setup_s']:.1f} s, "
                  f"RSS {s['main_rss_mib']:.0f} MiB" + ("" if r.get("plan_matches", True) else " (plan differs from the loop's!)"), flush=True)  # fmt: skip
    if all(runs.values()):
        print(_table(f"\n{data}: medians of {args.repeats} alternated runs ({args.device}, threads {raw['volseg'][0].get('threads')})", runs), flush=True)
        print(f"  volseg set-up includes planning (fingerprinting), {job['planning_s']:.1f} s when measured alone in the parent\n")
    return {"job": {k: v for k, v in job.items() if k not in ("files", "plan")}, "summary": runs, "raw": raw}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", choices=("demo", "ct"), default=["demo", "ct"], help="datasets (default: both)")
    p.add_argument("--config", type=Path, default=CONFIG, help="volseg config for both sides (default: configs/demo.yaml)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="config override for both sides, repeatable")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; epoch 1 is warm-up (default 3)")
    p.add_argument("--steps", type=int, default=0, help="steps per epoch (default: 8 on demo, 5 on ct)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternated (default 3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        _worker(*args._worker)
        return 0
    if args.epochs < 2 or args.repeats < 1 or args.steps < 0:
        p.error(f"--epochs {args.epochs} must be >= 2 (epoch 1 is warm-up), --repeats {args.repeats} >= 1, --steps {args.steps} >= 0.")
    results = {}
    with tempfile.TemporaryDirectory(prefix="volseg_bench_train_") as d:
        for data in args.data:
            results[data] = _measure(data, args, Path(d))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items() if k != "_worker"}, "results": results}, indent=2), encoding="utf-8")
    return 0 if all(r["summary"]["loop"] and r["summary"]["volseg"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
