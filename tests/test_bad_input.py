"""Inputs no scan can hold are refused by name, with nothing written under the output name and
the inputs unchanged."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from volseg.cli import main


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["int64 around 2^40", "scl_slope 1e30", "float 1e15"])
def test_absurd_intensities_are_refused(kind, tiny_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = rng.normal(0, 200, (32, 32, 24))
    if kind == "int64 around 2^40":
        nii = nib.Nifti1Image((base + 2**40).astype(np.int64), np.diag([1.5, 1.5, 1.5, 1]), dtype=np.int64)
    elif kind == "scl_slope 1e30":
        nii = nib.Nifti1Image(base.astype(np.int16), np.diag([1.5, 1.5, 1.5, 1]))
        nii.header.set_slope_inter(1e30, 0)
    else:
        nii = nib.Nifti1Image((base * 1e15).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1]))
    scan = tmp_path / "odd.nii.gz"
    nib.save(nii, scan)
    before = _sha(scan)
    out = tmp_path / "pred"
    rc = main(["infer", str(scan), "--model", str(tiny_run), "--output", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert "odd.nii.gz" in err and ("Hounsfield" in err or "no scan's intensities" in err), err[-1500:]
    assert not (out / "odd_seg.nii.gz").exists()
    assert _sha(scan) == before


def _manifest_variant(tiny_dataset, tmp_path, kind):
    import json
    import os

    data = json.loads(tiny_dataset.read_text(encoding="utf-8"))
    root = tiny_dataset.parent
    for e in data["training"]:  # absolute paths: the manifest moves to tmp_path
        e["image"], e["label"] = str(root / e["image"]), str(root / e["label"])
    if kind == "300 labels":
        data["labels"] = {str(i): f"c{i}" for i in range(300)}
    elif kind == "negative label":
        data["labels"]["-1"] = "odd"
    elif kind == "same file in validation":
        data["validation"] = [dict(data["training"][1])]
    elif kind == "hard link in validation":
        link = tmp_path / "copy_of_case1.nii.gz"
        os.link(data["training"][1]["image"], link)
        data["validation"] = [{"image": str(link), "label": data["training"][1]["label"]}]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind,words", [("300 labels", "at most 256"), ("negative label", "outside 0..65535"),
                                        ("same file in validation", "is training case"), ("hard link in validation", "is training case")])
def test_a_manifest_the_model_cannot_honestly_train_on_is_refused(kind, words, tiny_dataset, tmp_path, capsys):
    manifest = _manifest_variant(tiny_dataset, tmp_path, kind)
    rc = main(["train", str(manifest), "--output", str(tmp_path / "run"), "--set", "train.epochs=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and words in err, err[-1500:]
    assert not (tmp_path / "run" / "last.pt").exists()
