"""Bad inputs through the real CLI: each gives a non-zero exit, one message naming the file or
key, no traceback, and nothing under the output name (issue 11). Then the inputs that are odd
but valid (sform/qform disagreement, several DICOM series, 4D multi-channel files) and the
temporary-file rules."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, NamedTuple

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

import volseg
from volseg.cli import main
from volseg.data.io import TEMP_PREFIX, ImageReadError, read_channels, read_image, write_image, write_text
from volseg.data.synth import make_case, make_dataset

from .conftest import TINY, write_dicom_series


def _scan(tmp: Path, name: str = "scan.nii.gz", shape=(20, 18, 16), spacing=(1.5, 1.5, 2.0)) -> Path:
    image, _ = make_case(7, "ct", shape, spacing)
    return write_image(sitk.Cast(image, sitk.sitkInt16), tmp / name)


def _truncated(suffix: str, frac: float) -> Callable:
    def build(tmp: Path, ctx: dict):
        full = _scan(tmp, "full" + suffix)
        data = full.read_bytes()
        bad = tmp / ("cut" + suffix)
        bad.write_bytes(data[: int(len(data) * frac)])
        return ["infer", str(bad), "--model", str(ctx["run"]), "--output", str(tmp / "out")], tmp / "out" / "cut_seg.nii.gz", [str(bad)]

    return build


def _nan_block(suffix: str, value: float) -> Callable:
    def build(tmp: Path, ctx: dict):
        image, _ = make_case(7, "ct", (20, 18, 16), (1.5, 1.5, 2.0))
        arr = sitk.GetArrayFromImage(image).astype(np.float32)
        arr[3:5, 4:6, 5:7] = value
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(image)
        path = write_image(img, tmp / ("nan" + suffix))
        return ["infer", str(path), "--model", str(ctx["run"]), "--output", str(tmp / "out")], tmp / "out" / "nan_seg.nii.gz", [str(path), "8 "]

    return build


def _nifti_header(offset: int, value: float) -> Callable:
    """An uncompressed NIfTI-1 with one float32 header field patched in place (nibabel would
    recompute the field from the affine on save): pixdim[3] at byte 88, srow_x[0] at 280."""

    def build(tmp: Path, ctx: dict):
        path = _scan(tmp, "hdr.nii")
        raw = bytearray(path.read_bytes())
        raw[offset : offset + 4] = np.float32(value).tobytes()
        path.write_bytes(bytes(raw))
        return ["infer", str(path), "--model", str(ctx["run"]), "--output", str(tmp / "out")], tmp / "out" / "hdr_seg.nii.gz", [str(path)]

    return build


def _tiny(shape, spacing=(1.0, 1.0, 1.0)) -> Callable:
    def build(tmp: Path, ctx: dict):
        img = sitk.GetImageFromArray(np.full(shape[::-1], 40, np.int16))
        img.SetSpacing(spacing)
        path = write_image(img, tmp / "tiny.nii.gz")
        return ["infer", str(path), "--model", str(ctx["run"]), "--output", str(tmp / "out")], tmp / "out" / "tiny_seg.nii.gz", [str(path), "at least 4"]

    return build


def _output_is_a_file(tmp: Path, ctx: dict):
    blocker = tmp / "blocker"
    blocker.write_text("not a folder", encoding="utf-8")
    scan = _scan(tmp)
    return ["infer", str(scan), "--model", str(ctx["run"]), "--output", str(blocker / "sub")], blocker / "sub" / "scan_seg.nii.gz", [str(blocker)]


def _four_d(channels: int) -> Callable:
    def build(tmp: Path, ctx: dict):
        src = nib.load(str(_scan(tmp)))
        arr = np.stack([np.asanyarray(src.dataobj)] * channels, axis=-1)
        path = tmp / "mc.nii.gz"
        nib.save(nib.Nifti1Image(arr, src.affine), str(path))
        return ["infer", str(path), "--model", str(ctx["run"]), "--output", str(tmp / "out")], tmp / "out" / "mc_seg.nii.gz", [str(path), f"{channels} channel(s)", "expects 1"]

    return build


def _train_config(text: bytes, name: str, key: str) -> Callable:
    def build(tmp: Path, ctx: dict):
        cfg = tmp / name
        cfg.write_bytes(text)
        return ["train", str(ctx["data"]), "--config", str(cfg), "--output", str(tmp / "run")], tmp / "run", [key]

    return build


def _train_set(override: str, key: str) -> Callable:
    def build(tmp: Path, ctx: dict):
        return ["train", str(ctx["data"]), "--set", override, "--output", str(tmp / "run")], tmp / "run", [key]

    return build


def _manifest_not_utf8(tmp: Path, ctx: dict):
    m = tmp / "dataset.json"
    m.write_bytes(json.dumps({"name": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    return ["train", str(m), "--output", str(tmp / "run")], tmp / "run" / "config.yaml", [str(m), "UTF-8"]


def _manifest_4d_count(tmp: Path, ctx: dict):
    data = _four_d_dataset(tmp / "d4", modalities=3)
    # train() opens RUN/train.log before it reads the manifest: nothing a later --resume or
    # infer would take for a run (config, plan, weights) may be left
    return ["train", str(data), "--output", str(tmp / "run")] + [f"--set={s}" for s in TINY], tmp / "run" / "config.yaml", ["2 image channel(s)", "declares 3"]


def _evaluate_bad_pred(kind: str) -> Callable:
    def build(tmp: Path, ctx: dict):
        truth = ctx["data"].parent / "labelsTs" / "synthct_004.nii.gz"
        (tmp / "pred").mkdir()
        pred = tmp / "pred" / "synthct_004_seg.nii.gz"
        if kind == "float":
            lab = sitk.Cast(read_image(truth), sitk.sitkFloat32) * 0.5
            write_image(lab, pred)
        else:
            full = tmp / "full.nii.gz"
            shutil.copy(truth, full)
            data = full.read_bytes()
            pred.write_bytes(data[: len(data) // 2])
        return ["evaluate", "--pred", str(tmp / "pred"), "--truth", str(truth), "--output", str(tmp / "eval")], tmp / "eval" / "metrics.csv", [str(pred)]

    return build


def _unknown_largest_component(tmp: Path, ctx: dict):
    run = tmp / "run"
    shutil.copytree(ctx["run"], run, ignore=shutil.ignore_patterns("tb", "cache"))
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    cfg["infer"]["largest_component"] = [1, 7]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    scan = _scan(tmp)
    return ["infer", str(scan), "--model", str(run), "--output", str(tmp / "out")], tmp / "out" / "scan_seg.nii.gz", ["infer.largest_component", "[7]", "liver"]


class Case(NamedTuple):
    id: str
    build: Callable
    status: int


CASES: List[Case] = (
    [Case(f"truncated{s}-{int(f * 100)}%", _truncated(s, f), 1) for s in (".nii", ".nii.gz") for f in (0.1, 0.5, 0.99)]
    + [
        Case("truncated.nrrd", _truncated(".nrrd", 0.6), 1),
        Case("nan-block.nii.gz", _nan_block(".nii.gz", np.nan), 1),
        Case("inf-block.mha", _nan_block(".mha", np.inf), 1),
        Case("nan-block.nrrd", _nan_block(".nrrd", np.nan), 1),
        Case("zero-pixdim", _nifti_header(88, 0.0), 1),
        Case("nan-sform", _nifti_header(280, np.nan), 1),
        Case("tiny-3x3x3", _tiny((3, 3, 3)), 1),
        Case("single-slice", _tiny((24, 24, 1)), 1),
        Case("absurd-spacing", _tiny((20, 20, 20), (1e-4, 1e-4, 1e-4)), 1),
        Case("huge-spacing", _tiny((200, 200, 200), (50.0, 50.0, 50.0)), 1),
        Case("output-is-a-file", _output_is_a_file, 2),
        Case("4d-channel-count", _four_d(2), 1),
        Case("config-not-utf8", _train_config("model:\n  norm: \xe9\n".encode("latin-1"), "bad.yaml", "bad.yaml"), 2),
        Case("train.lr=nan", _train_set("train.lr=nan", "train.lr"), 2),
        Case("train.lr=inf", _train_set("train.lr=.inf", "train.lr"), 2),
        Case("manifest-not-utf8", _manifest_not_utf8, 2),
        Case("manifest-4d-count", _manifest_4d_count, 2),
        Case("evaluate-float-pred", _evaluate_bad_pred("float"), 2),
        Case("evaluate-truncated-pred", _evaluate_bad_pred("truncated"), 2),
        Case("largest_component-unknown", _unknown_largest_component, 2),
    ]
)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error(case, tiny_run, tiny_dataset, tmp_path, capsys):
    argv, output, needles = case.build(tmp_path, {"run": tiny_run, "data": tiny_dataset})
    status = main(["-q"] + argv)
    out, err = capsys.readouterr()
    text = out + err
    assert status == case.status, text
    assert "Traceback" not in text and ".hxx:" not in text and ".cxx:" not in text, text
    error_lines = [ln for ln in err.splitlines() if ": error: " in ln or ln.startswith("FAILED ")]
    assert len(error_lines) == 1, err
    for needle in needles:  # a manifest's problems are listed one per line under its error line
        assert needle in err[err.index(error_lines[0]):], (needle, err)
    assert not output.exists(), f"{output} was left behind"


# ---------------------------------------------------------------------------------------------
# odd but valid inputs


def test_sform_wins_over_qform_and_the_mask_keeps_it(tiny_run, tmp_path):
    src = nib.load(str(_scan(tmp_path)))
    sform = src.affine.copy()
    sform[:3, 3] += [15.0, -7.0, 4.0]  # the qform keeps the old origin
    path = tmp_path / "disagree.nii.gz"
    out = nib.Nifti1Image(np.asanyarray(src.dataobj), None, src.header.copy())
    out.set_qform(src.affine, 1)
    out.set_sform(sform, 2)
    nib.save(out, str(path))
    img = read_image(path)
    assert np.allclose(img.GetOrigin(), np.diag([-1, -1, 1]) @ sform[:3, 3], atol=1e-4)
    assert main(["-q", "infer", str(path), "--model", str(tiny_run)]) == 0
    seg = nib.load(str(tmp_path / "disagree_seg.nii.gz"))
    assert np.allclose(seg.affine, sform, atol=1e-5)
    assert np.allclose(seg.header.get_qform(), src.affine, atol=1e-5)
    assert int(seg.header["sform_code"]) == 2 and int(seg.header["qform_code"]) == 1
    back = read_image(tmp_path / "disagree_seg.nii.gz")
    assert np.allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4) and back.GetSize() == img.GetSize()


def test_a_scan_thinner_than_half_the_window_is_segmented_with_a_warning(tiny_run, tmp_path, caplog):
    from volseg.runfolder import read_plan

    plan = read_plan(tiny_run)
    z = plan.patch_size[2]  # the training window's depth on the canonical grid
    image, _ = make_case(7, "ct", (30, 30, 2 * z), tuple(plan.spacing))
    for n, thin in ((z // 2 - 2, True), (z, False)):
        scan = write_image(sitk.Cast(image[:, :, z - n // 2 : z - n // 2 + n], sitk.sitkInt16), tmp_path / f"slab{n}.nii.gz")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="volseg"):
            assert main(["-q", "infer", str(scan), "--model", str(tiny_run), "--device", "cpu"]) == 0
        err = caplog.text
        assert (tmp_path / f"slab{n}_seg.nii.gz").is_file()
        assert ("is thin" in err) == thin, err
        if thin:
            assert f"{n} voxels" in err and f"training window of {z} voxels" in err and "augment.slab_prob=0.3" in err
            assert "model.norm=instance" in err and "--set model.norm=batch" in err


def test_a_thin_scan_is_not_a_warning_for_a_batch_norm_network(tiny_dataset, tmp_path, caplog):
    """Batch norm's statistics are fixed at training, so the padding of a thin scan does not
    change how the network normalises it (benchmarks/README.md: 0.69-0.90 on thin slabs where
    instance norm gave 0.22-0.37): logged, not warned."""
    from volseg.config import load_config
    from volseg.runfolder import read_plan
    from volseg.training import train

    from .conftest import TINY

    run = train(tiny_dataset, load_config(None, [*TINY, "model.norm=batch"]), tmp_path / "bn", device="cpu")
    plan = read_plan(run)
    z = plan.patch_size[2]
    image, _ = make_case(7, "ct", (30, 30, 2 * z), tuple(plan.spacing))
    scan = write_image(sitk.Cast(image[:, :, z - 3 : z + 3], sitk.sitkInt16), tmp_path / "slab.nii.gz")
    with caplog.at_level(logging.INFO, logger="volseg"):
        assert main(["-q", "infer", str(scan), "--model", str(run), "--device", "cpu"]) == 0
    assert (tmp_path / "slab_seg.nii.gz").is_file()
    thin = [r for r in caplog.records if "is thin" in r.getMessage()]
    assert thin and all(r.levelno == logging.INFO for r in thin), [(r.levelname, r.getMessage()) for r in thin]
    assert "model.norm=batch" in thin[0].getMessage()


def test_sheared_sform_is_refused(tmp_path):
    src = nib.load(str(_scan(tmp_path)))
    aff = src.affine.copy()
    aff[0, 1] = 0.4
    path = tmp_path / "shear.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), aff), str(path))
    with pytest.raises(ImageReadError, match="sheared"):
        read_image(path)


def test_dicom_folder_with_several_series_reads_the_longest(tmp_path, caplog):
    scout = make_case(1, "ct", (20, 20, 16), (2.0, 2.0, 5.0))[0][:, :, :3]  # a localizer-like series
    volume, _ = make_case(2, "ct", (20, 18, 16), (1.5, 1.5, 2.0))
    write_dicom_series(scout, tmp_path / "study", "1.2.826.0.1.3680043.2.1125.7")
    write_dicom_series(volume, tmp_path / "study", "1.2.826.0.1.3680043.2.1125.8")
    with caplog.at_level(logging.WARNING, logger="volseg"):
        img = read_image(tmp_path / "study")
    assert img.GetSize() == volume.GetSize()
    assert "2 DICOM series" in caplog.text and "1125.7 (3 slices)" in caplog.text
    assert f"1125.8 ({volume.GetDepth()} slices, the most)" in caplog.text


def _four_d_dataset(root: Path, modalities: int = 2) -> Path:
    """make_dataset's phantoms with a second channel (a smooth nonlinear copy) on a 4th axis."""
    manifest = make_dataset(root, cases=4, test_cases=1, shape=(32, 32, 24), seed=5)
    for sub in ("imagesTr", "imagesTs"):
        for p in sorted((root / sub).glob("*.nii.gz")):
            src = nib.load(str(p))
            a = np.asanyarray(src.dataobj).astype(np.float32)
            nib.save(nib.Nifti1Image(np.stack([a, np.sqrt(np.abs(a))], axis=-1), src.affine), str(p))
    m = json.loads(manifest.read_text(encoding="utf-8"))
    m["modality"] = {str(i): n for i, n in enumerate(["CT", "MR", "MR2"][:modalities])}
    write_text(manifest, json.dumps(m))
    return manifest


