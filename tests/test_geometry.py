"""Property tests (hypothesis): any orientation (oblique included), spacing and shape survives
preprocessing (reorient + resample) and its inverse (restore_labels) on exactly the input grid,
and a NIfTI mask written for a NIfTI scan carries the scan's header (affine, qform/sform codes)."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from volseg.data.io import read_image, write_image, write_label_like
from volseg.data.plan import ChannelNorm, PreprocessingPlan
from volseg.preprocessing.geometry import target_grid, to_canonical
from volseg.preprocessing.pipeline import MIN_VOXELS, preprocess
from volseg.preprocessing.restore import restore_labels

LABEL_VALUES = (0, 2, 5)
PERMUTATIONS = list(itertools.permutations(range(3)))


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


@st.composite
def grids(draw):
    """A small labelled volume on a random grid: any axis permutation and flips, then an
    oblique rotation of up to ~17 degrees per axis (0 for half the examples)."""
    shape = [draw(st.integers(4, 12)) for _ in range(3)]
    spacing = [draw(st.floats(0.4, 3.0)) for _ in range(3)]
    perm = np.eye(3)[list(draw(st.sampled_from(PERMUTATIONS)))]
    signs = np.diag([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    oblique = draw(st.booleans())
    # angles to 1e-4 rad: header-like values (a subnormal angle such as 1e-308 makes ITK's SVD
    # in DICOMOrient fail silently; no file stores one)
    angles = [round(draw(st.floats(-0.3, 0.3)), 4) if oblique else 0.0 for _ in range(3)]
    direction = _rotation(*angles) @ perm @ signs
    origin = [draw(st.floats(-200, 200)) for _ in range(3)]
    seed = draw(st.integers(0, 2**16))
    labels = np.random.default_rng(seed).choice(LABEL_VALUES, size=shape[::-1]).astype(np.uint8)
    img = sitk.GetImageFromArray(labels)
    img.SetSpacing(spacing)
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin(origin)
    return img


def _plan(spacing) -> PreprocessingPlan:
    return PreprocessingPlan(
        spacing=tuple(float(s) for s in spacing),
        orientation="RAS",
        channels=("CT",),
        norms=(ChannelNorm("none"),),
        label_values=LABEL_VALUES,
        label_names=("background", "a", "b"),
        spatial_dims=3,
        patch_size=(8, 8, 8),
        slice_axis=2,
    )


def _one_hot(index: np.ndarray, k: int) -> np.ndarray:
    return (index[None] == np.arange(k)[:, None, None, None]).astype(np.float32)


def _same_grid(a: sitk.Image, b: sitk.Image, atol: float = 1e-6) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=atol)
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=atol * 100)
    assert np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=atol)


@settings(max_examples=25, deadline=None)
@given(grids())
def test_round_trip_on_the_own_spacing_gives_back_the_labels(img):
    """Target spacing = the scan's: reorientation is a permutation/flip both ways, so every
    label comes back exactly, on exactly the input grid."""
    plan = _plan(to_canonical(img, "RAS").GetSpacing())
    pre = preprocess([sitk.Cast(img, sitk.sitkFloat32)], plan, label=img)
    labels = restore_labels(_one_hot(pre["label"][0], plan.num_classes), plan, img)
    assert labels.shape == sitk.GetArrayViewFromImage(img).shape
    assert np.array_equal(labels, sitk.GetArrayFromImage(img))


@settings(max_examples=25, deadline=None)
@given(grids(), st.lists(st.floats(0.5, 2.5), min_size=3, max_size=3))
def test_nifti_round_trip_keeps_grid_and_header(img, target):
    """Any target spacing: the mask is written on exactly the scan's grid, and its NIfTI header
    equals the scan's (affine, qform/sform and their codes)."""
    plan = _plan(target)
    assume(min(target_grid(to_canonical(img, "RAS"), target)[0]) >= MIN_VOXELS)  # else refused (test_robustness)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = write_image(img, Path(tmp) / "scan.nii.gz")
        ref = read_image(ref_path)
        _same_grid(ref, img, atol=1e-4)  # NIfTI stores float32
        pre = preprocess([sitk.Cast(ref, sitk.sitkFloat32)], plan, label=ref)
        labels = restore_labels(_one_hot(pre["label"][0], plan.num_classes), plan, ref)
        out = write_label_like(labels, ref_path, ref, Path(tmp) / "scan_seg.nii.gz")
        _same_grid(read_image(out), ref)
        a, b = nib.load(str(ref_path)).header, nib.load(str(out)).header
        assert np.array_equal(a.get_best_affine(), b.get_best_affine())
        for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "srow_x", "srow_y", "srow_z"):
            assert np.array_equal(a[key], b[key]), key
        assert np.array_equal(a["pixdim"][:4], b["pixdim"][:4])


def test_half_turn_quaternion_header_is_copied_byte_for_byte(tmp_path):
    """A 180-degree rotation has two quaternion encodings; the mask keeps the scan's."""
    img = sitk.Image([5, 6, 7], sitk.sitkUInt8)
    img.SetDirection([0, 1, 0, 1, 0, 0, 0, 0, -1])
    ref_path = write_image(img, tmp_path / "scan.nii.gz")
    out = write_label_like(np.zeros((7, 6, 5), np.uint8), ref_path, read_image(ref_path), tmp_path / "seg.nii.gz")
    a, b = nib.load(str(ref_path)).header, nib.load(str(out)).header
    for key in ("quatern_b", "quatern_c", "quatern_d", "pixdim", "srow_x", "qform_code", "sform_code"):
        assert np.array_equal(a[key], b[key]), key
