"""Whole-scan inference: volseg's Predictor against the MONAI tutorial recipe.

Both pipelines segment the same synthetic CT (int16 HU, LPS affine, written to a temporary
NIfTI) with the same network weights, ROI, overlap (0.5), window batch (4) and Gaussian
blending, and write a label map on the scan's own grid:

* baseline "MONAI standard recipe": LoadImaged (nibabel) -> EnsureChannelFirstd ->
  Orientationd("RAS") -> Spacingd(bilinear) -> ScaleIntensityRanged(-1000..1000 -> 0..1,
  clip); SlidingWindowInferer on the whole volume -> softmax -> Invertd(nearest_interp=False)
  -> AsDiscreted(argmax) -> SaveImaged (nibabel).
* volseg: ``read_image`` -> ``Predictor.predict`` (float16 probabilities, Z slabs, per-class
  inverse resampling with a running argmax) -> ``write_label_like``. The plan's CT
  normalisation is set to the same -1000..1000 -> 0..1 map.

Each pipeline runs in its own subprocess, so peak RSS (``ru_maxrss``) and, on CUDA,
``torch.cuda.max_memory_allocated`` belong to that pipeline alone. The network defaults to a
tiny U-Net (features 4 8) so that on a CPU the figures measure the pipeline (resampling,
stitching, inversion, memory) rather than convolutions; ``--features 16 32 64 128`` gives a
realistic one. Timings are reported, never asserted.

    python benchmarks/bench_inference.py                       # default size, a few CPU minutes
    python benchmarks/bench_inference.py --shape 512 512 300 --classes 14
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

PIPELINES = ("baseline", "volseg")


# --------------------------------------------------------------------------- helpers (both sides)


def _rss_mib() -> float:
    """Current resident set size (MiB), from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mib() -> float:
    """Peak resident set size of this process (MiB); Linux reports KiB, macOS bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**2 if sys.platform == "darwin" else 1024)


class RssSampler:
    """Polls this process's RSS every ``interval`` s in a thread: per-stage peaks from the
    timeline. Sampled, so a short spike (or a call that holds the GIL) can be missed; the
    whole-run peak comes from ``ru_maxrss``, which misses nothing."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval = interval
        self.samples: List[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _rss_mib()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, t0: float, t1: float) -> float:
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        return max(vals) if vals else float("nan")


def _stage_peaks(sampler: RssSampler, t0: float, stages: Dict[str, float]) -> Dict[str, float]:
    out, t = {}, t0
    for name, dt in stages.items():
        out[name] = sampler.peak(t, t + dt)
        t += dt
    return out


def build_model(features: Sequence[int], in_channels: int, classes: int):
    """The benchmark network, untrained but with informative outputs.

    ``features=()``: a 1x1x1 convolution that is a nearest-centre classifier on the normalised
    intensity (class ``k`` wins around ``c_k``; centres spread over 0..0.9). Otherwise volseg's
    U-Net with batch norm (eval mode: an identity map at initialisation), random weights and
    zero biases, so the argmax follows local image patterns instead of the largest bias and the
    network is translation-equivariant: the two pipelines' label maps then differ only through
    preprocessing, stitching and inversion."""
    import torch

    if not features:
        net = torch.nn.Conv3d(in_channels, classes, kernel_size=1)
        centres = torch.linspace(0.0, 0.9, classes)
        with torch.no_grad():  # argmax_k (2 c_k x - c_k^2) = argmin_k |x - c_k|
            net.weight.copy_((40 * centres)[:, None, None, None, None].expand_as(net.weight) / in_channels)
            net.bias.copy_(-20 * centres**2)
        return net
    from volseg.config import ModelConfig
    from volseg.nets import build_network

    net = build_network(ModelConfig(features=tuple(features), norm="batch"), in_channels, classes)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    return net


# --------------------------------------------------------------------------- workers (subprocess)


