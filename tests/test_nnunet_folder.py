"""nnU-Net v2 model folders without nnunetv2: a folder written here in nnU-Net's format (plans,
dataset, fold checkpoints as nnU-Net's trainer saves them) runs through ``volseg infer``, and
every bad folder ends in one line. Agreement with nnUNetv2_predict itself:
tests/test_nnunet_agreement.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

from volseg.inference.nnunet import NnUNetPredictor, is_nnunet_folder, load_nnunet  # noqa: E402
from volseg.nets.nnunet import build_nnunet_network  # noqa: E402

from .dicom_phantom import phantom, write_series  # noqa: E402

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def _arch(dims: int = 3) -> dict:
    k3 = [[1, 3, 3], [3, 3, 3], [3, 3, 3]] if dims == 3 else [[3, 3]] * 3
    st = [[1, 1, 1], [1, 2, 2], [2, 2, 2]] if dims == 3 else [[1, 1], [2, 2], [2, 2]]
    return {"network_class_name": PLAIN, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": k3,
                            "strides": st, "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}}


def _config(dims: int = 3, spacing=(2.5, 1.0, 1.0)) -> dict:
    res = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [8, 16, 16] if dims == 3 else [16, 16], "median_image_size_in_voxels": [10, 24, 24],
            "spacing": list(spacing) if dims == 3 else list(spacing[1:]), "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": res,
            "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_seg_kwargs": {**res, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {**res, "order": 1},
            "architecture": _arch(dims), "batch_dice": True}


def make_folder(root: Path, configuration: str = "3d_fullres", folds=(0, 1), labels=None, channels=None, seed: int = 0) -> Path:
    """An nnU-Net v2 results folder with random weights, written as nnU-Net's trainer writes it."""
    labels = labels or {"background": 0, "organ": 1, "lesion": 2}
    channels = channels or {"0": "CT"}
    folder = root / "Dataset900_Fake" / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True)
    dims = 2 if configuration == "2d" else 3
    configs = {"2d": _config(2), "3d_fullres": _config(3), "3d_lowres": {**_config(3, (5.0, 2.0, 2.0))}}
    plans = {"dataset_name": "Dataset900_Fake", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [2.5, 1.0, 1.0],
             "original_median_shape_after_transp": [10, 24, 24], "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "configurations": configs, "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {str(c): {"max": 300.0, "mean": 60.0, "median": 60.0, "min": -200.0,
                                                                      "percentile_00_5": -100.0, "percentile_99_5": 250.0, "std": 40.0}
                                                             for c in range(len(channels))}}
    dataset = {"channel_names": channels, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
    if any(isinstance(v, list) for v in labels.values()):
        dataset["regions_class_order"] = list(range(1, len(labels)))
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    heads = len(labels) - 1 if "regions_class_order" in dataset else len(labels)
    for f in folds:
        torch.manual_seed(seed + int(f))
        net = build_nnunet_network(PLAIN, configs[configuration]["architecture"]["arch_kwargs"], len(channels), heads)
        (folder / f"fold_{f}").mkdir()
        ckpt = {"network_weights": net.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)], "train_losses": [np.float64(1.0)]},
                "_best_ema": np.float64(0.5), "current_epoch": 2, "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": configuration, "fold": int(f), "dataset_json": dataset, "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": (0, 1, 2) if dims == 3 else (0, 1)}
        torch.save(ckpt, folder / f"fold_{f}" / "checkpoint_final.pth")
    return folder