def test_4d_file_gives_its_channels_to_training_and_inference(tmp_path):
    from volseg.config import load_config
    from volseg.data.manifest import load_manifest, validate_cases
    from volseg.inference.batch import collect_inputs, infer_many
    from volseg.planning import plan_cases
    from volseg.preprocessing.pipeline import preprocess_case
    from volseg.training import train

    data = _four_d_dataset(tmp_path / "d4")
    man = load_manifest(data)
    validate_cases(man, man.training)
    image = man.training[0].images[0]
    assert [c.GetSize() for c in read_channels(image)] == [read_channels(image)[0].GetSize()] * 2
    with pytest.raises(ImageReadError, match="2 entries"):
        read_image(image)
    cfg = load_config(None, TINY + ["train.epochs=1"])
    plan = plan_cases(man, man.training, cfg)
    pre = preprocess_case(man.training[0], plan)
    assert pre["image"].shape[0] == 2
    assert not np.allclose(pre["image"][0], pre["image"][1])
    run = train(data, cfg, tmp_path / "run", device="cpu")
    jobs = collect_inputs([man.test[0].images[0]], tmp_path / "pred")
    assert infer_many(jobs, run, device="cpu") == []
    seg = read_image(jobs[0].output)
    assert seg.GetSize() == read_channels(man.test[0].images[0])[0].GetSize()


