"""nnU-Net v2 model folders: ``nnUNetv2_predict_from_modelfolder`` vs ``volseg infer``, each a
whole process, on the same folder and the same scans.

The model folder is real nnU-Net: a synthetic dataset in nnU-Net's raw format (scans of the
benchmark's size, ``--labels`` foreground labels) is fingerprinted and planned by nnU-Net itself
(``nnUNetv2_extract_fingerprint``, ``nnUNetv2_plan_experiment``, 3d_fullres); the checkpoint
holds random weights of the planned network (speed and memory do not depend on training; the
masks still differ voxel by voxel, which the agreement column checks). ``--width`` scales the
planned features per stage (1.0: nnU-Net's own 32..320 network; the CPU default 0.25 keeps a
run to minutes, and leaves the pipeline around the network a larger share of the time).

Each row is a fresh process; the rows alternate ``--repeat`` times (order flipped every repeat).
Wall time is the whole command, imports and model loading included. Peak RSS and PSS are the peaks of
the summed RSS and PSS of the process and all its children (nnU-Net spawns preprocessing and
export workers, each with torch loaded: RSS counts their shared pages once per process, PSS
splits them), sampled every 20 ms (PSS every 0.4 s: reading it is costly). Agreement: per-label Dice of volseg's masks against nnU-Net's.
nnU-Net runs with its defaults (``-npp 3 -nps 3``) and ``-device cpu`` or ``cuda``.

    python benchmarks/bench_nnunet.py --quick
    python benchmarks/bench_nnunet.py --shape 256 256 100 --labels 2 --repeat 3
    python benchmarks/bench_nnunet.py --shape 512 512 300 --labels 14 --repeat 3 --no-tta-only

nnU-Net comes from the tests' cached virtualenv (``VOLSEG_NNUNET_VENV``, made on first use:
tests/nnunet_reference.py) unless ``--nnunet-python`` names another.

Not measured: GPU runs (on a CPU machine), training, 2d or cascade configurations, several folds
(one fold here), reading DICOM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

DATASET = "Dataset990_Bench"

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import nnunet_reference as ref  # noqa: E402  (the nnU-Net virtualenv, phantoms, nnU-Net's folders)


def make_scan(path: Path, shape_xyz, spacing, n_labels: int, seed: int, label_path: Optional[Path] = None) -> None:
    img, lab = ref.phantom(tuple(shape_xyz[::-1]), "ct", seed, n_labels)
    ref.write(img, path, spacing, np.int16)
    if label_path is not None:
        ref.write(lab, label_path, spacing, np.uint8)


def make_model(root: Path, python: str, shape, spacing, n_labels: int, width: float, n_train: int = 3) -> Path:
    """A planned nnU-Net 3d_fullres folder with a random-weight fold_0 checkpoint."""
    import torch

    from volseg.nets.nnunet import build_nnunet_network

    env = ref.env(root)
    raw = Path(env["nnUNet_raw"]) / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    for i in range(n_train):
        make_scan(raw / "imagesTr" / f"case{i}_0000.nii.gz", shape, spacing, n_labels, i, raw / "labelsTr" / f"case{i}.nii.gz")
    labels = {"background": 0, **{f"label{v}": v for v in range(1, n_labels + 1)}}
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": n_train, "file_ending": ".nii.gz"}))
    did = DATASET[7:10]
    for cmd in ([ref.tool(python, "nnUNetv2_extract_fingerprint"), "-d", did, "-np", "1"], [ref.tool(python, "nnUNetv2_plan_experiment"), "-d", did]):
        subprocess.run(cmd, env=env, check=True, capture_output=True, encoding="utf-8", errors="replace")
    plans = json.loads((Path(env["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["arch_kwargs"]["features_per_stage"] = [max(4, int(round(f * width))) for f in arch["arch_kwargs"]["features_per_stage"]]
    folder = Path(env["nnUNet_results"]) / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text((raw / "dataset.json").read_text())
    (folder / "dataset_fingerprint.json").write_text((Path(env["nnUNet_preprocessed"]) / DATASET / "dataset_fingerprint.json").read_text())
    torch.manual_seed(0)
    net = build_nnunet_network(arch["network_class_name"], arch["arch_kwargs"], 1, n_labels + 1)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 1,
                "init_args": {"configuration": "3d_fullres", "fold": 0}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _tree_kib(pid: int, pss: bool = False) -> int:
    """Summed RSS (or PSS) in KiB of ``pid`` and its descendants. RSS counts a page shared by
    several processes (torch's libraries in nnU-Net's workers) once per process; PSS splits it,
    but reading it walks the page tables (``smaps_rollup``: most of a core at 50 Hz on a 6 GiB
    process), so it is sampled 20x less often."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/{'smaps_rollup' if pss else 'status'}").read_text().splitlines():
                if line.startswith("Pss:" if pss else "VmRSS:"):
                    total += int(line.split()[1])
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(cmd: List[str], env: Dict[str, str]) -> dict:
    """Wall time and the peaks of the summed RSS and PSS of ``cmd`` and its children."""
    peak = [0, 0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")

    def sample():
        n = 0
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_kib(proc.pid))
            if n % 20 == 0:
                peak[1] = max(peak[1], _tree_kib(proc.pid, pss=True))
            n += 1
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{(out + err)[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": peak[0] / 1024, "peak_pss_mib": peak[1] / 1024}


def agreement(a_dir: Path, b_dir: Path, n_labels: int) -> float:
    """The lowest per-label Dice between nnU-Net's masks (``CASE.nii.gz``) and volseg's (``CASE_seg.nii.gz``)."""
    import SimpleITK as sitk

    worst = 1.0
    for a in sorted(a_dir.glob("*.nii.gz")):
        b = b_dir / a.name.replace(".nii.gz", "_seg.nii.gz")
        x, y = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (a, b))
        for v in range(1, n_labels + 1):
            s = (x == v).sum() + (y == v).sum()
            if s:
                worst = min(worst, 2 * ((x == v) & (y == v)).sum() / s)
    return float(worst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nnunet-python", help="python of a virtualenv with nnunetv2 (default: the tests' cached one, made if need be)")
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 100], metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5])
    ap.add_argument("--labels", type=int, default=2)
    ap.add_argument("--scans", type=int, default=2)
    ap.add_argument("--width", type=float, default=0.25, help="times the planned features per stage (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-tta-only", action="store_true", help="skip the TTA rows (8x the network time)")
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    ap.add_argument("--tta-only", action="store_true", help="skip the rows without TTA")
    ap.add_argument("--quick", action="store_true", help="smoke test: 96x96x40, 1 scan, 1 repeat, no TTA")
    a = ap.parse_args()
    if a.nnunet_python is None:
        a.nnunet_python, why = ref.nnunet_python()
        if a.nnunet_python is None:
            sys.exit(why)
    if a.quick:
        a.shape, a.scans, a.repeat, a.no_tta_only = [96, 96, 40], 1, 1, True
    root = Path(tempfile.mkdtemp(prefix="bench_nnunet_"))
    folder = make_model(root, a.nnunet_python, a.shape, a.spacing, a.labels, a.width)
    scans = root / "scans"
    scans.mkdir()
    for i in range(a.scans):
        make_scan(scans / f"test{i}_0000.nii.gz", a.shape, a.spacing, a.labels, 100 + i)
    env = ref.env(root)
    plan = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    print(f"model: {folder}\n  patch {plan['patch_size']}, spacing {plan['spacing']}, features {plan['architecture']['arch_kwargs']['features_per_stage']}")
    print(f"scans: {a.scans} x {a.shape} at {a.spacing} mm, {a.labels} labels; device {a.device}; {a.repeat} repeat(s), alternating")
    results: Dict[str, List[dict]] = {}
    for tta in ([False] if a.no_tta_only else [True] if a.tta_only else [False, True]):
        rows = {
            "nnunet": lambda out, tta=tta: [ref.tool(a.nnunet_python, "nnUNetv2_predict_from_modelfolder"), "-i", str(scans), "-o", str(out), "-m", str(folder),
                                            "-f", "0", "-device", a.device, "--disable_progress_bar", *([] if tta else ["--disable_tta"])],
            "volseg": lambda out, tta=tta: [sys.executable, "-m", "volseg", "infer", str(scans), "--model", str(folder), "--output", str(out),
                                            "--device", a.device, *([] if tta else ["--no-tta"])],
        }
        names = list(rows)
        for r in range(a.repeat):
            for name in names if r % 2 == 0 else names[::-1]:
                out = root / f"{name}_tta{int(tta)}_{r}"
                results.setdefault(f"{name} tta={tta}", []).append(measure(rows[name](out), env))
        dice = agreement(root / f"nnunet_tta{int(tta)}_0", root / f"volseg_tta{int(tta)}_0", a.labels)
        nn_w = statistics.median(x["wall_s"] for x in results[f"nnunet tta={tta}"])
        vs_w = statistics.median(x["wall_s"] for x in results[f"volseg tta={tta}"])
        nn_m, vs_m, nn_p, vs_p = (statistics.median(x[key] for x in results[f"{who} tta={tta}"])
                                  for key in ("peak_rss_mib", "peak_pss_mib") for who in ("nnunet", "volseg"))
        print(f"TTA {'on ' if tta else 'off'}: wall nnU-Net {nn_w:.1f} s, volseg {vs_w:.1f} s -> {vs_w / nn_w:.2f}x; "
              f"peak RSS nnU-Net {nn_m:.0f} MiB, volseg {vs_m:.0f} MiB -> {vs_m / nn_m:.2f}x; "
              f"peak PSS {nn_p:.0f} vs {vs_p:.0f} MiB -> {vs_p / nn_p:.2f}x; lowest per-label Dice {dice:.4f}")
        for k in (f"nnunet tta={tta}", f"volseg tta={tta}"):
            print(f"    {k}: " + ", ".join(f"{x['wall_s']:.1f}s/{x['peak_rss_mib']:.0f}/{x['peak_pss_mib']:.0f}MiB" for x in results[k]))
    if a.json:
        a.json.write_text(json.dumps({"shape": a.shape, "labels": a.labels, "width": a.width, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
