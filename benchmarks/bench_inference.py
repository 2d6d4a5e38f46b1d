"""Whole-scan inference, file in -> file out: volseg against MONAI's standard recipe.

Every row segments the same scan with the same weights and writes a label map on the scan's
own grid; each run is a fresh subprocess (its peak RSS, ``ru_maxrss``, belongs to it alone) and
the rows alternate, ``--repeat`` times, reporting the median wall time.

Rows (``--rows``):

* ``monai``: the standard recipe of the MONAI tutorials: LoadImaged -> EnsureChannelFirstd ->
  Orientationd -> Spacingd(bilinear) -> the plan's intensity mapping (ScaleIntensityRanged for
  CT, NormalizeIntensityd(nonzero) otherwise) -> sliding_window_inference (roi = the training
  patch, overlap 0.5, gaussian, the same window batch, softmax per window: both sides blend
  probabilities) -> Invertd(bilinear) -> argmax -> SaveImaged; the network in its standard
  contiguous layout.
* ``monai_lowmem``: the same, memory-aware: stitching on the CPU in float16, argmax before
  Invertd (nearest).
* ``volseg``: ``Predictor.predict`` with the run's ``infer`` settings (the defaults) +
  ``write_label_like``; ``nopost``: the same without the run's learned largest-component
  postprocessing (an accuracy step the recipe has no counterpart of), so that its agreement
  with the recipe measures the speed levers alone.
* ``exact``: volseg with the recipe's roi/overlap/blending, no crop and the recipe's precision
  (``crop=none``, ``window_scale=1``, ``overlap=0.5``, no learned largest-component step;
  ``amp`` on CUDA only, as the recipe);
  then one lever at a time on top of ``exact``: ``amp`` (``amp=true``: on the CPU, bfloat16
  windows where it has native bf16; the same as ``exact`` on CUDA), ``skip``
  (``crop=windows``: skip windows that miss the body box; exact inside it), ``crop``
  (``crop=box``: tile the body box only), ``window`` (``window_scale=--window-scale``),
  ``overlap`` (0.25), ``batch1`` (window batch 1), ``threads1`` (one torch thread).

Agreement: mean foreground Dice of each row's label map against the recipe's and against
``exact``'s. With ``--train-steps N`` the network is first trained briefly on synthetic
phantoms (``--modality`` ct or mr; volseg's trainer, the default config) and a held-out phantom
is segmented, so the agreement rows mean something, and each row's Dice against the phantom's
reference label map (accuracy) is reported as well; otherwise the network (``--features``) is untrained (random
weights, zero biases) and only the speed and memory rows mean something.
``--lower-bound`` prints :func:`volseg.inference.windows.estimate_memory` for the scan.

    python benchmarks/bench_inference.py --train-steps 60 --rows monai exact volseg crop window overlap
    python benchmarks/bench_inference.py --shape 512 512 300 --classes 14 --features 4 8 --roi 96 96 96 --repeat 1 --rows monai monai_lowmem volseg
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

# as the recipe: no crop, the training patch, overlap 0.5, AMP on CUDA only, and no learned
# largest-component postprocessing (an empty explicit choice wins over the run's postprocessing.json)
EXACT = {"crop": "none", "window_scale": 1.0, "overlap": 0.5, "amp": "RECIPE", "largest_component": []}
ROWS = {
    "monai": None,
    "monai_lowmem": None,
    "volseg": {},
    "nopost": {"largest_component": []},
    "exact": EXACT,
    "skip": {**EXACT, "crop": "windows"},
    "crop": {**EXACT, "crop": "box"},
    "window": {**EXACT, "window_scale": "WINDOW"},
    "overlap": {**EXACT, "overlap": 0.25},
    "batch1": {**EXACT, "batch_size": 1},
    "threads1": {**EXACT, "threads": 1},
    "amp": {**EXACT, "amp": True},
}


# --------------------------------------------------------------------------- workers (subprocess)


def _peak_rss_mib() -> float:
    """This process's peak RSS (MiB). On Linux VmHWM, not ru_maxrss: ru_maxrss survives exec,
    so a worker would report at least the parent's RSS at fork time (torch, the trained model)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024**2 if sys.platform == "darwin" else 1024)


