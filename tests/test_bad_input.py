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
