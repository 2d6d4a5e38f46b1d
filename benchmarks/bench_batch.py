"""Batch inference over a folder of scans, with and without prefetching the next scan.

``volseg.inference.infer_many`` reads and preprocesses scan i+1 in a background thread while the
network runs on scan i (``prefetch=True``, the default); ``sequential`` is the same call with
``prefetch=False``. Both rows load the model once and segment the same N synthetic CT scans
(written as NIfTI by ``bench_inference.make_volume``, one seed each) with the same untrained
network (``bench_inference.make_untrained_run``); each run is a fresh subprocess, the rows
alternate ``--repeat`` times (the order flips every repeat) and the median wall time of the whole
batch, model loading included (imports not), is reported with every run's time, the ratio sequential /
prefetch, and each row's peak RSS (prefetch holds one more scan). "read s" is the batch's
reading + preprocessing time (what prefetching can hide at most), "waited s" the part of it the
network waited for (all of it when sequential); medians over the runs.

    python benchmarks/bench_batch.py --quick                      # smoke test, about a minute
    python benchmarks/bench_batch.py --threads 1                  # 6 scans 256x256x100
    python benchmarks/bench_batch.py --device cuda --scans 8 --shape 512 512 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import _peak_rss_mib, make_untrained_run, make_volume  # noqa: E402 - the sibling script's helpers

ROWS = {"prefetch": True, "sequential": False}


def _worker(row: str, job_path: str) -> None:
    """One batch in this process; prints one JSON line."""
    from volseg.inference import collect_inputs, infer_many  # imports are not the batch's time; the model load is

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    t0 = time.perf_counter()

    out = Path(job["out"]) / row
    jobs = collect_inputs([job["scans"]], out)
    failures = infer_many(jobs, job["run"], device=job["device"], overrides=job["overrides"], prefetch=ROWS[row])
    wall = time.perf_counter() - t0
    scans = json.loads((out / "infer_summary.json").read_text(encoding="utf-8"))["scans"]
    ok = [s["timing_s"] for s in scans if s["status"] == "ok"]
    print(json.dumps({"wall_s": wall, "read_s": sum(t["read_s"] for t in ok), "wait_s": sum(t["wait_s"] for t in ok), "failures": len(failures), "peak_rss_mib": _peak_rss_mib()}))


def _spawn(row: str, job_file: Path, timeout: Optional[float]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--_worker", row, str(job_file)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{row} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_rows(job_file: Path, repeat: int, timeout: Optional[float]) -> Dict[str, List[dict]]:
    """``repeat`` alternated runs of each row (prefetch, sequential, then sequential, prefetch...)."""
    runs: Dict[str, List[dict]] = {row: [] for row in ROWS}
    for r in range(repeat):
        for row in list(ROWS)[:: 1 if r % 2 == 0 else -1]:
            res = _spawn(row, job_file, timeout)
            if res["failures"]:
                raise RuntimeError(f"{row}: {res['failures']} scan(s) failed")
            runs[row].append(res)
            print(f"  repeat {r + 1}/{repeat} {row:10s} {res['wall_s']:7.2f} s", flush=True)
    return runs


def print_table(runs: Dict[str, List[dict]], scans: int) -> dict:
    med = {row: statistics.median(r["wall_s"] for r in rs) for row, rs in runs.items()}
    print(f"\n{'row':10s} {'median s':>9s} {'s/scan':>7s} {'read s':>7s} {'waited s':>8s} {'peak RSS MiB':>12s}  runs (s)")
    for row, rs in runs.items():
        read, wait = (statistics.median(r[k] for r in rs) for k in ("read_s", "wait_s"))
        rss = max(r["peak_rss_mib"] for r in rs)
        times = ", ".join(f"{r['wall_s']:.2f}" for r in rs)
        print(f"{row:10s} {med[row]:9.2f} {med[row] / scans:7.2f} {read:7.2f} {wait:8.2f} {rss:12.0f}  {times}")
    ratio = med["sequential"] / med["prefetch"]
    print(f"sequential / prefetch: {ratio:.2f}x (> 1: prefetching is faster)")
    return {"median_s": med, "ratio_sequential_over_prefetch": ratio}


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=6, help="scans in the batch (default 6)")
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 100), help="synthetic CT grid (default 256 256 100)")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), help="its spacing, mm (default 0.8 0.8 2.5)")
    p.add_argument("--target-spacing", type=float, nargs=3, default=(1.6, 1.6, 2.5), help="the plan's spacing, mm (default 1.6 1.6 2.5)")
    p.add_argument("--classes", type=int, default=14, help="classes incl. background (default 14)")
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128], help="U-Net features (default 16 32 64 128)")
    p.add_argument("--roi", type=int, nargs=3, default=(96, 96, 64), help="training patch (default 96 96 64)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="infer.threads: torch threads (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=3, help="alternated runs per row; the median is reported (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 scans of 96x96x40, features 4 8, roi 48 48 32, 2 repeats")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.scans, args.shape, args.features, args.roi, args.repeat = 3, (96, 96, 40), [4, 8], (48, 48, 32), 2
    if not args._worker and (args.scans < 2 or args.repeat < 1):
        p.error(f"--scans {args.scans} must be >= 2 (nothing to prefetch otherwise) and --repeat {args.repeat} >= 1.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    if args._worker:
        _worker(*args._worker)
        return 0
    with tempfile.TemporaryDirectory(prefix="volseg_bench_batch_") as d:
        tmp = Path(d)
        (tmp / "scans").mkdir()
        for i in range(args.scans):
            make_volume(tmp / "scans" / f"ct{i:03d}.nii.gz", args.shape, args.spacing, seed=i)
        run = make_untrained_run(tmp / "run", args.features, args.classes, args.roi, args.target_spacing, 4)
        job = {"scans": str(tmp / "scans"), "run": str(run), "out": str(tmp / "out"), "device": args.device,
               "overrides": {"threads": args.threads} if args.threads else {}}
        (tmp / "job.json").write_text(json.dumps(job), encoding="utf-8")
        print(f"{args.scans} synthetic CT scans {list(args.shape)} at {list(args.spacing)} mm; untrained U-Net {args.features}, "
              f"{args.classes} classes, roi {list(args.roi)}; {args.device}, threads {args.threads or 'default'}", flush=True)
        runs = run_rows(tmp / "job.json", args.repeat, args.timeout)
    result = print_table(runs, args.scans)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("_worker", "json")},
                                         "runs": runs, **result}, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