def _rss_mib() -> float:
    """Current RSS (MiB), Linux."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _recipe(job: dict, lowmem: bool) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from volseg.inference import Predictor

    pred = Predictor.from_run(job["run"], device=job["device"])
    # the network as a MONAI user builds and loads it: contiguous parameters. (from_run gives
    # a CPU predictor's networks channels_last_3d weights, and with those oneDNN's float32
    # convolutions ran 1.3x as fast even on contiguous windows: 8.6 vs 11.3 s for 2 windows of
    # the 32..320 U-Net; before 2026-12-01 evening the recipe rows ran that way.)
    plan, model, device = pred.plan, pred.model.to(memory_format=torch.contiguous_format), pred.device
    rss0 = _rss_mib()
    n = plan.norms[0]
    norm = (ScaleIntensityRanged("image", n.lo, n.hi, (n.lo - n.mean) / n.std, (n.hi - n.mean) / n.std, clip=True) if n.scheme == "ct"
            else NormalizeIntensityd("image", nonzero=True))
    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes=plan.orientation),
                   Spacingd("image", pixdim=plan.spacing, mode="bilinear"), norm])
    save = SaveImaged("pred", output_dir=job["out_dir"], output_postfix="seg", output_dtype=np.uint8, resample=False,
                      separate_folder=False, print_log=False)
    if lowmem:
        post = Compose([AsDiscreted("pred", argmax=True), Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True), save])
    else:
        post = Compose([Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False), AsDiscreted("pred", argmax=True), save])
    inferer = SlidingWindowInferer(list(plan.patch_size), sw_batch_size=job["batch"], overlap=0.5, mode="gaussian", sw_device=device,
                                   device=torch.device("cpu") if lowmem else device)

    def net(x):
        with torch.autocast(device.type, enabled=device.type == "cuda"):  # AMP on CUDA, as volseg
            p = torch.softmax(model(x.float()).float(), 1)
        return p.half() if lowmem else p

    t0 = time.perf_counter()
    data = pre({"image": job["image"]})
    t1 = time.perf_counter()
    with torch.inference_mode():
        x = data["image"][None].to(device)
        data["pred"] = inferer(x.half() if lowmem else x, net)[0]
    _sync(device)
    t2 = time.perf_counter()
    data = post(data)
    t3 = time.perf_counter()
    out = sorted(Path(job["out_dir"]).glob("*_seg.nii.gz"))
    return {"time_s": t3 - t0, "stages_s": {"preprocess": t1 - t0, "network": t2 - t1, "restore": t3 - t2}, "output": str(out[0]), "rss_before_mib": rss0}


def _volseg(job: dict) -> dict:
    from volseg.data.io import read_image, write_label_like
    from volseg.inference import Predictor

    pred = Predictor.from_run(job["run"], device=job["device"], overrides=job["overrides"])
    rss0 = _rss_mib()
    out_path = Path(job["out_dir"]) / "volseg_seg.nii.gz"
    t0 = time.perf_counter()
    images = [read_image(job["image"])]
    out = pred.predict(images, source=job["image"])
    _sync(pred.device)
    write_label_like(out["labels"], job["image"], images[0], out_path)
    t1 = time.perf_counter()
    tm = out["timing"]
    stages = {"preprocess": t1 - t0 - tm["network_s"] - tm["restore_s"], "network": tm["network_s"], "restore": tm["restore_s"]}
    return {"time_s": t1 - t0, "stages_s": stages, "output": str(out_path), "box": out["box"], "rss_before_mib": rss0}


def _run_worker(row: str, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    result = _recipe(job, row == "monai_lowmem") if row.startswith("monai") else _volseg(job)
    result["peak_rss_mib"] = _peak_rss_mib()
    if job["device"] == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- inputs


def make_volume(path: Path, shape: Sequence[int], spacing: Sequence[float], seed: int = 0) -> None:
    """Synthetic CT: an elliptic body of smoothed-noise soft tissue, fat and "bone" in air,
    int16 HU, written with an LPS affine and an off-centre origin."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    X, Y, Z = (int(s) for s in shape)
    coarse = torch.randn((1, 1, X // 16 + 2, Y // 16 + 2, Z // 8 + 2), generator=gen)
    hu = F.interpolate(coarse, size=(X, Y, Z), mode="trilinear", align_corners=True)[0, 0]
    hu = torch.where(hu > 1.2, 300 + 400 * (hu - 1.2), 40 + 120 * hu)
    hu += 20 * torch.randn((X, Y, Z), generator=gen)
    x = torch.linspace(-1, 1, X)[:, None, None]
    y = torch.linspace(-1, 1, Y)[None, :, None]
    hu = torch.where((x / 0.85) ** 2 + (y / 0.7) ** 2 < 1, hu, torch.full_like(hu, -1000.0))
    arr = hu.round().clamp(-1024, 3071).to(torch.int16).numpy()
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.array([[-sx, 0, 0, 180.0], [0, -sy, 0, 210.0], [0, 0, sz, -420.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nib.save(img, str(path))


def make_untrained_run(folder: Path, features: Sequence[int], classes: int, roi: Sequence[int], spacing: Sequence[float], batch: int) -> Path:
    """A run folder for an untrained volseg U-Net (instance norm, random weights, zero biases
    so no class wins by its bias) with a CT plan mapping -1000..1000 HU to 0..1."""
    import torch
    import yaml

    from volseg.config import from_dict, to_dict
    from volseg.data.plan import ChannelNorm, PreprocessingPlan
    from volseg.nets import build_network

    folder.mkdir(parents=True, exist_ok=True)
    cfg = from_dict({"model": {"features": list(features), "norm": "instance", "deep_supervision": False},
                     "data": {"patch_size": list(roi)}, "infer": {"batch_size": batch}})
    plan = PreprocessingPlan(spacing=tuple(spacing), orientation="RAS", channels=("CT",), norms=(ChannelNorm("ct", -1000.0, 1000.0, -1000.0, 2000.0),),
                label_values=tuple(range(classes)), label_names=tuple(f"class{i}" for i in range(classes)), spatial_dims=3,
                patch_size=tuple(roi), slice_axis=2)
    torch.manual_seed(0)
    net = build_network(cfg.model, 1, classes)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)), encoding="utf-8")
    (folder / "plan.json").write_text(plan.to_json(), encoding="utf-8")
    torch.save({"model": net.state_dict(), "epoch": 0}, folder / "best.pt")
    return folder


def make_trained_run(tmp: Path, steps: int, device: str, batch: int, shape: Sequence[int], modality: str = "ct",
                     spacing: Optional[Sequence[float]] = None) -> tuple:
    """Train the default config's network (U-Net 16-128, patch 64^3, every key at its default
    but the length) for ``steps`` steps on synthetic phantoms of ``modality``; return the run
    folder, a held-out phantom of ``shape`` voxels (at ``spacing`` mm; None: synth's draw,
    about 1.5 mm) written as NIfTI, and its reference label map. The training phantoms share
    shape and spacing. The run keeps the default ``infer`` settings, so the ``volseg`` row is
    volseg's defaults."""
    from volseg.config import load_config
    from volseg.data.io import write_image
    from volseg.data.synth import make_case, make_dataset
    from volseg.training import train

    epochs = max(1, steps // 20)
    data = make_dataset(tmp / "phantoms", cases=6, test_cases=0, seed=1, shape=shape, modality=modality, spacing=spacing)
    cfg = load_config(None, [f"train.epochs={epochs}", f"train.steps_per_epoch={max(1, steps // epochs)}", "train.val_every=1000",
                             f"infer.batch_size={batch}"])
    run = train(data, cfg, tmp / "run", device=device)
    image, label = make_case(99, modality, shape, spacing, orientation="LPS", anisotropic=False)
    path, reference = tmp / "phantom.nii.gz", tmp / "phantom_label.nii.gz"
    write_image(image, path)
    write_image(label, reference)
    return run, path, reference


# --------------------------------------------------------------------------- parent


def _spawn(row: str, job: dict, tmp: Path, timeout: Optional[float]) -> dict:
    job_path = tmp / f"{row}.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    try:
        proc = subprocess.run([sys.executable, __file__, "--_worker", row, str(job_path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after --timeout {timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"exit status {proc.returncode}{killed}\n{tail}"}
    return json.loads(lines[-1][len("RESULT ") :])


def _median(runs: List[dict]) -> dict:
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["time_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    out["all_time_s"] = [round(r["time_s"], 2) for r in runs]
    return out


def dice(a_path: str, b_path: str) -> float:
    """Mean foreground Dice between two label maps on the same grid (classes in either)."""
    import nibabel as nib

    a, b = nib.load(a_path), nib.load(b_path)
    if not np.allclose(a.affine, b.affine, atol=1e-3):
        raise ValueError(f"{a_path} and {b_path} differ in affine")
    x, y = np.squeeze(np.asarray(a.dataobj)), np.squeeze(np.asarray(b.dataobj))
    if x.shape != y.shape:
        raise ValueError(f"{a_path} {x.shape} and {b_path} {y.shape} differ in shape")
    scores = []
    for k in sorted(set(np.unique(x)) | set(np.unique(y)) - {0}):
        p, q = x == k, y == k
        scores.append(2 * np.logical_and(p, q).sum() / (p.sum() + q.sum()))
    return float(np.mean(scores)) if scores else 1.0


def run_rows(args, run: Path, image: Path, tmp: Path, reference: Optional[Path] = None) -> Dict[str, dict]:
    runs: Dict[str, List[dict]] = {r: [] for r in args.rows}
    for rep in range(args.repeat):
        for row in args.rows:  # alternate, so a burst of load from elsewhere hits every row
            out_dir = tmp / f"out_{row}"
            out_dir.mkdir(exist_ok=True)
            given = {"WINDOW": args.window_scale, "RECIPE": args.device == "cuda"}
            overrides = {k: given.get(v, v) if isinstance(v, str) else v for k, v in (ROWS[row] or {}).items()}
            job = {"image": str(image), "run": str(run), "device": args.device, "threads": args.threads, "batch": args.batch,
                   "out_dir": str(out_dir), "overrides": {"batch_size": args.batch, **overrides}}
            r = _spawn(row, job, tmp, args.timeout)
            runs[row].append(r)
            msg = r["error"] if "error" in r else f"{r['time_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB"
            print(f"  [{rep + 1}/{args.repeat}] {row}: {msg}", flush=True)
    results = {row: _median(rs) for row, rs in runs.items()}
    for row, r in results.items():
        for ref in ("monai", "exact"):
            if "error" not in r and ref in results and "error" not in results[ref] and ref != row:
                r[f"dice_vs_{ref}"] = dice(r["output"], results[ref]["output"])
        if reference is not None and "error" not in r:
            r["dice_vs_reference"] = dice(r["output"], str(reference))
    return results


def print_table(results: Dict[str, dict], device: str) -> None:
    base = results.get("monai", {}).get("time_s")
    cols = ["row", "wall s", "monai/row", "pre s", "net s", "restore s", "peak RSS MiB", "RSS before MiB", "Dice vs monai", "Dice vs exact"]
    with_ref = any("dice_vs_reference" in r for r in results.values())
    if with_ref:
        cols.append("Dice vs reference")
    if device == "cuda":
        cols.append("CUDA peak MiB")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row, r in results.items():
        if "error" in r:
            print(f"| {row} | failed: {r['error'].splitlines()[0]} |")
            continue
        st = r["stages_s"]
        cells = [row, f"{r['time_s']:.1f}", f"{base / r['time_s']:.2f}x" if base else "-", f"{st['preprocess']:.1f}", f"{st['network']:.1f}",
                 f"{st['restore']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r.get('rss_before_mib', float('nan')):.0f}", f"{r.get('dice_vs_monai', float('nan')):.4f}",
                 f"{r.get('dice_vs_exact', float('nan')):.4f}"]
        if with_ref:
            cells.append(f"{r.get('dice_vs_reference', float('nan')):.4f}")
        if device == "cuda":
            cells.append(f"{r.get('cuda_peak_mib', float('nan')):.0f}")
        print("| " + " | ".join(cells) + " |")
    print("wall times of every run (s): " + "; ".join(f"{row} {r.get('all_time_s')}" for row, r in results.items()))


def recipe_bytes(plan_memory_parts: Dict[str, float], classes: int, scan_voxels: float, pre_voxels: float) -> float:
    """The standard recipe's main buffers at Invertd (a lower bound, from the algorithm): the
    stitched (K, preprocessed) float32 probabilities, their (K, scan) float32 inverse and the
    (1, scan) float32 input image, alive together."""
    return classes * pre_voxels * 4 + classes * scan_voxels * 4 + scan_voxels * 4


def lower_bound(run: Path, image: Path, rows_batch: int) -> Dict[str, float]:
    """volseg's own sizing (plan_memory) for this scan, without the crop, and the recipe's."""
    import SimpleITK as sitk

    from volseg.data.plan import PreprocessingPlan
    from volseg.inference.windows import estimate_memory, window_size
    from volseg.preprocessing.geometry import canonical_geometry

    plan = PreprocessingPlan.from_json((run / "plan.json").read_text(encoding="utf-8"))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()
    ref = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    ref.SetDirection(reader.GetDirection())
    grid, perm, _ = canonical_geometry(ref, plan.orientation)
    size, spacing = reader.GetSize(), reader.GetSpacing()
    scan = [size[p] for p in perm]
    sp = [spacing[p] for p in perm]
    parts = estimate_memory(scan, sp, plan.spacing, plan.out_channels, window_size(plan), batch_size=rows_batch)
    pre = float(np.prod([max(1, round(n * s / t)) for n, s, t in zip(scan, sp, plan.spacing)]))
    parts["monai_recipe_total"] = recipe_bytes(parts, plan.out_channels, float(np.prod(scan)), pre)
    return parts


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["monai", "exact", "volseg"], choices=list(ROWS))
    p.add_argument("--shape", type=int, nargs=3, default=(384, 384, 64), help="synthetic CT grid (default 384 384 64)")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), help="its spacing, mm (default 0.8 0.8 2.5)")
    p.add_argument("--target-spacing", type=float, nargs=3, default=(1.6, 1.6, 2.5), help="the plan's spacing, mm (default 1.6 1.6 2.5)")
    p.add_argument("--classes", type=int, default=14, help="classes incl. background (untrained network; default 14)")
    p.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256, 320], help="U-Net features (default: configs/gpu_fullres.yaml's)")
    p.add_argument("--roi", type=int, nargs=3, default=(128, 128, 64), help="training patch = the recipe's roi (default 128 128 64)")
    p.add_argument("--train-steps", type=int, default=0, help="train the default config's network this many steps on phantoms and segment one")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=(128, 128, 80), help="the held-out phantom's grid with --train-steps")
    p.add_argument("--modality", choices=("ct", "mr"), default="ct", help="phantoms' modality with --train-steps (default ct)")
    p.add_argument("--phantom-spacing", type=float, nargs=3, default=None, help="phantoms' spacing, mm, with --train-steps (default: drawn, ~1.5)")
    p.add_argument("--window-scale", type=float, default=1.5, help="infer.window_scale of the 'window' row (default 1.5)")
    p.add_argument("--batch", type=int, default=4, help="windows per batch, both sides (default 4)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=3, help="alternated runs per row; the median is reported (default 3)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args._worker and (args.repeat < 1 or args.classes < 3):
        p.error(f"--repeat {args.repeat} must be >= 1 and --classes {args.classes} >= 3 (2 classes make a one-channel sigmoid network).")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    if args._worker:
        _run_worker(*args._worker)
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # also for the training of --train-steps
    with tempfile.TemporaryDirectory(prefix="volseg_bench_") as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        if args.train_steps:
            run, image, reference = make_trained_run(tmp, args.train_steps, args.device, args.batch, args.phantom_shape, args.modality, args.phantom_spacing)
            what = (f"default-config U-Net trained {args.train_steps} steps on {args.modality.upper()} phantoms; "
                    f"held-out phantom {list(args.phantom_shape)}")
        else:
            image, reference = tmp / "ct.nii.gz", None
            make_volume(image, args.shape, args.spacing)
            run = make_untrained_run(tmp / "run", args.features, args.classes, args.roi, args.target_spacing, args.batch)
            what = (f"untrained U-Net {args.features}, {args.classes} classes; synthetic CT {list(args.shape)} at {list(args.spacing)} mm "
                    f"-> plan spacing {list(args.target_spacing)} mm, roi {list(args.roi)}")
        bound = lower_bound(run, image, args.batch)
        print(f"{what}; {args.device}, set-up {time.perf_counter() - t0:.0f} s", flush=True)
        results = run_rows(args, run, image, tmp, reference)
    print_table(results, args.device)
    print("lower bounds, main buffers (MiB): volseg (plan_memory) " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in bound.items() if k != "monai_recipe_total")
          + f"; monai recipe {bound['monai_recipe_total'] / 2**20:.0f}")
    if args.json:
        args.json.write_text(json.dumps({"setup": what, "args": {k: v for k, v in vars(args).items() if k not in ("_worker", "json")},
                                         "results": results, "plan_memory_bytes": bound}, indent=2, default=str), encoding="utf-8")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
