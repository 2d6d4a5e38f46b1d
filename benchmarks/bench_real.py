"""Accuracy on real CT scans from different sources: volseg's planned default against a MONAI tutorial pipeline.

Data: three real CT scans with an aorta reference mask, from three different acquisitions, all
shipped in the source distribution of TotalSegmentator 2.18.0 on PyPI (Apache-2.0;
``tests/reference_files``). The script fetches it with ``pip download`` into ``--cache``
(default ``~/.cache/volseg-bench``; checked against a pinned SHA-256), never into the repository:

* ``example``: ``example_ct.nii.gz``, 122 x 101 x 112 at 3 mm, RAS, abdomen and pelvis without
  contrast (aorta about 40 HU); reference: ``example_seg_fast_force_split.nii.gz`` (label 52);
* ``cta``: ``aorta_report/example_ct.nii.gz``, 233 x 167 x 191 at 1.5 mm, LPS, neck to upper
  abdomen, arterial phase (aorta about 350 HU); reference: ``aorta_report/test_result/models/
  aorta.nii.gz`` (on a crop of the scan's grid, pasted back exactly: integer voxel offset);
* ``dicom``: ``example_ct_dicom/``, 20 DICOM slices, 512 x 512 at 0.98 x 0.98 x 2 mm, a Siemens
  Biograph40 mCT (PET/CT), upper abdomen, portal-venous phase (aorta about 150 HU); reference:
  ``example_seg_dicom.nii.gz`` (label 52, stored with the y axis flipped: resampled onto the
  DICOM grid, which is exact).

Tasks (``--task``): ``aorta`` (default), the one structure labelled in all three; ``organs``:
liver, spleen, stomach and aorta (labels 1-4) on the two sources with a full "total" reference
(``example`` and ``dicom``; the ``cta`` reference holds the aorta alone), so one training
source per split, but structures that a short CPU training can learn.

The references are TotalSegmentator's own outputs (its regression-test files), not manual
contours. Each scan is written once as NIfTI on its own grid (no resampling; the DICOM series
read with SimpleITK) with the task's structures as labels; a source whose reference does not
survive the move voxel for voxel is refused.

Protocol: train on every source of the task but ``--holdout`` (default ``dicom``), segment the
held-out scan, mean Dice over the task's structures on the scan's own grid
(``volseg.evaluation.evaluate``; per-structure Dice is reported too). Both sides get
the same number of optimiser steps, patches per step and spacing (patch: see below); seeds ``--seeds``;
training lengths ``--steps`` (each length is a fresh run). Each run is its own subprocess.

* ``volseg``: the planner on the training sources (``volseg plan MANIFEST --memory GB``, run
  once in the parent), then ``volseg.training.train`` with that config, i.e. ``volseg train
  MANIFEST --config planned.yaml``; set over the plan: only ``train.epochs``,
  ``train.steps_per_epoch``, ``train.seed``, ``data.val_fraction=0``, ``data.min_cases=1`` (every training scan
  trains; ``best.pt`` then falls back to ``last.pt``) and ``--set``; ``--spacing`` goes to the
  planner, which fits patch, batch and depth to it. Inference with ``Predictor.from_run`` and
  the run's ``infer`` settings.
* ``monai``: MONAI's spleen segmentation tutorial (``spleen_segmentation_3d``), written out
  plainly: ``LoadImaged`` -> ``EnsureChannelFirstd`` -> ``ScaleIntensityRanged(-57, 164 HU ->
  0..1, clip)`` -> ``CropForegroundd`` -> ``Orientationd(RAS)`` -> ``Spacingd`` ->
  (``SpatialPadd`` to the patch, for scans thinner than it) -> ``RandCropByPosNegLabeld(pos=1,
  neg=1)`` in a ``CacheDataset``; MONAI ``UNet`` (16-256
  channels, strides 2, ``num_res_units=2``, batch norm); ``DiceCELoss``; ``Adam(1e-4)``;
  ``sliding_window_inference`` (overlap 0.25) -> ``Invertd`` -> argmax -> ``SaveImaged``. The
  spacing and patches per step are volseg's plan, the patch volseg's rounded up to a multiple of
  16 (:func:`tutorial_patch`); ``--threads`` and ``--device`` apply to both (on CUDA volseg
  trains with its default AMP, the tutorial without, as each ships).

    python benchmarks/bench_real.py                 # the full run (see benchmarks/README.md)
    python benchmarks/bench_real.py --quick         # smoke test: a few steps, one seed
    python benchmarks/bench_real.py --task organs --holdout dicom example
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "totalsegmentator==2.18.0"
SDIST = "totalsegmentator-2.18.0.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
REF = "totalsegmentator-2.18.0/tests/reference_files/"
#: source -> (scan: a file or a DICOM folder, reference mask)
SOURCES = {
    "example": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
    "cta": ("aorta_report/example_ct.nii.gz", "aorta_report/test_result/models/aorta.nii.gz"),
    "dicom": ("example_ct_dicom", "example_seg_dicom.nii.gz"),
}
# TotalSegmentator's "total" class map: 1 spleen, 5 liver, 6 stomach, 52 aorta
TOTAL = {"liver": 5, "spleen": 1, "stomach": 6, "aorta": 52}
#: task -> {"labels": our label values -> names, "sources": source -> {reference value -> our value}}
#: ``aorta``: the one structure labelled in all three sources. ``organs``: four structures of
#: the two full "total" references (the `cta` reference holds the aorta alone), so one training
#: source per split, but organs whose Dice a short CPU training can move.
TASKS = {
    "aorta": {"labels": {1: "aorta"}, "sources": {"example": {52: 1}, "cta": {1: 1}, "dicom": {52: 1}}},
    "organs": {"labels": {i + 1: n for i, n in enumerate(TOTAL)},
               "sources": {s: {v: i + 1 for i, v in enumerate(TOTAL.values())} for s in ("example", "dicom")}},
}
SIDES = ("volseg", "monai")
TUTORIAL_HU = (-57.0, 164.0)  # ScaleIntensityRanged window of MONAI's spleen tutorial
STEPS_PER_EPOCH = 25
LEARNED = 0.1  # below this Dice on every run, a comparison only ranks two failures (the report says so)


# --------------------------------------------------------------------------- data (in the parent)


def fetch(cache: Path) -> Path:
    """The TotalSegmentator sdist in ``cache`` (downloaded with pip when absent), checked
    against :data:`SDIST_SHA256`."""
    path = cache / SDIST
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(cache)]
        print(f"fetching {PACKAGE} (38 MB) into {cache}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path}: SHA-256 {digest}, expected {SDIST_SHA256}; delete it to download it again.")
    return path


def _extract(sdist: Path, dest: Path) -> Path:
    """Unpack the reference files used here (not the whole sdist) into ``dest``."""
    wanted = [REF + p for scan, ref in SOURCES.values() for p in (scan, ref)]
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and any(m.name == w or m.name.startswith(w + "/") for w in wanted)]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.12 and recent patch releases
        tar.extractall(dest, members=members, **safe)
    return dest / REF


def _scan(path: Path):
    import SimpleITK as sitk

    if path.is_dir():  # one series per folder here
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def prepare_source(ref_dir: Path, name: str, task: str, out: Path) -> dict:
    """One source as ``out/<name>.nii.gz`` (the scan, int16, its own grid) and
    ``out/<name>_<task>.nii.gz`` (uint8, the task's label values, the same grid). The reference
    is moved onto the scan's grid by nearest-neighbour resampling with the identity transform;
    every structure must keep its exact voxel count (the grids share spacing and differ by whole
    voxels or a flip), else the source is refused."""
    import numpy as np
    import SimpleITK as sitk

    scan_rel, ref_rel = SOURCES[name]
    scan = _scan(ref_dir / scan_rel)
    ref = sitk.ReadImage(str(ref_dir / ref_rel))
    values = sitk.GetArrayViewFromImage(ref)
    mapped = np.zeros(values.shape, np.uint8)
    for theirs, ours in TASKS[task]["sources"][name].items():
        mapped[values == theirs] = ours
    mapped_img = sitk.GetImageFromArray(mapped)
    mapped_img.CopyInformation(ref)
    moved = sitk.Resample(mapped_img, scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    moved_arr = sitk.GetArrayViewFromImage(moved)
    voxels = {}
    for theirs, ours in TASKS[task]["sources"][name].items():
        n_ref, n_moved = int((mapped == ours).sum()), int((moved_arr == ours).sum())
        if n_ref == 0 or n_moved != n_ref:
            raise RuntimeError(f"{ref_rel}: value {theirs} has {n_ref} voxels, {n_moved} after the move onto {scan_rel}'s grid; refusing it.")
        voxels[TASKS[task]["labels"][ours]] = n_ref
    arr = sitk.GetArrayViewFromImage(scan)
    if arr.min() < -32768 or arr.max() > 32767 or not np.array_equal(arr, np.round(arr)):
        raise RuntimeError(f"{scan_rel}: values {arr.min()}..{arr.max()} do not fit int16 HU.")
    image, label = out / f"{name}.nii.gz", out / f"{name}_{task}.nii.gz"
    sitk.WriteImage(sitk.Cast(scan, sitk.sitkInt16), str(image), useCompression=True)
    sitk.WriteImage(moved, str(label), useCompression=True)
    return {"image": str(image), "label": str(label), "voxels": voxels, "size": list(scan.GetSize()),
            "spacing_mm": [round(s, 4) for s in scan.GetSpacing()]}  # fmt: skip


def prepare(cache: Path, task: str, holdout: str) -> Path:
    """The task's dataset under ``cache/<task>/``: the NIfTI pairs and a ``dataset.json`` whose
    ``training`` are the task's other sources and whose ``test`` (with its label) is ``holdout``."""
    names = list(TASKS[task]["sources"])
    data = cache / task
    data.mkdir(parents=True, exist_ok=True)
    sources_json = data / "sources.json"
    if not sources_json.is_file():
        with tempfile.TemporaryDirectory(prefix="volseg_real_") as tmp:
            ref_dir = _extract(fetch(cache), Path(tmp))
            sources = {name: prepare_source(ref_dir, name, task, data) for name in names}
        sources_json.write_text(json.dumps(sources, indent=2), encoding="utf-8")
    sources = json.loads(sources_json.read_text(encoding="utf-8"))
    entry = lambda n: {"image": sources[n]["image"], "label": sources[n]["label"]}  # noqa: E731
    manifest = {
        "name": f"{task}-holdout-{holdout}", "description": f"{task} on real CT from {SDIST}; test = {holdout}",
        "modality": {"0": "CT"}, "labels": {"0": "background", **{str(v): n for v, n in TASKS[task]["labels"].items()}},
        "training": [entry(n) for n in names if n != holdout], "test": [entry(holdout)],
    }  # fmt: skip
    path = data / f"dataset_holdout_{holdout}.json"
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    for name, s in sources.items():
        role = "test " if name == holdout else "train"
        print(f"  {role} {name:8s} {s['size']} at {s['spacing_mm']} mm, voxels {s['voxels']}", flush=True)
    return path


def plan(manifest: Path, work: Path, memory_gb: float, sets: Sequence[str], device: str = "cpu"):
    """volseg's planned config for the training sources (``volseg plan MANIFEST --memory``)
    with ``sets`` on top; the commented YAML is kept in ``work``."""
    from volseg.data.manifest import load_manifest
    from volseg.planning import plan_manifest

    return plan_manifest(load_manifest(manifest), work / "planned_config.yaml", memory_gb=memory_gb, device=device, overrides=list(sets))


# --------------------------------------------------------------------------- the two pipelines (in workers)


def _run_volseg(job: dict) -> dict:
    """Train with volseg's engine on the planned config, segment the held-out scan."""
    import logging

    from volseg.config import from_dict
    from volseg.data.io import read_image, write_label_like
    from volseg.inference import Predictor
    from volseg.training import train

    logging.getLogger("volseg").setLevel(logging.ERROR)
    out = Path(job["out_dir"])
    t0 = time.perf_counter()
    run = train(job["manifest"], from_dict(job["config"]), out / "run", device=job["device"])
    t1 = time.perf_counter()
    pred = Predictor.from_run(run, device=job["device"])
    images = [read_image(job["test_image"])]
    labels = pred.predict(images, source=job["test_image"])["labels"]
    prediction = write_label_like(labels.astype("uint8"), job["test_image"], images[0], out / "pred_seg.nii.gz")
    return {"train_s": t1 - t0, "infer_s": time.perf_counter() - t1, "prediction": str(prediction)}


def _tutorial_transforms(spacing, patch, num_samples: Optional[int]):
    """The spleen tutorial's chain; the random crop only when ``num_samples`` is given."""
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

    keys = ["image", "label"] if num_samples else ["image"]
    chain = [
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
        ScaleIntensityRanged(keys=["image"], a_min=TUTORIAL_HU[0], a_max=TUTORIAL_HU[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image"),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=spacing, mode=("bilinear", "nearest")[: len(keys)]),
    ]
    if num_samples:  # the pad: the `dicom` scan is 9 voxels deep at 4.5 mm, the tutorial's scans never are
        chain.append(SpatialPadd(keys=keys, spatial_size=patch))
        chain.append(RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=1, neg=1, num_samples=num_samples,
                                            image_key="image", image_threshold=0))  # fmt: skip
    return Compose(chain)


def tutorial_patch(patch: Sequence[int]) -> List[int]:
    """volseg's planned patch rounded up to a multiple of 16: the tutorial UNet's four stride-2
    levels need it (a little more context for the baseline, never less)."""
    return [-(-int(p) // 16) * 16 for p in patch]


def _tutorial_model(classes: int):
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=classes, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm=Norm.BATCH)


def _tutorial_train(job: dict, spacing, patch):
    """The tutorial's training loop, stopped after ``job["steps"]`` optimiser steps."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed=job["seed"])
    # one scan per step, `batch` patches of it: the patches per step of volseg's plan
    ds = CacheDataset(job["files"], _tutorial_transforms(spacing, patch, job["batch"]), cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(ds, batch_size=1, shuffle=True, num_workers=0)
    dev = torch.device(job["device"])
    model = _tutorial_model(job["classes"]).to(dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    model.train()
    step = 0
    while step < job["steps"]:
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(model(batch["image"].to(dev)), batch["label"].to(dev))
            loss.backward()
            opt.step()
            step += 1
            if step == job["steps"]:
                break
    return model


def _run_monai(job: dict) -> dict:
    """Train the tutorial pipeline, segment the held-out scan, invert onto its grid, save."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import AsDiscreted, Compose, Invertd, SaveImaged

    spacing, patch = job["config"]["data"]["spacing"], tutorial_patch(job["config"]["data"]["patch_size"])
    out = Path(job["out_dir"])
    t0 = time.perf_counter()
    model = _tutorial_train(job, spacing, patch)
    t1 = time.perf_counter()
    pre = _tutorial_transforms(spacing, patch, None)
    post = Compose([Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
                    AsDiscreted(keys="pred", argmax=True),
                    SaveImaged(keys="pred", output_dir=str(out), output_postfix="seg", output_dtype=np.uint8, resample=False,
                               separate_folder=False, print_log=False)])  # fmt: skip
    data = pre({"image": job["test_image"]})
    model.eval()
    with torch.no_grad():
        data["pred"] = sliding_window_inference(data["image"][None].to(job["device"]), patch, 4, model)[0].cpu()
    post(data)
    (prediction,) = out.glob("*_seg.nii.gz")
    return {"train_s": t1 - t0, "infer_s": time.perf_counter() - t1, "prediction": str(prediction)}


def _worker(side: str, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    result = (_run_volseg if side == "volseg" else _run_monai)(job)
    result["dice_per_label"] = dice(result["prediction"], job["test_label"], job["labels"])
    result["dice"] = statistics.mean(result["dice_per_label"].values())
    print("RESULT " + json.dumps(result), flush=True)


def dice(prediction: str, reference: str, labels: Dict[str, str]) -> Dict[str, float]:
    """Dice per structure on the held-out scan's own grid, by ``volseg.evaluation.evaluate``
    (which refuses a prediction whose grid differs from the reference's)."""
    from volseg.evaluation import evaluate

    rows = evaluate(prediction, reference, labels={0: "background", **{int(v): n for v, n in labels.items()}}).rows
    return {row["class"]: float(row["dice"]) for row in rows}


# --------------------------------------------------------------------------- parent


def _spawn(side: str, job: dict, timeout: Optional[float]) -> dict:
    """One run in a fresh process; its ``RESULT`` line, or ``{"error": ...}``."""
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True)
    job_path = out_dir / "job.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, __file__, "--_worker", side, str(job_path)], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after --timeout {timeout:g} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit status {done.returncode}\n" + "\n".join(done.stderr.strip().splitlines()[-15:])}
    return json.loads(lines[-1][len("RESULT ") :])


def _jobs(manifest: Path, cfg, args, work: Path, steps: int, seed: int) -> Dict[str, dict]:
    from volseg.config import replace, to_dict
    from volseg.data.manifest import load_manifest

    man = load_manifest(manifest)
    epochs, per_epoch = (steps // STEPS_PER_EPOCH, STEPS_PER_EPOCH) if steps % STEPS_PER_EPOCH == 0 else (1, steps)
    cfg = replace(cfg, train={"epochs": epochs, "steps_per_epoch": per_epoch, "seed": seed}, data={"val_fraction": 0.0, "min_cases": 1})
    (test,) = man.test
    common = {"manifest": str(manifest), "config": to_dict(cfg), "test_image": str(test.images[0]), "test_label": str(test.label),
              "files": [{"image": str(c.images[0]), "label": str(c.label)} for c in man.training], "steps": steps, "seed": seed,
              "batch": cfg.train.batch_size, "threads": args.threads, "device": args.device,
              "labels": {str(v): n for v, n in man.labels.items() if v != 0}, "classes": len(man.labels)}  # fmt: skip
    return {side: dict(common, out_dir=str(work / f"{side}_{steps}_seed{seed}")) for side in SIDES}


def measure(manifest: Path, cfg, args, work: Path) -> Dict[int, Dict[str, List[dict]]]:
    """``{steps: {side: [one result per seed]}}``; sides alternate which goes first."""
    results: Dict[int, Dict[str, List[dict]]] = {}
    for steps in args.steps:
        results[steps] = {side: [] for side in args.sides}
        for i, seed in enumerate(args.seeds):
            jobs = _jobs(manifest, cfg, args, work, steps, seed)
            for side in args.sides if i % 2 == 0 else args.sides[::-1]:
                r = dict(_spawn(side, jobs[side], args.timeout), seed=seed)
                results[steps][side].append(r)
                if "error" in r:
                    print(f"  {steps} steps, seed {seed}, {side}: {r['error']}", file=sys.stderr, flush=True)
                else:
                    print(f"  {steps} steps, seed {seed}, {side:6s}: Dice {r['dice']:.3f}, train {r['train_s']:.0f} s, "
                          f"infer {r['infer_s']:.1f} s", flush=True)  # fmt: skip
    return results


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def report(results: Dict[int, Dict[str, List[dict]]]) -> str:
    """The table (one row per training length and side) and what it says about the goals."""
    lines = ["| steps | pipeline | Dice per seed | Dice mean ± sd | train s (mean) | infer s (mean) |", "|---:|---|---|---|---:|---:|"]
    for steps, sides in results.items():
        for side, runs in sides.items():
            ok = [r for r in runs if "error" not in r]
            per_seed = ", ".join(f"{r['dice']:.3f}" if "error" not in r else "failed" for r in runs)
            mean = lambda k, ok=ok: f"{statistics.mean(r[k] for r in ok):.0f}" if ok else "-"  # noqa: E731
            lines.append(f"| {steps} | {side} | {per_seed} | {_mean_sd([r['dice'] for r in ok])} | {mean('train_s')} | {mean('infer_s')} |")
    lines.append("")
    for steps, sides in results.items():  # per structure, when the task has several
        for side, runs in sides.items():
            ok = [r["dice_per_label"] for r in runs if "error" not in r]
            if ok and len(ok[0]) > 1:
                lines.append(f"{steps} steps, {side}: mean Dice per structure " + ", ".join(f"{k} {statistics.mean(d[k] for d in ok):.3f}" for k in ok[0]))
    for steps, sides in results.items():
        pairs = [(v, m) for v, m in zip(sides.get("volseg", []), sides.get("monai", [])) if "error" not in v and "error" not in m]
        margins = ", ".join(f"{v['dice'] - m['dice']:+.3f}" for v, m in pairs)
        ahead = pairs and len(pairs) == len(sides["volseg"]) == len(sides["monai"]) and all(v["dice"] > m["dice"] for v, m in pairs)
        best = max([r["dice"] for runs in sides.values() for r in runs if "error" not in r] or [0.0])
        idle = f" (but no run reaches Dice {LEARNED}: neither segments the task yet, so this says nothing)" if best < LEARNED else ""
        lines.append(f"{steps} steps: volseg - monai Dice per seed: {margins or '-'}; volseg ahead on every seed: {'yes' if ahead else 'no'}{idle}")
    lengths = sorted(results)
    for side in sorted(results[lengths[0]], key=SIDES.index) if len(lengths) > 1 else ():
        means = [statistics.mean([r["dice"] for r in results[n][side] if "error" not in r] or [float("nan")]) for n in lengths]
        trend = " -> ".join(f"{m:.3f} ({n})" for m, n in zip(means, lengths))
        lines.append(f"{side}: mean Dice by training steps {trend}; no worse with longer training: {'yes' if means[-1] >= means[0] else 'no'}")
    return "\n".join(lines)


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "volseg-bench", help="download and data folder (default ~/.cache/volseg-bench)")
    p.add_argument("--task", choices=sorted(TASKS), default="aorta",
                   help="aorta (3 sources) or organs (liver, spleen, stomach, aorta; the sources example and dicom); default aorta")
    p.add_argument("--holdout", choices=sorted(SOURCES), nargs="+", default=["dicom"],
                   help="the source(s) held out for testing, one experiment each (default dicom)")
    p.add_argument("--steps", type=int, nargs="+", default=[150, 600],
                   help="training lengths in optimiser steps, each a fresh run (default 150 600)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--memory", type=float, default=0.5,
                   help="volseg planner's memory budget in GB (`volseg plan --memory`; default 0.5: a CPU-sized patch)")
    p.add_argument("--spacing", type=float, default=4.5, help="isotropic spacing in mm for both sides, planned at (default 4.5: "
                   "the planned median, 2.25 mm, is too slow on a CPU); 0 keeps the plan's")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override on volseg's planned config, repeatable; "
                   "data.spacing and data.patch_size also reach the MONAI side")  # fmt: skip
    p.add_argument("--sides", choices=SIDES, nargs="+", default=list(SIDES), help="pipelines to run (default both)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both pipelines train and infer (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice; 1 on a shared machine)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 and 8 steps, seed 0, patch 32^3")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = [4, 8], [0]
        args.set = ["data.patch_size=[32,32,32]"] + args.set
    wrong = sorted(set(args.holdout) - set(TASKS[args.task]["sources"]))
    if wrong:
        p.error(f"--holdout {' '.join(wrong)}: the {args.task} task's sources are {', '.join(TASKS[args.task]['sources'])}")
    if min(args.steps) < 1 or args.spacing < 0:
        p.error(f"--steps {args.steps}: every length must be >= 1; --spacing {args.spacing} must be >= 0 mm")
    if args.spacing:
        args.set = [f"data.spacing=[{args.spacing},{args.spacing},{args.spacing}]"] + args.set
    return args


def experiment(holdout: str, args: argparse.Namespace) -> Dict[int, Dict[str, List[dict]]]:
    """Plan on the other sources, run every length x seed x pipeline, print the report."""
    print(f"data: {args.task} on real CT, {SDIST}, held out: {holdout}", flush=True)
    manifest = prepare(args.cache, args.task, holdout)
    with tempfile.TemporaryDirectory(prefix="volseg_bench_real_") as tmp:
        cfg = plan(manifest, Path(tmp), args.memory, args.set, args.device)
        print(f"plan (--memory {args.memory:g}{', ' + ' '.join(args.set) if args.set else ''}): spacing {list(cfg.data.spacing)} mm, "
              f"patch {list(cfg.data.patch_size)} (MONAI side {tutorial_patch(cfg.data.patch_size)}), batch {cfg.train.batch_size}, "
              f"features {list(cfg.model.features)}, pooling {cfg.model.pooling or 'x2 on every axis'}; steps {args.steps}, seeds {args.seeds}, threads {args.threads or 'default'}", flush=True)  # fmt: skip
        t0 = time.perf_counter()
        results = measure(manifest, cfg, args, Path(tmp))
    print(f"\nheld out: {holdout}\n{report(results)}\n(all runs: {(time.perf_counter() - t0) / 60:.1f} min)\n", flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    if args._worker:
        _worker(*args._worker)
        return 0
    results = {holdout: experiment(holdout, args) for holdout in args.holdout}
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items() if k != "_worker"}, "results": results}, indent=2), encoding="utf-8")
    return 0 if all("error" not in r for res in results.values() for sides in res.values() for runs in sides.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
