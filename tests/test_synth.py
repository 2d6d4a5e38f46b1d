"""Synthetic phantoms (volseg.data.synth): determinism, labels, geometry, dataset layout, and
that the task is not trivial (no intensity threshold solves it) while staying realistic
(CT in HU with air at -1000; MRI on an arbitrary scale with a bias field)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_erosion

from volseg.data.synth import LABELS, ORIENTATIONS, make_case, make_dataset

SHAPE = (40, 36, 32)  # odd, small: every case here takes ~0.1 s


def _arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def _geometry(img: sitk.Image) -> tuple:
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


@pytest.fixture(scope="module")
def ct_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth_ct"), cases=3, modality="ct", seed=0, shape=SHAPE, test_cases=1)


@pytest.fixture(scope="module")
def ct_cases(ct_dataset):
    raw = json.loads(ct_dataset.read_text(encoding="utf-8"))
    root = ct_dataset.parent
    entries = raw["training"] + raw["test"]
    return [(sitk.ReadImage(str(root / e["image"])), sitk.ReadImage(str(root / e["label"]))) for e in entries]


def test_dataset_json_schema_and_files(ct_dataset):
    assert ct_dataset.name == "dataset.json"
    raw = json.loads(ct_dataset.read_text(encoding="utf-8"))
    for key in ("name", "description", "modality", "labels", "numTraining", "numTest", "training", "test"):
        assert key in raw, key
    assert raw["modality"] == {"0": "CT"}
    assert raw["labels"] == {"0": "background", "1": "liver", "2": "kidney", "3": "lesion"}
    assert (raw["numTraining"], raw["numTest"]) == (3, 1)
    assert len(raw["training"]) == 3 and len(raw["test"]) == 1
    names = set()
    for split, entries in (("Tr", raw["training"]), ("Ts", raw["test"])):
        for e in entries:
            assert set(e) == {"image", "label"}
            assert e["image"].startswith(f"./images{split}/") and e["label"].startswith(f"./labels{split}/")
            assert Path(e["image"]).name == Path(e["label"]).name
            names.add(Path(e["image"]).name)
            image = sitk.ReadImage(str(ct_dataset.parent / e["image"]))
            label = sitk.ReadImage(str(ct_dataset.parent / e["label"]))
            assert _geometry(image) == _geometry(label)
            assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
    assert len(names) == 4  # training and test names never collide
    leftovers = [p.name for p in ct_dataset.parent.rglob("*") if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_manifest_loader_accepts_the_dataset(ct_dataset):
    from volseg.data.manifest import load_manifest, validate_cases

    m = load_manifest(ct_dataset)
    assert m.is_ct and m.foreground == [1, 2, 3]
    validate_cases(m, m.training + m.test)


def test_labels_present_and_sized(ct_cases):
    for image, label in ct_cases:
        lab = _arr(label)
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3} and set(LABELS) == {0, 1, 2, 3}
        frac = np.bincount(lab.ravel(), minlength=4) / lab.size
        # liver large, kidneys medium, lesion small: a few hundred voxels at the default
        # (64, 64, 48) grid, i.e. about 0.15 % of the grid
        assert 0.02 < frac[1] < 0.10, frac
        assert 0.004 < frac[2] < 0.03, frac
        assert 0.0006 < frac[3] < 0.005, frac
        assert frac[3] < frac[2] < frac[1]
        # air outside the body, organs inside it
        img = _arr(image)
        assert np.median(img[:, :, 0]) < -900  # the grid's first column is outside the body
        assert -50 < np.median(img[lab == 1]) < 150


def test_geometry_varies_between_cases(ct_cases):
    spacings = [np.array(img.GetSpacing()) for img, _ in ct_cases]
    directions = [np.array(img.GetDirection()).reshape(3, 3) for img, _ in ct_cases]
    assert any(s.max() / s.min() > 1.5 for s in spacings), spacings  # anisotropic
    assert any(s.max() / s.min() < 1.01 for s in spacings), spacings  # isotropic
    assert any(not np.allclose(d, np.eye(3), atol=1e-4) for d in directions)
    assert any(not np.allclose(np.abs(d), np.eye(3), atol=1e-3) for d in directions)  # oblique
    assert len({img.GetOrigin() for img, _ in ct_cases}) == len(ct_cases)
    for img, _ in ct_cases:
        assert all(16 <= n <= 2 * max(SHAPE) for n in img.GetSize())
        # the field of view stays about SHAPE * 1.5 mm whatever the spacing
        fov = np.array(img.GetSize()) * np.array(img.GetSpacing())
        assert np.all(np.abs(fov / (np.array(SHAPE) * 1.5) - 1) < 0.15), fov


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_make_case_is_deterministic(modality):
    a_img, a_lab = make_case(7, modality, SHAPE)
    b_img, b_lab = make_case(np.random.default_rng(7), modality, SHAPE)
    assert _geometry(a_img) == _geometry(b_img) == _geometry(a_lab)
    assert _arr(a_img).tobytes() == _arr(b_img).tobytes()
    assert _arr(a_lab).tobytes() == _arr(b_lab).tobytes()
    c_img, c_lab = make_case(8, modality, SHAPE)
    assert _geometry(c_img) != _geometry(a_img)
    assert c_img.GetSize() != a_img.GetSize() or not np.array_equal(_arr(c_lab), _arr(a_lab))


def test_dataset_is_reproducible_from_seed(tmp_path, ct_cases):
    again = make_dataset(tmp_path / "again", cases=1, seed=0, shape=SHAPE, test_cases=0)
    entry = json.loads(again.read_text(encoding="utf-8"))["training"][0]
    image = sitk.ReadImage(str(again.parent / entry["image"]))
    ref_img, ref_lab = ct_cases[0]
    assert _geometry(image) == _geometry(ref_img)
    assert np.array_equal(_arr(image), _arr(ref_img))
    # case i is make_case((seed, i)) with the documented orientation / spacing schedule
    img, lab = make_case((0, 0), "ct", SHAPE, orientation=ORIENTATIONS[0], anisotropic=False)
    assert np.array_equal(_arr(img), _arr(ref_img)) and np.array_equal(_arr(lab), _arr(ref_lab))
    other = make_dataset(tmp_path / "other", cases=1, seed=1, shape=SHAPE, test_cases=0)
    other_img = sitk.ReadImage(str(other.parent / json.loads(other.read_text(encoding="utf-8"))["training"][0]["image"]))
    assert _geometry(other_img) != _geometry(ref_img)


def _world_centroid(label: sitk.Image, value: int) -> np.ndarray:
    idx = np.argwhere(_arr(label) == value)[:, ::-1].mean(axis=0)  # (x, y, z) index
    return np.array(label.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


def test_anatomy_is_rendered_in_world_coordinates():
    """Same seed, different grids: the organs stay put in mm, so the direction matrix, origin
    and spacing written to the header are the ones the anatomy was rendered with."""
    cases = {o: make_case(3, "ct", SHAPE, orientation=o, anisotropic=False) for o in ORIENTATIONS}
    cases["aniso"] = make_case(3, "ct", SHAPE, orientation="LPS", anisotropic=True)
    ref = cases["LPS"][1]
    for name, (_, label) in cases.items():
        for value in (2, 3):
            shift = np.linalg.norm(_world_centroid(label, value) - _world_centroid(ref, value))
            assert shift < 1.5, (name, value, shift)
    # RAS is LPS with x and y reversed: the same voxels, flipped
    lps, ras = _arr(ref), _arr(cases["RAS"][1])
    assert np.mean(lps == ras[:, ::-1, ::-1]) > 0.999


def _best_window_dice(img: np.ndarray, mask: np.ndarray) -> float:
    """Dice of the best single intensity window [lo, hi], searched over the class's own
    percentiles: the best any per-voxel threshold classifier can do for this class."""
    vals = img[mask]
    best = 0.0
    for lo in np.percentile(vals, np.arange(0, 51, 5)):
        for hi in np.percentile(vals, np.arange(50, 101, 5)):
            pred = (img >= lo) & (img <= hi)
            best = max(best, 2.0 * np.count_nonzero(pred & mask) / (np.count_nonzero(pred) + mask.sum()))
    return best


def test_ct_classes_not_separable_by_intensity_threshold(ct_cases):
    """No HU window reaches a useful Dice: the classes overlap in intensity (enhanced kidney
    cortex/medulla overlapping blood, lesion and bone edges; liver and lesion histograms
    overlapping with noise and texture). A trained model uses shape and context and scores clearly higher (Dice > 0.8,
    checked by the end-to-end training test)."""
    for image, label in ct_cases:
        img, lab = _arr(image).astype(np.float32), _arr(label)
        dice = {c: _best_window_dice(img, lab == c) for c in (1, 2, 3)}
        assert dice[2] < 0.45, dice  # kidney
        assert dice[3] < 0.4, dice  # lesion
        assert dice[1] < 0.75, dice  # liver: big, so a window catches much of it


def _liver_trend(image: sitk.Image, label: sitk.Image, offset: float = 0.0) -> float:
    """Spread (5th-95th percentile) of the best linear fit of liver intensity against world
    position, relative to the mean: the smooth intensity drift across one organ."""
    img = _arr(image).astype(np.float64) + offset
    mask = binary_erosion(_arr(label) == 1, iterations=2)  # away from partial-volume edges
    idx = np.argwhere(mask)[:, ::-1].astype(float)
    world = np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])
    design = np.c_[np.ones(len(world)), world]
    coef, *_ = np.linalg.lstsq(design, img[mask], rcond=None)
    fit = design @ coef
    return float((np.percentile(fit, 95) - np.percentile(fit, 5)) / fit.mean())


@pytest.mark.parametrize("seed", [0, 6])
def test_mri_has_bias_field_and_arbitrary_scale(seed):
    mri_img, mri_lab = make_case(seed, "mri", SHAPE)
    ct_img, ct_lab = make_case(seed, "ct", SHAPE)
    assert np.array_equal(_arr(mri_lab), _arr(ct_lab))  # same anatomy, other contrast
    mri = _arr(mri_img)
    assert mri.dtype == np.float32 and mri.min() >= 0  # magnitude image
    assert _arr(ct_img).dtype == np.int16
    # the liver drifts smoothly by > 8 % on MRI; on CT (attenuation = HU + 1000) it does not
    assert _liver_trend(mri_img, mri_lab) > 0.08
    assert _liver_trend(ct_img, ct_lab, offset=1000.0) < 0.04
    # T1-like contrast: fat (subcutaneous, at the body edge) brighter than liver on MRI
    liver = np.median(mri[_arr(mri_lab) == 1])
    assert np.percentile(mri, 99) > 1.3 * liver


def test_spacing_argument_applies_to_every_case():
    for orientation in ORIENTATIONS:
        img, lab = make_case(1, "mri", SHAPE, spacing=(0.9, 0.9, 2.0), orientation=orientation, anisotropic=True)
        assert np.allclose(img.GetSpacing(), (0.9, 0.9, 2.0))
        assert np.all(np.abs(np.array(img.GetSize()) / np.array(SHAPE) - 1) < 0.1)
        assert set(np.unique(_arr(lab)).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modality": "pet"}, "ct"),
        ({"modality": "mrt"}, "mri"),  # "mr" is an accepted alias of "mri"
        ({"shape": (64, 64)}, "shape"),
        ({"shape": (64, 8, 48)}, "shape"),
        ({"spacing": (1.0, -1.0, 1.0)}, "spacing"),
        ({"cases": 0}, "cases"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_with_the_value(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dataset(tmp_path, **kwargs)
    assert not (tmp_path / "dataset.json").exists()


def test_a_folder_holding_a_dataset_is_refused_without_force(tmp_path, capsys):
    from volseg.cli import main

    (tmp_path / "dataset.json").write_text('{"name": "my real data"}', encoding="utf-8")
    rc = main(["synth", str(tmp_path), "--cases", "1", "--test-cases", "0", "--shape", "16", "16", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a dataset" in err and "--force" in err
    assert (tmp_path / "dataset.json").read_text(encoding="utf-8") == '{"name": "my real data"}' and not (tmp_path / "imagesTr").exists()
    assert main(["-q", "synth", str(tmp_path), "--cases", "1", "--test-cases", "0", "--shape", "16", "16", "16", "--force"]) == 0
    assert "synthct_000" in (tmp_path / "dataset.json").read_text(encoding="utf-8")