def test_channels_off_one_grid_are_refused(tiny_run):
    import dataclasses

    from volseg.data.plan import PreprocessingPlan
    from volseg.preprocessing.pipeline import preprocess

    plan = PreprocessingPlan.from_json((tiny_run / "plan.json").read_text(encoding="utf-8"))
    plan = dataclasses.replace(plan, channels=plan.channels * 2, norms=plan.norms * 2)
    a, _ = make_case(1, "ct", (20, 18, 16), (1.5, 1.5, 2.0))
    b = sitk.Image(a)
    b.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(ImageReadError, match="channel 1 .* not on the grid of channel 0.*origin"):
        preprocess([a, b], plan, source="two.nii.gz")
    assert preprocess([a, sitk.Image(a)], plan)["image"].shape[0] == 2


def test_itk_error_keeps_the_cause_not_the_source_location():
    from volseg.data.io import itk_error_text

    try:
        sitk.SmoothingRecursiveGaussian(sitk.Image([3, 3, 3], sitk.sitkFloat32), 1.0)
    except RuntimeError as exc:
        text = itk_error_text(exc)
    assert text.startswith("The number of pixels along dimension 0 is less than 4"), text


# ---------------------------------------------------------------------------------------------
# temporary files


def test_killed_write_leaves_nothing_that_looks_like_a_scan(tmp_path):
    from volseg.inference.batch import collect_inputs

    scan = _scan(tmp_path)
    code = (
        "import os, signal, sys\n"
        "from volseg.data.io import atomic_write\n"
        f"with atomic_write({str(tmp_path / 'scan_seg.nii.gz')!r}) as tmp:\n"
        "    tmp.write_bytes(b'half a file')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(volseg.__file__).parents[1])}, timeout=120)
    assert proc.returncode == -9
    left = list(tmp_path.glob(TEMP_PREFIX + "*/scan_seg.nii.gz"))
    assert len(left) == 1  # the killed write's temporary file, hidden in its folder
    assert not (tmp_path / "scan_seg.nii.gz").exists()
    assert [j.images for j in collect_inputs([tmp_path])] == [(scan,)]


def test_stale_temporary_folders_are_removed(tmp_path, caplog):
    stale = tmp_path / f"{TEMP_PREFIX}old"
    fresh = tmp_path / f"{TEMP_PREFIX}new"
    for d in (stale, fresh):
        d.mkdir()
        (d / "x_seg.nii.gz").write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    with caplog.at_level(logging.INFO, logger="volseg"):
        write_text(tmp_path / "note.txt", "hello")
    assert not stale.exists() and fresh.exists()  # a running writer's folder is left alone
    assert str(stale) in caplog.text and "interrupted" in caplog.text
    assert (tmp_path / "note.txt").read_text(encoding="utf-8") == "hello"


def test_an_unwritable_output_fails_its_scan_and_the_batch_goes_on(tiny_run, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    _scan(scans, "a.nii.gz")
    _scan(scans, "b.nii.gz")
    (tmp_path / "out" / "a_seg.nii.gz").mkdir(parents=True)  # a folder where a's mask should go
    assert main(["-q", "infer", str(scans), "--model", str(tiny_run), "--output", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    failed = [ln for ln in err.splitlines() if ln.startswith("FAILED ")]
    assert len(failed) == 1 and failed[0].startswith(f"FAILED a: {tmp_path / 'out' / 'a_seg.nii.gz'}: is a folder"), err
    assert "1/2 scan(s) segmented" in out
    assert read_image(tmp_path / "out" / "b_seg.nii.gz").GetSize() == read_image(scans / "b.nii.gz").GetSize()
    assert not list((tmp_path / "out").glob(TEMP_PREFIX + "*"))


def test_big_endian_nifti_reads_the_same_values(tmp_path):
    a = np.arange(6 * 5 * 4, dtype=">i2").reshape(6, 5, 4)
    nib.save(nib.Nifti1Image(a, np.diag([2.0, 3.0, 4.0, 1.0]), nib.Nifti1Header(endianness=">")), str(tmp_path / "be.nii"))
    img = read_image(tmp_path / "be.nii")
    assert np.array_equal(sitk.GetArrayFromImage(img).T, a) and img.GetSpacing() == (2.0, 3.0, 4.0)


def test_an_output_folder_without_write_permission_fails_once_up_front(tiny_run, tmp_path, capsys, monkeypatch):
    import volseg.inference.inputs as inputs

    # the tests run as root, for whom chmod 0o500 does not stop writes: fake what os.access says
    real = os.access
    monkeypatch.setattr(inputs.os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real(p, mode))
    (tmp_path / "ro").mkdir()
    scan = _scan(tmp_path)
    assert main(["-q", "infer", str(scan), "--model", str(tiny_run), "--output", str(tmp_path / "ro" / "preds")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err and str(tmp_path / "ro") in err and "Traceback" not in err
    assert not (tmp_path / "ro" / "preds").exists()
