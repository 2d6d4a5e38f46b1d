"""nnU-Net itself, as the reference for the agreement test and the benchmark: a cached
virtualenv with nnunetv2, synthetic datasets in nnU-Net's raw format, planning and a short
training with nnU-Net's own commands.

nnunetv2 2.8.1 needs torch >= 2.14 and torchvision, which would replace the project's torch, so
it lives in its own virtualenv (``VOLSEG_NNUNET_VENV``, default
``~/.cache/volseg/nnunet-2.8.1-venv``), made on first use with the interpreter running the tests
and reused while its marker file is there. The short training is ``nnUNetTrainer_volsegTiny``
(nnU-Net's own trainer, a few short epochs), written into that virtualenv's nnunetv2 package
because nnU-Net finds trainers by class name only there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

NNUNET = "nnunetv2==2.8.1"
REQUIREMENTS = ("torch==2.14.1", "torchvision==0.29.1", NNUNET)
MARKER = ".volseg-ready"

TINY_TRAINER = '''
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_volsegTiny(nnUNetTrainer):
    """volseg's agreement tests: nnU-Net's trainer, a few short epochs."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(__import__("os").environ.get("VOLSEG_TINY_EPOCHS", "4"))
        self.num_iterations_per_epoch = int(__import__("os").environ.get("VOLSEG_TINY_ITERS", "30"))
        self.num_val_iterations_per_epoch = 2

    def perform_actual_validation(self, save_probabilities: bool = False):
        """skipped: the tests predict held-out scans themselves"""