def _worker_baseline(job: dict) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    device = torch.device(job["device"])
    model = build_model(job["features"], 1, job["classes"])
    model.load_state_dict(torch.load(job["weights"], map_location="cpu"))
    model = model.to(device).eval()
    pre = Compose(
        [
            LoadImaged(keys="image", reader="NibabelReader"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=job["target_spacing"], mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    post = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
            SaveImaged(
                keys="pred",
                output_dir=job["out_dir"],
                output_postfix="seg",
                output_dtype=np.uint8,
                resample=False,
                separate_folder=False,
                print_log=False,
                writer="NibabelWriter",
            ),
        ]
    )
    inferer = SlidingWindowInferer(roi_size=job["roi"], sw_batch_size=4, overlap=0.5, mode="gaussian")
    rss0 = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        data = pre({"image": job["image"]})
        t1 = time.perf_counter()
        with torch.no_grad():
            data["pred"] = inferer(data["image"][None].to(device), model)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        data = post(data)
        t3 = time.perf_counter()
    written = sorted(Path(job["out_dir"]).glob("*_seg.nii.gz"))
    stages = {"preprocess": t1 - t0, "network": t2 - t1, "restore+write": t3 - t2}
    return {
        "stages_s": stages,
        "stage_peak_rss_mib": _stage_peaks(sampler, t0, stages),
        "time_s": t3 - t0,
        "rss_before_mib": rss0,
        "output": str(written[0]) if written else None,
    }


def _worker_volseg(job: dict) -> dict:
    import torch

    from volseg.config import InferConfig
    from volseg.data.io import read_image, write_label_like
    from volseg.data.preprocess import ChannelNorm, Plan
    from volseg.inference.predictor import Predictor

    device = torch.device(job["device"])
    model = build_model(job["features"], 1, job["classes"])
    model.load_state_dict(torch.load(job["weights"], map_location="cpu"))
    k = job["classes"]
    plan = Plan(
        spacing=tuple(job["target_spacing"]),
        orientation="RAS",
        channels=("CT",),
        # (x - mean) / std with mean=-1000, std=2000 maps -1000..1000 to 0..1, as the baseline
        norms=(ChannelNorm("ct", -1000.0, 1000.0, -1000.0, 2000.0),),
        label_values=tuple(range(k)),
        label_names=("background",) + tuple(f"class{i}" for i in range(1, k)),
        spatial_dims=3,
        patch_size=tuple(job["roi"]),
        slice_axis=2,
    )
    pred = Predictor(model, plan, InferConfig(overlap=0.5, batch_size=4, blend="gaussian"), device)
    out_path = Path(job["out_dir"]) / "volseg_seg.nii.gz"
    rss0 = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        images = [read_image(job["image"])]
        out = pred.predict(images, source=job["image"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        write_label_like(out["labels"], job["image"], images[0], out_path)
        t2 = time.perf_counter()
    timing = out["timing"]
    # read_image is counted in "preprocess", as LoadImaged is on the baseline's side
    stages = {
        "preprocess": (t1 - t0) - timing["network_s"] - timing["restore_s"],
        "network": timing["network_s"],
        "restore+write": timing["restore_s"] + (t2 - t1),
    }
    return {
        "stages_s": stages,
        "stage_peak_rss_mib": _stage_peaks(sampler, t0, stages),
        "time_s": t2 - t0,
        "rss_before_mib": rss0,
        "output": str(out_path),
    }


def _run_worker(name: str, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    result = (_worker_baseline if name == "baseline" else _worker_volseg)(job)
    result["peak_rss_mib"] = _peak_rss_mib()
    result["threads"] = torch.get_num_threads()
    if job["device"] == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent


def make_volume(path: Path, shape: Sequence[int], spacing: Sequence[float], seed: int = 0) -> None:
    """Synthetic CT: an elliptic body of smoothed-noise soft tissue and "bone" in air, int16 HU,
    written with an LPS affine (axes towards Left, Posterior, Superior) and an off-centre origin."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    X, Y, Z = (int(s) for s in shape)
    coarse = torch.randn((1, 1, X // 16 + 2, Y // 16 + 2, Z // 8 + 2), generator=gen)
    hu = F.interpolate(coarse, size=(X, Y, Z), mode="trilinear", align_corners=True)[0, 0]
    hu = torch.where(hu > 1.2, 300 + 400 * (hu - 1.2), 40 + 120 * hu)  # soft tissue, fat and bone
    hu += 20 * torch.randn((X, Y, Z), generator=gen)
    x = torch.linspace(-1, 1, X)[:, None, None]
    y = torch.linspace(-1, 1, Y)[None, :, None]
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1
    hu = torch.where(body, hu, torch.full_like(hu, -1000.0))
    arr = hu.round().clamp(-1024, 3071).to(torch.int16).numpy()
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.array([[-sx, 0, 0, 180.0], [0, -sy, 0, 210.0], [0, 0, sz, -420.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))


def _preprocessed_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> List[int]:
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target)]


def theoretical_bytes(shape, spacing, target, classes, roi) -> Dict[str, float]:
    """Lower bound (bytes) of the dominant live buffers, from the algorithms, not measured.

    baseline: at Invertd the softmax probabilities (K, preprocessed) float32 and their inverse
    on the original grid (K, original) float32 coexist; the input image (original grid)
    float32 is still in the dict.
    volseg: float16 probabilities (K, preprocessed), one Z slab of the float32 stitching buffer
    (capped at SLAB_BYTES, at least two ROI depths) and about three single-class float32
    volumes on the original grid during the running argmax."""
    from volseg.inference.predictor import SLAB_BYTES

    orig = float(np.prod(shape))
    pre_shape = _preprocessed_shape(shape, spacing, target)
    pre = float(np.prod(pre_shape))
    X, Y, Z = pre_shape
    depth = max(roi[2] * 2, int(SLAB_BYTES // max(1, classes * X * Y * 4)))
    slab = classes * X * Y * min(Z, depth + roi[2]) * 4
    return {
        "baseline": classes * pre * 4 + classes * orig * 4 + orig * 4,
        "volseg": classes * pre * 2 + slab + 3 * orig * 4,
    }


def _spawn(name: str, job: dict, tmp: Path, timeout: Optional[float]) -> dict:
    job_path = tmp / f"{name}.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--_worker", name, str(job_path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after --timeout {timeout:g} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"exit status {proc.returncode}{killed}\n{tail}", "process_s": wall}
    res = json.loads(lines[-1][len("RESULT ") :])
    res["process_s"] = wall
    return res


def _median_run(runs: List[dict]) -> dict:
    """The run with the median wall time (its stage times with it), the largest peak RSS of all
    runs, and every run's wall time; an error if any run failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["time_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    out["all_time_s"] = [round(r["time_s"], 2) for r in runs]
    return out


def agreement(a_path: str, b_path: str) -> float:
    """Fraction of voxels with the same label; both files must share shape and affine."""
    import nibabel as nib

    a, b = nib.load(a_path), nib.load(b_path)
    if not np.allclose(a.affine, b.affine, atol=1e-3):
        raise ValueError(f"label maps differ in affine:\n{a.affine}\nvs\n{b.affine}")
    x, y = np.squeeze(np.asarray(a.dataobj)), np.squeeze(np.asarray(b.dataobj))
    if x.shape != y.shape:
        raise ValueError(f"label maps differ in shape: {x.shape} vs {y.shape}")
    return float(np.mean(x == y))


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 150), metavar=("X", "Y", "Z"), help="scan grid (default 256 256 150)")
    p.add_argument("--classes", type=int, default=14, help="network outputs incl. background, >= 3 (default 14)")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), help="scan spacing in mm (default 0.8 0.8 2.5)")
    p.add_argument("--target-spacing", type=float, nargs=3, default=(1.5, 1.5, 2.0), help="model spacing in mm (default 1.5 1.5 2.0)")
    p.add_argument("--roi", type=int, nargs=3, default=(96, 96, 96), help="sliding-window ROI in voxels (default 96 96 96)")
    p.add_argument("--features", nargs="+", default=["4", "8"], help="U-Net features per level (default 4 8); 'none' = a 1x1x1 conv")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=3, help="runs per pipeline, alternating; the median time is reported (default 3)")
    p.add_argument("--only", choices=PIPELINES, help="run one pipeline only")
    p.add_argument("--timeout", type=float, default=None, help="seconds per pipeline before it is stopped")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        _run_worker(*args._worker)
        return 0
    if args.repeat < 1:
        p.error(f"--repeat {args.repeat}: must be >= 1.")
    if args.classes < 3:
        p.error(f"--classes {args.classes}: need >= 3 (with 2, volseg's network has one sigmoid output and the recipes are not comparable).")
    features = [] if [f.lower() for f in args.features] == ["none"] else [int(f) for f in args.features]
    if features and any(r % 2 ** (len(features) - 1) for r in args.roi):
        p.error(f"--roi {list(args.roi)} must be a multiple of {2 ** (len(features) - 1)} for features {features}.")

    import torch

    with tempfile.TemporaryDirectory(prefix="volseg_bench_") as d:
        tmp = Path(d)
        image = tmp / "ct.nii.gz"
        t0 = time.perf_counter()
        make_volume(image, args.shape, args.spacing)
        torch.manual_seed(0)
        weights = tmp / "weights.pt"
        torch.save(build_model(features, 1, args.classes).state_dict(), weights)
        print(f"synthetic CT {list(args.shape)} at {list(args.spacing)} mm -> {_preprocessed_shape(args.shape, args.spacing, args.target_spacing)} "
              f"at {list(args.target_spacing)} mm, {args.classes} classes, roi {list(args.roi)}, "
              f"network {'conv1x1' if not features else 'unet ' + str(features)}, {args.device} "
              f"(written in {time.perf_counter() - t0:.1f}s)", flush=True)
        names = [n for n in PIPELINES if not args.only or n == args.only]
        runs: Dict[str, List[dict]] = {n: [] for n in names}
        for rep in range(args.repeat):
            for name in names:  # alternate, so a burst of load from elsewhere hits both
                out_dir = tmp / name
                out_dir.mkdir(exist_ok=True)
                job = {
                    "image": str(image), "weights": str(weights), "features": features, "classes": args.classes,
                    "target_spacing": list(args.target_spacing), "roi": list(args.roi), "device": args.device,
                    "out_dir": str(out_dir), "threads": args.threads,
                }
                r = _spawn(name, job, tmp, args.timeout)
                runs[name].append(r)
                print(f"  [{rep + 1}/{args.repeat}] {name}: " + (r["error"].splitlines()[0] if "error" in r else f"{r['time_s']:.1f}s, peak RSS {r['peak_rss_mib']:.0f} MiB"), flush=True)
                if "error" in r:
                    print("    " + "\n    ".join(r["error"].splitlines()[1:]), file=sys.stderr)
        results = {n: _median_run(rs) for n, rs in runs.items()}
        ok = {n: r for n, r in results.items() if "error" not in r}
        agree = None
        if len(ok) == 2:
            agree = agreement(ok["baseline"]["output"], ok["volseg"]["output"])
        theory = theoretical_bytes(args.shape, args.spacing, args.target_spacing, args.classes, args.roi)

    _table(ok, theory, agree, args.device)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "_worker" and k != "json"},
                                         "results": results, "theory_bytes": theory, "agreement": agree}, indent=2, default=str), encoding="utf-8")
    return 0 if len(ok) == len(results) else 1


