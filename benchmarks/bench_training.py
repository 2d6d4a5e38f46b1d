"""Training throughput: volseg's training engine against the MONAI tutorial recipe.

Both train on the same synthetic CT dataset (``volseg.data.synth.make_dataset``: 6 cases of
about 64 x 64 x 48 voxels, 4 classes) with the same patch size (volseg's plan, fitted to the
data) and the same number of patches per step, each in its own subprocess:

* volseg: ``volseg.training.engine.train`` with ``configs/demo.yaml`` (16-32-64-128 U-Net,
  instance norm, DiceCE, AdamW, poly LR, gradient clipping, class-balanced crops, affine /
  elastic / flip / intensity augmentation), no validation split. Two epochs of ``--steps``
  steps; the second epoch's time (``metrics.csv`` ``epoch_time_s``) is the measurement, the
  first is warm-up.
* baseline "MONAI tutorial": ``UNet(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
  num_res_units=2, norm=BATCH)``, ``CacheDataset`` over LoadImaged / EnsureChannelFirstd /
  Orientationd("RAS") / Spacingd / ScaleIntensityRanged / CropForegroundd /
  RandCropByPosNegLabeld(num_samples=4), DiceLoss(softmax), Adam(1e-4). ``2 x --steps``
  steps; the last ``--steps`` are timed. Spacing and intensity window are volseg's plan
  (spacing, foreground 0.5-99.5 percentile HU), so both see the same voxels. The patch is
  volseg's fitted patch rounded down to a multiple of 16 (the tutorial UNet halves 4 times),
  given to volseg as ``data.patch_size``.

Reported: seconds per step, patches per second, set-up time (fingerprint + cache), peak RSS
(``ru_maxrss`` of each subprocess) and the ratio baseline/volseg. Timings are printed, never
asserted. A step includes each side's own data pipeline: volseg's crops and augmentation run
with ``data.num_workers`` from demo.yaml (a worker process overlaps them with the network when
> 0); the baseline loads with ``num_workers=0`` (its cached crops cost ~0.01 s/step). "data
pipeline alone" times volseg's random transforms separately, after training.

    python benchmarks/bench_training.py              # a few CPU minutes
    python benchmarks/bench_training.py --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

PIPELINES = ("baseline", "volseg")
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**2 if sys.platform == "darwin" else 1024)


def volseg_overrides(steps: int, patches: int, patch_size: Optional[Sequence[int]] = None) -> List[str]:
    """demo.yaml with: two epochs of ``steps`` steps, ``patches`` crops of one case per step,
    no validation (its sliding-window passes are not training throughput)."""
    extra = [f"data.patch_size=[{','.join(str(int(n)) for n in patch_size)}]"] if patch_size else []
    return extra + [
        "train.epochs=2",
        f"train.steps_per_epoch={steps}",
        f"train.batch_size={patches}",
        f"data.samples_per_volume={patches}",
        "data.val_fraction=0",
    ]


# --------------------------------------------------------------------------- workers (subprocess)


def _worker_volseg(job: dict) -> dict:
    import logging

    from volseg.config import load_config
    from volseg.training.engine import train

    logging.getLogger("volseg").setLevel(logging.WARNING)
    cfg = load_config(CONFIG, volseg_overrides(job["steps"], job["patches"], job["patch_size"]))
    run = Path(job["out_dir"]) / "run"
    t0 = time.perf_counter()
    train(job["manifest"], cfg, run, device=job["device"])
    total = time.perf_counter() - t0
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epochs = [float(r["epoch_time_s"]) for r in rows]
    from monai.losses import DiceCELoss

    from volseg.nets import build_network

    model = build_network(cfg.model, 1, job["classes"]).to(job["device"]).train()
    gflop = _step_gflop(model, DiceCELoss(to_onehot_y=True, softmax=True, batch=True), [job["patches"], 1] + job["patch_size"])
    return {
        "gflop_per_step": gflop,
        "data_s": _volseg_data_step_s(run, job),
        "step_s": epochs[-1] / job["steps"],
        "warmup_step_s": epochs[0] / job["steps"],
        "setup_s": total - sum(epochs),
        "total_s": total,
        "loss": float(rows[-1]["train_loss"]),
    }


def _step_gflop(model, loss_fn, shape: Sequence[int]) -> float:
    """Forward + backward GFLOP of one training step on a batch ``(B, 1, *patch)`` (convolutions
    and matmuls, as torch's FlopCounterMode counts them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(tuple(shape), device=next(model.parameters()).device)
    y = torch.zeros((shape[0], 1) + tuple(shape[2:]), device=x.device)
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def _volseg_data_step_s(run: Path, job: dict) -> float:
    """Seconds per step of volseg's data pipeline alone: the random transforms (crops and
    augmentation) on a deep copy of a cached case, as CacheDataset does in ``train``. Measured
    after training, in this process, with the run folder's resolved config and plan."""
    import copy

    import yaml

    from volseg.config import from_dict
    from volseg.data.manifest import load_manifest
    from volseg.data.preprocess import Plan, preprocess_case
    from volseg.data.transforms import cached_transforms, random_transforms

    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")))
    plan = Plan.from_json((run / "plan.json").read_text(encoding="utf-8"))
    cases = load_manifest(job["manifest"]).training
    cache = [cached_transforms(plan)(preprocess_case(c, plan)) for c in cases]
    rand = random_transforms(plan, cfg, job["patches"])
    rand.set_random_state(seed=1)
    rand(copy.deepcopy(cache[0]))  # warm-up
    t0 = time.perf_counter()
    for i in range(job["steps"]):
        rand(copy.deepcopy(cache[i % len(cache)]))
    return (time.perf_counter() - t0) / job["steps"]


def _worker_baseline(job: dict) -> dict:
    import numpy as np
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceLoss
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )
    from monai.utils import set_determinism

    set_determinism(seed=0)
    dev = torch.device(job["device"])
    keys = ["image", "label"]
    patch = job["patch_size"]
    transforms = Compose(
        [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=job["spacing"], mode=("bilinear", "nearest")),
            ScaleIntensityRanged(keys="image", a_min=job["hu_window"][0], a_max=job["hu_window"][1], b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(keys=keys, source_key="image"),
            # not in the tutorial: the synthetic bodies can be smaller than the patch after the
            # foreground crop, which RandCropByPosNegLabeld would reject
            SpatialPadd(keys=keys, spatial_size=patch),
            RandCropByPosNegLabeld(
                keys=keys, label_key="label", spatial_size=patch, pos=1, neg=1,
                num_samples=job["patches"], image_key="image", image_threshold=0,
            ),
        ]
    )
    t0 = time.perf_counter()
    ds = CacheDataset(data=job["files"], transform=transforms, cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(ds, batch_size=1, shuffle=True, num_workers=0)
    model = UNet(
        spatial_dims=3, in_channels=1, out_channels=job["classes"], channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2), num_res_units=2, norm=Norm.BATCH,
    ).to(dev)
    loss_function = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    setup = time.perf_counter() - t0

    def batches():
        while True:
            yield from loader

    model.train()
    times, data_times, losses = [], [], []
    it = batches()
    for _ in range(2 * job["steps"]):
        t = time.perf_counter()
        batch = next(it)
        data_times.append(time.perf_counter() - t)
        x, y = batch["image"].to(dev), batch["label"].to(dev)
        optimizer.zero_grad()
        loss = loss_function(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # synchronises on CUDA
        times.append(time.perf_counter() - t)
    n = job["steps"]
    gflop = _step_gflop(model, loss_function, [job["patches"], 1] + patch)
    return {
        "gflop_per_step": gflop,
        "step_s": float(np.sum(times[n:]) / n),
        "data_s": float(np.sum(data_times[n:]) / n),
        "warmup_step_s": float(np.sum(times[:n]) / n),
        "setup_s": setup,
        "total_s": time.perf_counter() - t0,
        "loss": float(np.mean(losses[n:])),
        "patch_shape": list(x.shape),
    }


def _run_worker(name: str, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = (_worker_baseline if name == "baseline" else _worker_volseg)(job)
    result["peak_rss_mib"] = _peak_rss_mib()
    # DataLoader worker processes (data.num_workers > 0): the largest one, once reaped
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["worker_peak_rss_mib"] = children / (1024**2 if sys.platform == "darwin" else 1024) if children else None
    result["threads"] = torch.get_num_threads()
    if job["device"] == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent


def _spawn(name: str, job: dict, tmp: Path, timeout: Optional[float]) -> dict:
    job_path = tmp / f"{name}.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    try:
        proc = subprocess.run([sys.executable, __file__, "--_worker", name, str(job_path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after --timeout {timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"error": f"exit status {proc.returncode}\n{tail}"}
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps per pipeline, after as many warm-up steps (default 5)")
    p.add_argument("--patches", type=int, default=4, help="patches per step, cropped from one case (default 4, the tutorial's num_samples)")
    p.add_argument("--cases", type=int, default=6, help="synthetic training cases (default 6)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--only", choices=PIPELINES, help="run one pipeline only")
    p.add_argument("--timeout", type=float, default=None, help="seconds per pipeline before it is stopped")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        _run_worker(*args._worker)
        return 0
    for name in ("steps", "patches", "cases"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1.")
    if args.cases < 2:
        p.error(f"--cases {args.cases}: volseg needs at least 2 training cases.")

    from volseg.config import load_config
    from volseg.data.manifest import load_manifest
    from volseg.data.preprocess import make_plan
    from volseg.data.synth import make_dataset

    with tempfile.TemporaryDirectory(prefix="volseg_bench_train_") as d:
        tmp = Path(d)
        manifest = make_dataset(tmp / "data", cases=args.cases, test_cases=0, shape=(64, 64, 48))
        man = load_manifest(manifest)
        # the plan train() will compute (all cases train: val_fraction=0), for the baseline
        volseg_cfg = load_config(CONFIG, volseg_overrides(args.steps, args.patches))
        plan = make_plan(man, man.training, volseg_cfg)
        norm = plan.norms[0]
        # the tutorial UNet halves four times: every patch axis must be a multiple of 16, so
        # the fitted patch is rounded down for both sides (volseg gets it as data.patch_size)
        patch = [max(16, n // 16 * 16) for n in plan.patch_size]
        files = [{"image": str(c.images[0]), "label": str(c.label)} for c in man.training]
        print(f"{len(files)} synthetic CT cases, {plan.num_classes} classes, spacing {[round(s, 3) for s in plan.spacing]} mm, "
              f"patch {patch} (plan: {list(plan.patch_size)}), {args.patches} patches/step, {args.steps} timed steps, {args.device}, "
              f"volseg data.num_workers={volseg_cfg.data.num_workers}", flush=True)
        results = {}
        for name in PIPELINES:
            if args.only and name != args.only:
                continue
            out_dir = tmp / name
            out_dir.mkdir()
            job = {
                "manifest": str(manifest), "files": files, "steps": args.steps, "patches": args.patches,
                "patch_size": patch, "spacing": list(plan.spacing), "hu_window": [norm.lo, norm.hi],
                "classes": plan.num_classes, "device": args.device, "threads": args.threads, "out_dir": str(out_dir),
            }
            t0 = time.perf_counter()
            r = _spawn(name, job, tmp, args.timeout)
            r["process_s"] = time.perf_counter() - t0
            results[name] = r
            print(f"  {name}: " + (r["error"].splitlines()[0] if "error" in r else f"{r['step_s']:.2f} s/step, peak RSS {r['peak_rss_mib']:.0f} MiB"), flush=True)
            if "error" in r:
                print("    " + "\n    ".join(r["error"].splitlines()[1:]), file=sys.stderr)

    ok = {n: r for n, r in results.items() if "error" not in r}
    for r in ok.values():
        r["patches_per_s"] = args.patches / r["step_s"]
        r["gflops"] = r["gflop_per_step"] / r["step_s"]
    rows = [("s/step", "step_s", "{:.2f}"), ("  data pipeline alone", "data_s", "{:.2f}"), ("patches/s", "patches_per_s", "{:.2f}"),
            ("GFLOP/step (fwd+bwd)", "gflop_per_step", "{:.0f}"), ("GFLOP/s (per step)", "gflops", "{:.1f}"), ("warm-up s/step", "warmup_step_s", "{:.2f}"),
            ("set-up (s)", "setup_s", "{:.1f}"), ("total in train (s)", "total_s", "{:.1f}"), ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
            ("  data worker (MiB)", "worker_peak_rss_mib", "{:.0f}")]
    if args.device == "cuda":
        rows.append(("CUDA peak alloc (MiB)", "cuda_peak_mib", "{:.0f}"))
    print()
    print(f"{'':22}{'baseline':>12}{'volseg':>12}{'baseline/volseg':>18}")
    for label, key, fmt in rows:
        vals = [ok[n].get(key) if n in ok else None for n in PIPELINES]
        cells = [fmt.format(v) if v is not None else "-" for v in vals]
        ratio = f"{vals[0] / vals[1]:.2f}x" if None not in vals and vals[1] else "-"
        if key == "worker_peak_rss_mib" and vals == [None, None]:
            continue
        print(f"{label:22}{cells[0]:>12}{cells[1]:>12}{ratio:>18}")
    print("(s/step ratio > 1: volseg takes less time per step; patches/s ratio < 1: volseg is faster)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("_worker", "json")}, "results": results}, indent=2, default=str), encoding="utf-8")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