'''


def venv_dir() -> Path:
    return Path(os.environ.get("VOLSEG_NNUNET_VENV", Path.home() / ".cache" / "volseg" / "nnunet-2.8.1-venv"))


def nnunet_python() -> Tuple[Optional[str], str]:
    """The python of a virtualenv with nnunetv2 (made if need be), or ``(None, why not)``."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    if not (venv / MARKER).is_file():
        try:
            if not python.is_file():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True, capture_output=True, encoding="utf-8", errors="replace", timeout=1800)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            tail = (getattr(exc, "stderr", "") or getattr(exc, "stdout", "") or str(exc))[-400:]
            return None, f"could not install {' '.join(REQUIREMENTS)} into {venv}: {tail}"
        (venv / MARKER).write_text(" ".join(REQUIREMENTS) + "\n")
    found = subprocess.run([str(python), "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"], capture_output=True, encoding="utf-8", errors="replace")
    if found.returncode != 0:
        return None, f"{venv} has no importable nnunetv2 ({found.stderr.strip()[-300:]}); delete it to rebuild"
    trainer = Path(found.stdout.strip()) / "training" / "nnUNetTrainer" / "nnUNetTrainer_volsegTiny.py"
    if not trainer.is_file() or trainer.read_text() != TINY_TRAINER:
        trainer.write_text(TINY_TRAINER)
    return str(python), ""


def env(root: Path) -> Dict[str, str]:
    """nnU-Net's three folders under ``root``, no torch.compile (training also runs its
    augmentation in the main process: ``nnUNet_n_proc_DA=0``)."""
    e = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"), nnUNet_compile="f")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(e[k]).mkdir(parents=True, exist_ok=True)
    return e


def tool(python: str, name: str) -> str:
    return str(Path(python).parent / name)


# -- synthetic scans ---------------------------------------------------------------------------
def phantom(shape_zyx: Sequence[int], kind: str, seed: int, n_labels: int = 2) -> Tuple[np.ndarray, np.ndarray]:
    """``(image, labels)`` as ``[z, y, x]`` arrays: a body with ``n_labels`` ellipsoids side by
    side, each its own brightness. ``kind``: ``"ct"`` (HU, air at -1000), ``"mr"`` (arbitrary scale, exact zeros
    outside the body, as skull-stripped MR).
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    s = [float(v) for v in shape_zyx]
    margin = 0.30 if kind == "mr" else 0.45
    body = ((y - s[1] / 2) / (margin * s[1])) ** 2 + ((x - s[2] / 2) / (margin * s[2])) ** 2 <= 1
    if kind == "mr":
        body = body & (np.abs(z - s[0] / 2) <= 0.35 * s[0])
    lab = np.zeros(shape_zyx, np.uint8)
    for v in range(1, n_labels + 1):
        c = [rng.uniform(0.45, 0.55) * s[0], rng.uniform(0.4, 0.6) * s[1], (0.3 + 0.4 * (v - 1) / max(1, n_labels - 1)) * s[2]]
        r = [rng.uniform(0.25, 0.35) * s[0], rng.uniform(0.12, 0.18) * s[1], rng.uniform(0.1, 0.14) * s[2]]
        lab[(((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1) & body] = v
    if kind == "ct":
        img = np.where(body, 40.0, -1000.0) + np.array([0.0, 80.0, 200.0, *(20.0 + 40.0 * v for v in range(3, n_labels + 1))][: n_labels + 1])[lab] + rng.normal(0, 12, shape_zyx)
    else:
        img = np.where(body, 300.0 + 200.0 * lab + rng.normal(0, 20, shape_zyx), 0.0)
    return img, lab


def write(arr: np.ndarray, path: Path, spacing_xyz: Sequence[float], dtype, direction: Optional[Sequence[float]] = None, origin=None) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr.astype(dtype))
    img.SetSpacing(tuple(float(v) for v in spacing_xyz))
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in direction))
    if origin is not None:
        img.SetOrigin(tuple(float(v) for v in origin))
    sitk.WriteImage(img, str(path), True)


def make_dataset(root: Path, dataset: str, kind: str, n_train: int = 5, shape_zyx=(20, 56, 56), spacing_xyz=(0.9, 0.9, 2.5),
                 regions: bool = False) -> Path:
    """A raw dataset ``root/raw/<dataset>`` (``imagesTr``, ``labelsTr``, ``dataset.json``)."""
    raw = root / "raw" / dataset
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(exist_ok=True)
    for i in range(n_train):
        img, lab = phantom(shape_zyx, kind, i)
        sp = (spacing_xyz[0] * (1 + 0.05 * (i % 3)), spacing_xyz[1] * (1 + 0.05 * (i % 3)), spacing_xyz[2])
        write(img, raw / "imagesTr" / f"case{i:02d}_0000.nii.gz", sp, np.int16 if kind == "ct" else np.float32)
        write(lab, raw / "labelsTr" / f"case{i:02d}.nii.gz", sp, np.uint8)
    if regions:
        labels: Dict[str, object] = {"background": 0, "whole": [1, 2], "core": 2}
        extra = {"regions_class_order": [1, 2]}
    else:
        labels, extra = {"background": 0, "organ": 1, "lesion": 2}, {}
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT" if kind == "ct" else "T1"}, "labels": labels,
                                                  "numTraining": n_train, "file_ending": ".nii.gz", **extra}, indent=1))
    return raw


def plan_and_train(python: str, root: Path, dataset_id: int, configurations: Sequence[str], folds: Dict[str, Sequence[int]],
                   width: Optional[Dict[str, float]] = None) -> Dict[str, Path]:
    """``nnUNetv2_plan_and_preprocess`` then ``nnUNetv2_train ... -tr nnUNetTrainer_volsegTiny``
    on the CPU, for ``folds[configuration]``; the trained model folder of each configuration.
    ``width[configuration]`` scales the planned features per stage (to train in seconds on a
    CPU; the network class, depth, kernels and strides stay nnU-Net's)."""
    e = env(root)
    run(python, ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations, "-np", "1", "--verify_dataset_integrity"], e)
    plans_file = next((root / "pre").glob(f"Dataset{dataset_id:03d}_*")) / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    for c, w in (width or {}).items():
        kw = plans["configurations"][c]["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [max(4, int(round(f * w))) for f in kw["features_per_stage"]]
    plans_file.write_text(json.dumps(plans, indent=1))
    out = {}
    for c in configurations:
        for f in folds[c]:
            run(python, ["nnUNetv2_train", str(dataset_id), c, str(f), "-tr", "nnUNetTrainer_volsegTiny", "-device", "cpu"], dict(e, nnUNet_n_proc_DA="0"))
        out[c] = next((root / "res").glob(f"Dataset{dataset_id:03d}_*")) / f"nnUNetTrainer_volsegTiny__nnUNetPlans__{c}"
    return out


def predict(python: str, root: Path, model: Path, inputs: Path, output: Path, folds: Sequence[int], tta: bool, probabilities: bool = False) -> None:
    """``nnUNetv2_predict_from_modelfolder``; with ``probabilities``, ``CASE.npz`` beside each mask
    holds nnU-Net's own probabilities (``[K, z, y, x]``)."""
    run(python, ["nnUNetv2_predict_from_modelfolder", "-i", str(inputs), "-o", str(output), "-m", str(model), "-f", *map(str, folds),
                 "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar", *([] if tta else ["--disable_tta"]),
                 *(["--save_probabilities"] if probabilities else [])], env(root))


def run(python: str, cmd: Sequence[str], e: Dict[str, str]) -> None:
    done = subprocess.run([tool(python, cmd[0]), *cmd[1:]], env=e, capture_output=True, encoding="utf-8", errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


NETWORK_SCRIPT = """
import json, sys
import numpy as np, torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

folder, config, fold, inp, out = sys.argv[1:]
pm = PlansManager(json.load(open(folder + "/plans.json")))
dataset = json.load(open(folder + "/dataset.json"))
cm = pm.get_configuration(config)
net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
                             len(dataset["channel_names"]), pm.get_label_manager(dataset).num_segmentation_heads, deep_supervision=False)
net.load_state_dict(torch.load(f"{folder}/fold_{fold}/checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"])
with torch.no_grad():
    np.save(out, net.eval()(torch.from_numpy(np.load(inp))).numpy())
"""


def reference_logits(python: str, folder: Path, config: str, fold: int, x: np.ndarray, work: Path) -> np.ndarray:
    """The network output of ``fold`` of ``folder`` for ``x``, built by nnU-Net's own
    ``get_network_from_plans`` (dynamic-network-architectures)."""
    np.save(work / "x.npy", x)
    done = subprocess.run([python, "-c", NETWORK_SCRIPT, str(folder), config, str(fold), str(work / "x.npy"), str(work / "y.npy")],
                          capture_output=True, encoding="utf-8", errors="replace")
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return np.load(work / "y.npy")


RESAMPLE_SCRIPT = """
import json, sys
import numpy as np
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

inp, out, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
np.save(out, resample_data_or_seg_to_shape(np.load(inp), args["shape"], args["current"], args["new"], False, args["order"], 0,
                                           force_separate_z=args["force"]))
"""


def reference_resample(python: str, data: np.ndarray, shape, current, new, order: int, force, work: Path) -> np.ndarray:
    """nnU-Net's own ``resample_data_or_seg_to_shape`` of ``(C, *spatial)`` data."""
    np.save(work / "r_in.npy", data)
    args = json.dumps({"shape": list(shape), "current": list(current), "new": list(new), "order": order, "force": force})
    done = subprocess.run([python, "-c", RESAMPLE_SCRIPT, str(work / "r_in.npy"), str(work / "r_out.npy"), args], capture_output=True, encoding="utf-8", errors="replace")
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return np.load(work / "r_out.npy")
