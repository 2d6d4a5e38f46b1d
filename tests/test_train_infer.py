"""Training (3D, 2D slice mode, resume after SIGKILL), inference geometry, CLI, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from volseg.cli import main
from volseg.data.io import read_image, write_image
from volseg.data.synth import make_case

from .conftest import TINY, write_dicom_series


def _rows(run: Path):
    lines = (run / "metrics.csv").read_text(encoding="utf-8").strip().splitlines()
    return [dict(zip(lines[0].split(","), ln.split(","))) for ln in lines[1:]]


def test_run_folder_describes_itself(tiny_run):
    for name in ("config.yaml", "plan.json", "versions.json", "dataset.json", "last.pt", "best.pt", "metrics.csv", "train.log"):
        assert (tiny_run / name).is_file(), name
    rows = _rows(tiny_run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0.0 <= float(r["val_dice_mean"]) <= 1.0 for r in rows)
    assert {"val_dice_liver", "val_dice_kidney", "val_dice_lesion"} <= set(rows[0])

    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["model"]["in_channels"] == 1 and cfg["model"]["out_channels"] == 4
    plan = json.loads((tiny_run / "plan.json").read_text(encoding="utf-8"))
    assert plan["label_values"] == [0, 1, 2, 3] and plan["norms"][0]["scheme"] == "ct"
    assert set(json.loads((tiny_run / "versions.json").read_text(encoding="utf-8"))) >= {"volseg", "torch", "monai"}
    assert list((tiny_run / "tb").iterdir())


def test_refuses_to_overwrite_a_run(tiny_run, tiny_dataset, capsys):
    code = main(["train", str(tiny_dataset), "--output", str(tiny_run)] + sum((["--set", s] for s in TINY), []))
    assert code == 2 and "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_sigkill(tiny_dataset, tmp_path):
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "volseg.cli", "-q", "train", str(tiny_dataset), "--output", str(run), "--device", "cpu"]
    sets = sum((["--set", s] for s in TINY + ["train.epochs=4", "train.steps_per_epoch=3"]), [])
    proc = subprocess.Popen(args + sets, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").exists() and len(_rows(run)) >= 1 and (run / "last.pt").exists():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _rows(run)
    assert 1 <= len(done) < 4, "the run finished before it could be killed"
    first = done[0]
    assert main(["-q", "train", str(tiny_dataset), "--output", str(run), "--resume", "--device", "cpu"]) == 0
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0] == first  # completed epochs are kept, not redone
    assert not [p for p in run.iterdir() if p.name.startswith(".") and "tmp" in p.name]


def test_slice_mode_2d_trains_and_infers(tiny_dataset, tmp_path):
    run = tmp_path / "run2d"
    sets = [s for s in TINY if not s.startswith("data.patch_size")] + ["model.spatial_dims=2", "data.patch_size=[24,24]"]
    assert main(["-q", "train", str(tiny_dataset), "--output", str(run), "--device", "cpu"] + sum((["--set", s] for s in sets), [])) == 0
    assert len(_rows(run)) == 2
    out = tmp_path / "pred2d"
    assert main(["-q", "infer", str(tiny_dataset), "--model", str(run), "--output", str(out)]) == 0
    from volseg.data.manifest import load_manifest

    for case in load_manifest(tiny_dataset).test:
        ref, seg = sitk.ReadImage(str(case.images[0])), sitk.ReadImage(str(out / f"{case.name}_seg.nii.gz"))
        assert seg.GetSize() == ref.GetSize()


SCANS = [
    # name, orientation, spacing, dtype, suffix
    ("lps_iso", "LPS", (1.5, 1.5, 1.5), np.int16, ".nii.gz"),
    ("ras_aniso", "RAS", (0.9, 0.8, 3.1), np.int16, ".nii.gz"),
    ("oblique_float", "oblique", (1.3, 1.2, 2.2), np.float32, ".nii.gz"),
    ("las_nrrd", "LAS", (1.4, 1.4, 2.0), np.int16, ".nrrd"),
    ("lps_mha", "LPS", (1.2, 1.5, 1.8), np.float32, ".mha"),
]


def _write_scan(folder: Path, name, orientation, spacing, dtype, suffix, seed=11):
    from volseg.data import synth

    orient = orientation if orientation in synth.ORIENTATIONS else synth.ORIENTATIONS[-1]
    image, label = make_case(seed, "ct", (33, 30, 23), spacing, orientation=orient)
    if orientation == "LAS":  # flip the first axis of an LPS scan: direction diag(1,-1,1) in LPS terms
        image = sitk.Flip(image, [True, False, False], flipAboutOrigin=False)
        label = sitk.Flip(label, [True, False, False], flipAboutOrigin=False)
    image = sitk.Cast(image, sitk.sitkInt16 if dtype == np.int16 else sitk.sitkFloat32)
    path = folder / f"{name}{suffix}"
    write_image(image, path)
    return path, label


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    return folder, {s[0]: _write_scan(folder, *s) for s in SCANS}


def test_infer_returns_each_scan_in_its_own_geometry(tiny_run, scans, tmp_path):
    folder, written = scans
    out = tmp_path / "out"
    assert main(["-q", "infer", str(folder), "--model", str(tiny_run), "--output", str(out), "--device", "cpu"]) == 0
    for name, (path, _) in written.items():
        seg_path = out / f"{name}_seg.nii.gz"
        ref, seg = sitk.ReadImage(str(path)), sitk.ReadImage(str(seg_path))
        assert seg.GetSize() == ref.GetSize(), name
        assert np.allclose(seg.GetSpacing(), ref.GetSpacing(), atol=1e-5), name
        assert np.allclose(seg.GetOrigin(), ref.GetOrigin(), atol=1e-4), name
        assert np.allclose(seg.GetDirection(), ref.GetDirection(), atol=1e-5), name
        assert seg.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(seg))) <= {0, 1, 2, 3}
        side = json.loads((out / f"{name}_seg.json").read_text(encoding="utf-8"))
        assert side["model"]["checkpoint"] in ("best.pt", "last.pt") and "versions" in side and side["timing_s"]["total_s"] > 0
        if path.name.endswith(".nii.gz"):  # nibabel: same affine, shape and header codes
            a, b = nib.load(str(path)), nib.load(str(seg_path))
            assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-5)
            assert int(a.header["qform_code"]) == int(b.header["qform_code"])
            assert int(a.header["sform_code"]) == int(b.header["sform_code"])
            assert np.allclose(a.header.get_qform(), b.header.get_qform(), atol=1e-5)
            assert b.get_data_dtype() == np.uint8


def test_infer_4d_singleton_and_default_output_location(tiny_run, tmp_path):
    image, _ = make_case(5, "ct", (30, 30, 20))
    path = tmp_path / "four_d.nii.gz"
    write_image(image, tmp_path / "three_d.nii.gz")
    img3 = nib.load(str(tmp_path / "three_d.nii.gz"))
    data = np.asarray(img3.dataobj)[..., None]
    nib.save(nib.Nifti1Image(data, img3.affine, img3.header), str(path))
    assert nib.load(str(path)).shape[-1] == 1
    assert main(["-q", "infer", str(path), "--model", str(tiny_run), "--probabilities"]) == 0
    seg = nib.load(str(tmp_path / "four_d_seg.nii.gz"))
    assert seg.shape == img3.shape and np.allclose(seg.affine, img3.affine, atol=1e-5)
    prob = nib.load(str(tmp_path / "four_d_prob.nii.gz"))
    assert prob.shape == img3.shape + (4,)
    p = prob.get_fdata()
    assert p.min() >= 0 and p.max() <= 1.0 + 1e-6 and np.allclose(p.sum(-1), 1.0, atol=0.05)


def test_batch_goes_on_after_bad_inputs(tiny_run, tmp_path, capsys):
    good, _ = make_case(2, "ct", (30, 30, 20))
    write_image(good, tmp_path / "good.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image at all")
    flat = sitk.GetImageFromArray(np.zeros((20, 20), np.int16))
    write_image(flat, tmp_path / "flat.nii.gz")
    code = main(["-q", "infer", str(tmp_path / "broken.nii.gz"), str(tmp_path / "flat.nii.gz"), str(tmp_path / "good.nii.gz"), "--model", str(tiny_run)])
    err = capsys.readouterr().err
    assert code == 1
    assert (tmp_path / "good_seg.nii.gz").is_file()
    assert not (tmp_path / "broken_seg.nii.gz").exists() and not (tmp_path / "flat_seg.nii.gz").exists()
    assert "broken" in err and "flat" in err and "2 dimensions" in err
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_infer_missing_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.nii.gz").write_bytes(b"")
    assert main(["infer", str(tmp_path / "x.nii.gz"), "--model", str(tmp_path / "nope")]) == 2
    assert "not a complete volseg run folder" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch(tiny_run, tmp_path, fmt):
    import torch

    from volseg.inference import Predictor

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    out = tmp_path / ("m.pt" if fmt == "torchscript" else "m.onnx")
    assert main(["-q", "export", str(tiny_run), "--format", fmt, "--output", str(out)]) == 0
    meta = json.loads(out.with_name("m.json").read_text(encoding="utf-8"))
    assert meta["preprocessing"]["spacing"] and meta["output"]["activation"] == "softmax"
    pred = Predictor.from_run(tiny_run, device="cpu")
    x = torch.randn(2, 1, *pred.plan.patch_size)
    with torch.no_grad():
        ref = torch.softmax(pred.model(x), 1).numpy()
    if fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(out))(x).numpy()
    else:
        import onnxruntime as ort

        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4


def test_cli_help_imports_no_torch():
    code = "import sys, volseg.cli; volseg.cli.build_parser(); print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"
    res = subprocess.run([sys.executable, "-m", "volseg.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "infer" in res.stdout and "train" in res.stdout


def test_cli_model_summary(capsys):
    root = Path(__file__).parent.parent
    assert main(["model", "--config", str(root / "configs/unet2d_seed.yaml")]) == 0
    assert "parameters: 31,030,593" in capsys.readouterr().out.splitlines()
    assert main(["model", "--config", str(root / "configs/unet2d_seed.yaml"), "--set", "model.variant=unetpp"]) == 2
    assert "nested" in capsys.readouterr().err


def test_demo_command_end_to_end(tmp_path, capsys):
    sets = ["model.features=[4,8]", "data.patch_size=[24,24,16]", "train.epochs=1", "train.steps_per_epoch=1", "train.val_every=1"]
    args = ["-q", "demo", "--output", str(tmp_path / "demo"), "--cases", "4", "--test-cases", "2", "--shape", "32", "32", "24"]
    assert main(args + sum((["--set", s] for s in sets), [])) == 0
    out = capsys.readouterr().out
    assert "mean foreground Dice" in out
    assert (tmp_path / "demo/run/report.html").is_file()
    assert (tmp_path / "demo/run/eval/metrics.csv").is_file()
    assert len(list((tmp_path / "demo/predictions").glob("*_seg.nii.gz"))) == 2


def test_predictor_slabs_tta_and_largest_component(tiny_run):
    """Probabilities sum to one; TTA and postprocessing run."""
    from volseg.data.manifest import load_manifest
    from volseg.inference import Predictor
    from volseg.preprocessing.pipeline import preprocess_case

    pred = Predictor.from_run(tiny_run, device="cpu")

    manifest = json.loads((tiny_run / "dataset.json").read_text(encoding="utf-8"))["manifest"]
    pre = preprocess_case(load_manifest(manifest).test[0], pred.plan)
    whole = pred.probabilities(pre["image"]).astype(np.float32)
    assert whole.shape[1:] == pre["image"].shape[1:] and np.allclose(whole.sum(0), 1, atol=1e-2)
    # slab-wise (rolling) stitching against whole-volume MONAI: tests/test_inference_engine.py
    tta = Predictor.from_run(tiny_run, device="cpu", overrides={"tta": True, "largest_component": [1]})
    assert len(tta.net.flips) == 8
    index = tta.predict_index(pre["image"])
    from scipy import ndimage

    assert ndimage.label(index == 1, structure=np.ones((3, 3, 3)))[1] <= 1


def test_run_models_take_channels_last_3d_on_a_cpu(tiny_run):
    """A predictor loaded from a run folder puts its own 3D networks and windows in
    ``channels_last_3d`` on a CPU (measured faster there, bf16 or float32); a predictor built on
    a model it shares (training's validation) never converts it. The probabilities match the
    contiguous network's, and the network's instance norms are GroupNorms with one channel per
    group, which compute in that layout (InstanceNorm3d would copy to contiguous)."""
    import copy

    import torch

    from volseg.data.manifest import load_manifest
    from volseg.inference import ModelBundle, Predictor
    from volseg.preprocessing.pipeline import preprocess_case

    cl = torch.channels_last_3d

    def layout(pred):
        # a convolution with several input channels and a 3x3x3 kernel: both layouts differ there
        conv = next(m for m in pred.model.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1 and m.kernel_size[0] > 1)
        return conv.weight.is_contiguous(memory_format=cl) and not conv.weight.is_contiguous()

    # the precision this CPU really has (amp_dtype): forcing bfloat16 on a CPU without native bf16
    # runs oneDNN's emulation, which gives contiguous outputs whatever the input layout
    pred = Predictor.from_run(tiny_run, device="cpu", overrides={"largest_component": []})
    assert layout(pred) and pred.layout is cl
    assert layout(Predictor.from_run(tiny_run, device="cpu", overrides={"amp": False}))
    norms = [m for m in pred.model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == m.num_channels for m in norms) and pred.plan.spatial_dims == 3
    shared = copy.deepcopy(pred.model).to(memory_format=torch.contiguous_format)
    plain = Predictor(ModelBundle.of(shared, pred.plan), pred.infer, "cpu")
    assert not layout(plain) and plain.layout is None
    seen = []  # the convolutions compute in channels_last
    inner = next(m for m in pred.model.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1 and m.kernel_size[0] > 1)
    inner.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=cl) and not o.is_contiguous()))
    manifest = json.loads((tiny_run / "dataset.json").read_text(encoding="utf-8"))["manifest"]
    image = preprocess_case(load_manifest(manifest).test[0], pred.plan)["image"]
    a, b = pred.probabilities(image).astype(np.float32), plain.probabilities(image).astype(np.float32)
    assert seen and all(seen)
    assert np.abs(a - b).max() <= 2 / 255  # uint8 probabilities; bf16 either way


def test_infer_dicom_series_folder(tiny_run, tmp_path):
    image, _ = make_case(4, "ct", (30, 28, 20), (1.2, 1.2, 2.0), orientation="LPS")
    write_dicom_series(image, tmp_path / "series")
    ref = read_image(tmp_path / "series")
    assert ref.GetSize() == image.GetSize()
    assert main(["-q", "infer", str(tmp_path / "series"), "--model", str(tiny_run)]) == 0
    seg = sitk.ReadImage(str(tmp_path / "series_seg.nii.gz"))
    assert seg.GetSize() == ref.GetSize()
    assert np.allclose(seg.GetSpacing(), ref.GetSpacing(), atol=1e-4) and np.allclose(seg.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    assert np.allclose(seg.GetDirection(), ref.GetDirection(), atol=1e-5)
