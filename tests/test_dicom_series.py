"""DICOM series whose slices do not stack onto one regular grid are refused with the numbers;
a regular series (any slice order on disk, either direction) reads on its own grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from volseg.cli import main
from volseg.data.io import ImageReadError, read_image

from .conftest import write_dicom_series


def _volume(depth: int = 10) -> sitk.Image:
    arr = (np.arange(depth * 12 * 16).reshape(depth, 12, 16) % 300 - 100).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, 100.0))
    return img


def _positions(img: sitk.Image, z):
    return [img.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, float(k))) for k in z]


def test_a_regular_series_reads_on_its_grid(tmp_path):
    img = _volume()
    write_dicom_series(img, tmp_path / "s")
    got = read_image(tmp_path / "s")
    assert got.GetSize() == img.GetSize()
    assert np.allclose(got.GetSpacing(), img.GetSpacing(), atol=1e-4) and np.allclose(got.GetOrigin(), img.GetOrigin(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(img))


CASES = {
    "missing middle slice": (list(range(5)) + list(range(6, 11)), "not evenly spaced"),
    "duplicated slice": ([0, 1, 2, 3, 4, 4, 5, 6, 7, 8], "share a position"),
    "mixed spacing": ([0, 1, 2, 3, 4, 5, 5.5, 6, 6.5, 7], "not evenly spaced"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_irregular_series_is_refused_with_the_numbers(case, tmp_path):
    z, words = CASES[case]
    img = _volume(len(z))
    write_dicom_series(img, tmp_path / "s", positions=_positions(img, z))
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "s")
    msg = str(info.value)
    assert str(tmp_path / "s") in msg and words in msg and "mm" in msg, msg


def test_a_tilted_stack_is_refused(tmp_path):
    img = _volume()
    pos = [(p[0], p[1] + 0.4 * k, p[2]) for k, p in enumerate(_positions(img, range(10)))]  # gantry tilt: y drifts per slice
    write_dicom_series(img, tmp_path / "s", positions=pos)
    with pytest.raises(ImageReadError, match="shifted 0.4 mm within its plane"):
        read_image(tmp_path / "s")


def test_infer_refuses_an_irregular_series_and_writes_nothing(tiny_run, tmp_path, capsys):
    z = list(range(5)) + list(range(6, 25))
    img = _volume(len(z))
    write_dicom_series(img, tmp_path / "series", positions=_positions(img, z))
    out = tmp_path / "out"
    rc = main(["infer", str(tmp_path / "series"), "--model", str(tiny_run), "--output", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and "not evenly spaced" in err and "Non uniform" not in err, err[-2000:]
    assert not list(out.glob("*_seg.nii.gz"))