def _table(ok: dict, theory: dict, agree: Optional[float], device: str) -> None:
    rows = [("wall time (s)", "time_s", "{:.1f}"), ("  preprocess (s)", ("stages_s", "preprocess"), "{:.1f}"),
            ("  network+stitch (s)", ("stages_s", "network"), "{:.1f}"), ("  restore+write (s)", ("stages_s", "restore+write"), "{:.1f}"),
            ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"), ("  RSS before (MiB)", "rss_before_mib", "{:.0f}"),
            ("  peak in preprocess", ("stage_peak_rss_mib", "preprocess"), "{:.0f}"),
            ("  peak in network", ("stage_peak_rss_mib", "network"), "{:.0f}"),
            ("  peak in restore+write", ("stage_peak_rss_mib", "restore+write"), "{:.0f}")]
    if device == "cuda":
        rows.append(("CUDA peak alloc (MiB)", "cuda_peak_mib", "{:.0f}"))

    def get(r, key):
        return r[key[0]][key[1]] if isinstance(key, tuple) else r.get(key)

    print()
    reps = {n: r.get("all_time_s") for n, r in ok.items()}
    if any(v and len(v) > 1 for v in reps.values()):
        print("wall times of every run (s): " + "; ".join(f"{n} {v}" for n, v in reps.items()) + " -- the table shows the median run")
    print(f"{'':24}{'baseline':>12}{'volseg':>12}{'baseline/volseg':>18}")
    for label, key, fmt in rows:
        vals = [get(ok[n], key) if n in ok else None for n in PIPELINES]
        cells = [fmt.format(v) if v is not None else "-" for v in vals]
        ratio = _ratio(*vals) if None not in vals else "-"
        print(f"{label:24}{cells[0]:>12}{cells[1]:>12}{ratio:>18}")
    tb, tv = theory["baseline"] / 2**20, theory["volseg"] / 2**20
    print(f"{'lower bound (MiB)':24}{tb:>12.0f}{tv:>12.0f}{_ratio(tb, tv):>18}   (main buffers, see theoretical_bytes)")
    if agree is not None:
        print(f"label agreement (equal voxels): {agree:.4f}")


if __name__ == "__main__":
    sys.exit(main())