def make_scan(path: Path, shape=(24, 28, 10), spacing=(0.9, 0.9, 2.4), dtype=np.int16, direction=None) -> Path:
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[: shape[2], : shape[1], : shape[0]]
    body = ((x - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2) < (min(shape[:2]) / 2.4) ** 2
    arr = np.where(body, 40 + 10 * rng.standard_normal(body.shape), -1000).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 5.0, 30.0))
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _volseg(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "volseg", *map(str, args)], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_folder_is_recognised_and_its_checkpoints_load_safely(tmp_path):
    folder = make_folder(tmp_path)
    assert is_nnunet_folder(folder) and not is_nnunet_folder(tmp_path)
    m = load_nnunet(folder)
    assert m.folds == ("0", "1") and m.configuration_name == "3d_fullres" and m.mirror_axes == (0, 1, 2)
    assert load_nnunet(folder, folds=[1]).folds == ("1",)


def test_infer_writes_the_mask_in_the_scan_geometry_with_and_without_tta(tmp_path):
    folder = make_folder(tmp_path / "res")
    # an LPS-like flipped direction, anisotropic spacing and another spacing than the plans'
    scan = make_scan(tmp_path / "in" / "case1_0000.nii.gz", direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    for flag, out in (("--no-tta", "a"), (None, "b")):
        _volseg("infer", scan, "--model", folder, "--output", tmp_path / out, *([flag] if flag else []))
        mask = sitk.ReadImage(str(tmp_path / out / "case1_seg.nii.gz"))  # nnU-Net's naming: the _0000 suffix goes
        ref = sitk.ReadImage(str(scan))
        assert mask.GetSize() == ref.GetSize()
        np.testing.assert_allclose(mask.GetSpacing(), ref.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(mask.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(mask.GetDirection(), ref.GetDirection(), atol=1e-6)
        arr = sitk.GetArrayFromImage(mask)
        assert set(np.unique(arr)) <= {0, 1, 2}
        side = json.loads((tmp_path / out / "case1_seg.json").read_text())
        assert side["model"]["folds"] == ["0", "1"] and side["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    tta = json.loads((tmp_path / "b" / "case1_seg.json").read_text())["model"]["tta_axes"]
    assert tta == [0, 1, 2] and json.loads((tmp_path / "a" / "case1_seg.json").read_text())["model"]["tta_axes"] == []


def test_tta_averages_the_eight_mirrors_of_each_window(tmp_path):
    import itertools

    folder = make_folder(tmp_path, folds=(0,))
    # a scan whose preprocessed grid (6, 12, 12) fits one padded (8, 16, 16) window
    img = sitk.ReadImage(str(make_scan(tmp_path / "s.nii.gz", shape=(12, 12, 6), spacing=(1.0, 1.0, 2.5))))
    plain = NnUNetPredictor.from_folder(folder, overrides={"tta": False}, device="cpu")
    tta = NnUNetPredictor.from_folder(folder, device="cpu")
    data = plain.prepare([img])["image"]
    assert data.shape == (1, 6, 12, 12)
    a, b = plain.logits(data), tta.logits(data)
    x = torch.nn.functional.pad(torch.from_numpy(data), [2, 2, 2, 2, 1, 1])[None]  # centred, as nnU-Net pads
    flips = [()] + [c for i in range(3) for c in itertools.combinations((2, 3, 4), i + 1)]
    with torch.no_grad():
        by_hand = sum(torch.flip(tta.model(torch.flip(x, f) if f else x), f) if f else tta.model(x) for f in flips) / 8
    torch.testing.assert_close(b, by_hand[0, :, 1:7, 2:14, 2:14], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a, tta.model(x)[0, :, 1:7, 2:14, 2:14].detach(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, b)


def test_channel_files_group_into_cases(tmp_path):
    folder = make_folder(tmp_path / "res", folds=(0,), channels={"0": "T1", "1": "T2"})
    for c in (0, 1):
        make_scan(tmp_path / "in" / f"brain_{c:04d}.nii.gz", dtype=np.float32)
    _volseg("infer", tmp_path / "in", "--model", folder, "--output", tmp_path / "out")
    assert (tmp_path / "out" / "brain_seg.nii.gz").is_file()
    (tmp_path / "in" / "brain_0001.nii.gz").unlink()
    proc = _volseg("infer", tmp_path / "in", "--model", folder, "--output", tmp_path / "out2", check=False)
    assert proc.returncode != 0 and "brain_0001" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("breakage, expected", [
    ("no_plans", "plans.json is missing"),
    ("network", "network_class_name='my.CustomUNet' is not supported"),
    ("fold", "fold(s) ['3'] have no checkpoint_final.pth"),
    ("lowres", "configuration '3d_lowres' is not supported yet"),
    ("architecture", "does not match plans.json's PlainConvUNet"),
    ("pickle", "refused to load"),
    ("reader", "image_reader_writer 'NibabelIOWithReorient' is not supported"),
])
def test_bad_folders_end_in_one_line(tmp_path, breakage, expected):
    folder = make_folder(tmp_path / "res", folds=(0,))
    args = []
    plans = json.loads((folder / "plans.json").read_text())
    if breakage == "no_plans":
        (folder / "plans.json").rename(folder / "plans.json.bak")
    elif breakage == "network":
        plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my.CustomUNet"
    elif breakage == "fold":
        args = ["--folds", "0,3"]
    elif breakage == "lowres":
        ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
        ck["init_args"]["configuration"] = "3d_lowres"
        torch.save(ck, folder / "fold_0" / "checkpoint_final.pth")
    elif breakage == "architecture":
        plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32]
    elif breakage == "pickle":
        ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
        ck["init_args"]["callback"] = Path("/tmp")  # any class outside the allow-list
        torch.save(ck, folder / "fold_0" / "checkpoint_final.pth")
    elif breakage == "reader":
        plans["image_reader_writer"] = "NibabelIOWithReorient"
    (folder / "plans.json").write_text(json.dumps(plans)) if breakage != "no_plans" else None
    scan = make_scan(tmp_path / "s_0000.nii.gz")
    proc = _volseg("infer", scan, "--model", folder, "--output", tmp_path / "out", *args, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_of_an_nnunet_fold_gives_its_softmax_and_preprocessing_record(tmp_path, fmt):
    folder = make_folder(tmp_path, folds=(0, 1))
    proc = _volseg("export", folder, "--format", fmt, check=False)
    assert proc.returncode != 0 and "export one with --fold K" in proc.stderr
    _volseg("export", folder, "--format", fmt, "--fold", "1")
    path = folder / "fold_1" / ("model.ts.pt" if fmt == "torchscript" else "model.onnx")
    meta = json.loads((folder / "fold_1" / "model.json").read_text())
    assert meta["output"]["activation"] == "softmax" and meta["output"]["channels"] == 3
    assert meta["preprocessing"]["configuration"]["patch_size"] == [8, 16, 16] and meta["model"]["folds"] == ["1"]
    x = torch.randn(1, 1, 8, 16, 16)
    pred = NnUNetPredictor.from_folder(folder, folds=[1], overrides={"tta": False}, device="cpu")
    with torch.no_grad():
        want = torch.softmax(pred.model(x), 1).numpy()
    if fmt == "torchscript":
        got = torch.jit.load(str(path))(x).detach().numpy()
    else:
        ort = pytest.importorskip("onnxruntime")
        got = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_dicom_seg_and_statistics_from_an_nnunet_model(tmp_path):
    pytest.importorskip("highdicom")
    folder = make_folder(tmp_path / "res", folds=(0,))
    write_series(phantom("axial")[0], tmp_path / "dicom")
    _volseg("infer", tmp_path / "dicom", "--model", folder, "--output", tmp_path / "out", "--format", "nifti,dicom-seg", "--statistics", "--no-tta")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "dicom_seg.nii.gz")))
    stats = json.loads((tmp_path / "out" / "dicom_stats.json").read_text())
    assert (tmp_path / "out" / "dicom_seg.dcm").is_file()
    for value, name in ((1, "organ"), (2, "lesion")):
        assert stats["labels"][name]["voxels"] == int((mask == value).sum())
