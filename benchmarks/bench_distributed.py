"""Scaling of training throughput with the number of processes (torchrun + DDP).

Each run is the real command line, ``python -m torch.distributed.run --nproc_per_node N -m volseg
train ...`` on synthetic CT phantoms (``make_dataset``), with the same **per-rank**
``train.batch_size``, so N processes train on N x the patches per optimiser step. Throughput is
read from the run's own ``metrics.csv``: patches per second = N x batch_size x steps_per_epoch /
``train_s`` (the epoch's training steps, data waits included; no validation, no set-up, no cache
fill), median over epochs 2..E (epoch 1 is warm-up), then median over ``--repeats`` runs. Runs
of the different process counts alternate (1, 2, 1, 2, ...) so that drift on a busy machine hits
all of them alike, and the 1-process baseline is always measured in the same invocation.

    scaling efficiency(N) = throughput(N) / (N x throughput(1))

1.0 is perfect scaling. **CPU**: on a machine with C cores the N processes share them: each gets
``OMP_NUM_THREADS = C // N`` (``--threads`` sets C; the default is ``os.cpu_count()``), so
1 process x C threads is compared with N processes x C/N threads, i.e. DDP against torch's own
intra-op threading on the same cores. On the 2-core development machine 2 processes therefore
cannot be faster than 1 unless torch's threading scales worse than the gradient all-reduce
costs; the figure says how much the DDP machinery (gloo all-reduce, one loss all-reduce per
step, per-rank data pipelines) costs, not what more machines would give. **GPU**
(``--device cuda``): one process per GPU (``--procs 1 2 4 8`` up to the GPUs present); this was
not measured on the development machine, which has no GPU.

    python benchmarks/bench_distributed.py                       # CPU, configs/demo.yaml, 1 and 2 processes, 3 repeats
    python benchmarks/bench_distributed.py --quick               # smoke test: tiny network and phantoms, 1 repeat
    python benchmarks/bench_distributed.py --device cuda --procs 1 2 4 8 --steps 50 --set data.num_workers=4
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["model.features=[4,8]", "model.norm=instance", "data.patch_size=[24,24,16]", "data.samples_per_volume=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(procs: int, manifest: Path, out: Path, args) -> Dict[str, float]:
    """One ``torchrun`` training run; its throughput from metrics.csv."""
    sets = list(args.set) + [f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps}", "data.val_fraction=0",
                             f"train.val_every={args.epochs}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "volseg", "-q", "train", str(manifest), "--config", str(args.config),
           "--output", str(out), "--device", args.device] + sum((["--set", s] for s in sets), [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, args.threads // procs))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nexited {done.returncode}:\n{done.stderr[-4000:]}")
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(out / "config.yaml", encoding="utf-8") as f:
        import yaml

        batch = int(yaml.safe_load(f)["train"]["batch_size"])
    steady = [float(r["train_s"]) for r in rows[1:]] or [float(rows[0]["train_s"])]
    train_s = statistics.median(steady)
    return {"patches_per_s": procs * batch * args.steps / train_s, "s_per_step": train_s / args.steps, "wall_s": wall,
            "batch": batch}


def measure(args) -> Dict[int, List[Dict[str, float]]]:
    from volseg.data.synth import make_dataset

    results: Dict[int, List[Dict[str, float]]] = {n: [] for n in args.procs}
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        manifest = make_dataset(Path(tmp) / "data", cases=args.cases, test_cases=0, shape=tuple(args.shape), seed=0)
        for r in range(args.repeats):
            for n in args.procs:
                res = run_once(n, manifest, Path(tmp) / f"run_{n}_{r}", args)
                results[n].append(res)
                print(f"  repeat {r + 1}/{args.repeats}, {n} process(es): {res['patches_per_s']:.2f} patches/s "
                      f"({res['s_per_step']:.2f} s/step, run {res['wall_s']:.0f} s)", flush=True)
    return results


def report(results: Dict[int, List[Dict[str, float]]], args) -> List[Dict[str, float]]:
    base = statistics.median(r["patches_per_s"] for r in results[args.procs[0]])
    n0 = args.procs[0]
    table = []
    print(f"\n{'procs':>5} {'threads/proc':>12} {'batch/proc':>10} {'patches/s':>10} {'s/step':>7} {'efficiency':>10}  all runs (patches/s)")
    for n, runs in results.items():
        thr = statistics.median(r["patches_per_s"] for r in runs)
        eff = thr / (n / n0 * base)
        threads = str(max(1, args.threads // n)) if args.device == "cpu" else "-"
        print(f"{n:>5} {threads:>12} {runs[0]['batch']:>10} {thr:>10.2f} {statistics.median(r['s_per_step'] for r in runs):>7.2f} "
              f"{eff:>10.2f}  " + ", ".join(f"{r['patches_per_s']:.2f}" for r in runs))
        table.append({"procs": n, "patches_per_s": thr, "efficiency": eff, "runs": [r["patches_per_s"] for r in runs]})
    print(f"\nscaling efficiency = throughput(N) / (N/{n0} x throughput({n0})); device {args.device}"
          + (f", {args.threads} cores shared by the processes" if args.device == "cpu" else ""))
    return table


def parse(argv: Sequence[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts; the first is the baseline (default: 1 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs per process count, alternated (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per epoch (default: %(default)s)")
    p.add_argument("--cases", type=int, default=8, help="synthetic training cases (default: %(default)s)")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48], metavar=("X", "Y", "Z"))
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override, repeatable")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU cores shared by the processes (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny network and phantoms, 2 epochs x 3 steps, 1 repeat")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.set = QUICK + args.set
        args.repeats, args.epochs, args.steps, args.cases, args.shape = 1, 2, 3, 4, [32, 32, 24]
    return args


def main(argv: Sequence[str] = None) -> int:
    args = parse(argv)
    print(f"training throughput, {args.procs} processes x batch per process from {Path(args.config).name} {args.set}, "
          f"{args.repeats} repeats, {args.epochs} epochs x {args.steps} steps", flush=True)
    table = report(measure(args), args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": table}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
