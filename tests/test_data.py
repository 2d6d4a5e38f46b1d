"""Manifests, preprocessing and its inverse, class-balanced sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from volseg.config import AugmentConfig, load_config
from volseg.data.io import read_image, read_label, write_image
from volseg.data.manifest import ManifestError, load_manifest, split_cases, validate_cases
from volseg.data.plan import PreprocessingPlan
from volseg.planning import plan_cases
from volseg.preprocessing.pipeline import preprocess
from volseg.preprocessing.restore import restore_labels

#: every augmentation's probability key
AUG_PROBS = [f for f in AugmentConfig.__dataclass_fields__ if f.endswith("_prob")]


def _augment(prob: float, but: str = "") -> list:
    """``--set`` overrides putting every augmentation's probability to ``prob``, except ``but``."""
    return [f"augment.{k}={prob}" for k in AUG_PROBS if k != but]


def _img(arr_zyx, spacing=(1.0, 1.0, 1.0), direction=None, origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def _write_manifest(root: Path, training, labels=None, modality=None):
    m = {"name": "t", "modality": modality or {"0": "CT"}, "labels": labels or {"0": "background", "1": "a"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(m), encoding="utf-8")
    return root / "dataset.json"


def test_manifest_schema_errors_listed_together(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "training": []}), encoding="utf-8")
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path / "dataset.json")
    assert "'modality'" in str(e.value) and "'labels'" in str(e.value)


def test_manifest_validation_reports_every_problem(tmp_path):
    lab = np.zeros((6, 7, 8), np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    bad = lab.copy()
    bad[0, 0, 0] = 5
    write_image(_img(np.zeros((6, 7, 8), np.int16)), tmp_path / "a.nii.gz")
    write_image(_img(lab), tmp_path / "a_lab.nii.gz")
    write_image(_img(np.zeros((6, 7, 9), np.int16)), tmp_path / "b.nii.gz")  # shape mismatch
    write_image(_img(lab), tmp_path / "b_lab.nii.gz")
    write_image(_img(np.zeros((6, 7, 8), np.int16), spacing=(1, 1, 3)), tmp_path / "c.nii.gz")  # spacing mismatch
    write_image(_img(lab), tmp_path / "c_lab.nii.gz")
    write_image(_img(np.zeros((6, 7, 8), np.int16)), tmp_path / "d.nii.gz")
    write_image(_img(bad), tmp_path / "d_lab.nii.gz")  # undeclared value
    training = [
        {"image": "a.nii.gz", "label": "a_lab.nii.gz"},
        {"image": "b.nii.gz", "label": "b_lab.nii.gz"},
        {"image": "c.nii.gz", "label": "c_lab.nii.gz"},
        {"image": "d.nii.gz", "label": "d_lab.nii.gz"},
        {"image": "missing.nii.gz", "label": "a_lab.nii.gz"},
        {"image": ["a.nii.gz", "a.nii.gz"], "label": "a_lab.nii.gz"},
    ]
    # the last entry repeats case name 'a': rename through a copy
    write_image(_img(np.zeros((6, 7, 8), np.int16)), tmp_path / "e.nii.gz")
    training[-1]["image"] = ["e.nii.gz", "a.nii.gz"]
    m = load_manifest(_write_manifest(tmp_path, training))
    with pytest.raises(ManifestError) as e:
        validate_cases(m, m.training, min_cases=10)
    msg = str(e.value)
    assert "need at least 10" in msg
    assert "b: b.nii.gz size [8, 7, 6]" in msg or ("b:" in msg and "size" in msg)
    assert "c:" in msg and "spacing" in msg
    assert "d:" in msg and "[5]" in msg
    assert "missing.nii.gz" in msg
    assert "e: 2 image channel(s)" in msg
    assert "a:" not in msg.replace("a_lab", "")  # the good case is not reported


def test_split_deterministic_and_explicit(tiny_dataset):
    m = load_manifest(tiny_dataset)
    a = split_cases(m, 0.25, seed=0)
    b = split_cases(m, 0.25, seed=0)
    assert [c.name for c in a[1]] == [c.name for c in b[1]] and len(a[1]) == 1
    assert not {c.name for c in a[0]} & {c.name for c in a[1]}


@pytest.mark.parametrize("n, fraction, held", [(2, 0.2, 0), (3, 0.5, 0), (4, 0.2, 1), (5, 0.5, 2), (10, 0.2, 2), (10, 0.0, 0)])
def test_a_fraction_split_keeps_three_cases_training(n, fraction, held, caplog):
    """Two or three scans all train (each is often a source of its own); larger sets hold out
    the fraction, at least one case, never leaving fewer than three to train."""
    import logging

    from volseg.data.manifest import Case, Manifest

    cases = tuple(Case(f"c{i}", (Path(f"c{i}.nii.gz"),), Path(f"c{i}_seg.nii.gz")) for i in range(n))
    m = Manifest(Path("dataset.json"), "t", ("CT",), {0: "background", 1: "a"}, cases)
    with caplog.at_level(logging.WARNING, logger="volseg"):
        train, val = split_cases(m, fraction)
    assert len(val) == held and len(train) == n - held
    assert any("none is held out for validation" in r.getMessage() for r in caplog.records) == (held == 0 and fraction > 0)


@pytest.mark.parametrize(
    "direction, spacing",
    [
        ((-1, 0, 0, 0, -1, 0, 0, 0, 1), (0.8, 0.8, 3.0)),  # RAS-stored
        ((1, 0, 0, 0, 1, 0, 0, 0, 1), (1.0, 1.0, 1.0)),  # LPS
        (tuple(np.array([[0.94, -0.34, 0], [0.34, 0.94, 0], [0, 0, 1]]).ravel()), (0.7, 0.9, 2.0)),  # oblique
        ((0, 0, 1, 1, 0, 0, 0, 1, 0), (1.1, 0.6, 0.6)),  # permuted axes
    ],
)
def test_preprocess_then_restore_is_identity_on_geometry(direction, spacing):
    d = np.array(direction, float).reshape(3, 3)
    u, _, vt = np.linalg.svd(d)
    d = (u @ vt).ravel()
    z, y, x = 21, 26, 23
    zz, yy, xx = np.mgrid[:z, :y, :x]
    lab = np.zeros((z, y, x), np.uint8)
    lab[((zz - 10) ** 2 / 49 + (yy - 12) ** 2 / 64 + (xx - 11) ** 2 / 49) < 1] = 1
    lab[((zz - 10) ** 2 / 25 + (yy - 12) ** 2 / 25 + (xx - 17) ** 2 / 16) < 1] = 2
    image = _img((lab * 50).astype(np.float32), spacing, tuple(d), origin=(3.0, -7.0, 11.0))
    label = _img(lab, spacing, tuple(d), origin=(3.0, -7.0, 11.0))
    plan = PreprocessingPlan(spacing=(1.5, 1.5, 1.5), orientation="RAS", channels=("MR",), norms=(__import__("volseg.data.plan", fromlist=["ChannelNorm"]).ChannelNorm("zscore"),),
                label_values=(0, 1, 2), label_names=("bg", "a", "b"), spatial_dims=3, patch_size=(16, 16, 16), slice_axis=2)
    pre = preprocess([image], plan, label)
    assert pre["image"].dtype == np.float32 and pre["label"].dtype == np.uint8
    assert abs(float(pre["image"][pre["image"] != pre["image"].min()].mean())) < 1.0  # z-scored
    onehot = np.eye(3, dtype=np.float16)[pre["label"][0]].transpose(3, 0, 1, 2)
    back = restore_labels(onehot, plan, image)
    assert back.shape == lab.shape and back.dtype == np.uint8
    for k in (1, 2):
        inter = np.logical_and(back == k, lab == k).sum()
        dice = 2 * inter / ((back == k).sum() + (lab == k).sum())
        assert dice > 0.8, (k, dice)
    # at the scan's own (canonical) spacing there is no interpolation: the round trip is exact
    from dataclasses import replace

    from volseg.preprocessing.geometry import to_canonical

    exact = replace(plan, spacing=to_canonical(image, "RAS").GetSpacing())
    pre = preprocess([image], exact, label)
    onehot = np.eye(3, dtype=np.float16)[pre["label"][0]].transpose(3, 0, 1, 2)
    assert np.array_equal(restore_labels(onehot, exact, image), lab)


def test_ct_plan_statistics(tiny_dataset):
    m = load_manifest(tiny_dataset)
    cfg = load_config(None, ["data.patch_size=[24,24,16]"])
    plan = plan_cases(m, m.training, cfg)
    n = plan.norms[0]
    assert n.scheme == "ct" and n.lo < n.mean < n.hi and n.std > 0
    assert -200 < n.mean < 300  # soft-tissue HU, not raw/garbage
    assert plan.label_values == (0, 1, 2, 3) and plan.out_channels == 4
    assert all(p % 2 == 0 for p in plan.patch_size)
    pre = preprocess([read_image(m.training[0].images[0])], plan)
    assert pre["image"].min() >= (n.lo - n.mean) / n.std - 1e-4 and pre["image"].max() <= (n.hi - n.mean) / n.std + 1e-4


def _patch_hits(ratios, n=120):
    """Fraction of sampled patches containing each class, on a volume with a tiny class 2."""
    from volseg.data.transforms import cached_transforms, random_transforms

    lab = np.zeros((1, 40, 40, 40), np.uint8)
    lab[0, 5:35, 5:35, 5:20] = 1
    lab[0, 30:33, 30:33, 30:33] = 2  # 27 voxels, far from class 1
    plan = PreprocessingPlan(spacing=(1, 1, 1), orientation="RAS", channels=("MR",), norms=(), label_values=(0, 1, 2), label_names=("bg", "a", "b"),
                spatial_dims=3, patch_size=(8, 8, 8), slice_axis=2)
    cfg = load_config(None, ["data.patch_size=[8,8,8]", f"data.class_ratios={list(ratios)}"] + _augment(0))
    item = cached_transforms(plan)({"image": np.zeros((1, 40, 40, 40), np.float32), "label": lab})
    t = random_transforms(plan, cfg, num_samples=n)
    t.set_random_state(0)
    patches = t(item)
    return np.array([[int((np.asarray(p["label"]) == k).any()) for k in range(3)] for p in patches]).mean(0)


def test_sampling_follows_class_ratios():
    only_small = _patch_hits([0, 0, 1])
    assert only_small[2] == 1.0
    balanced = _patch_hits([1, 1, 1])
    assert 0.2 < balanced[2] < 0.5  # about 1/3 of centres on the 27-voxel class
    none_small = _patch_hits([1, 1, 0])
    assert none_small[2] < 0.1  # rarely hit by chance (background centres nearby only)
    assert balanced[2] > 3 * none_small[2]


def test_shipped_manifest_templates_parse():
    root = Path(__file__).parent.parent / "data_manifests"
    names = {load_manifest(p).name for p in root.glob("*.json")}
    assert {"Spleen", "Hippocampus"} <= names


def test_kfold_split_partitions_cases(tiny_dataset):
    m = load_manifest(tiny_dataset)
    held = [split_cases(m, 0.2, folds=2, fold=k)[1] for k in range(2)]
    names = [c.name for part in held for c in part]
    assert sorted(names) == sorted(c.name for c in m.training)  # every case held out exactly once
    with pytest.raises(Exception, match="fold"):
        load_config(None, ["data.folds=2", "data.fold=2"])


def test_slab_augmentation_thins_the_patch_as_inference_pads_a_thin_scan():
    """augment.slab_prob: a patch cut to a slab along the slice axis (>= 1/6 of its depth) and
    padded back with repeated edge slices, image and label alike; off: every slice differs."""
    import torch

    from volseg.data.transforms import SLAB_MIN, cached_transforms, random_transforms

    plan = PreprocessingPlan(spacing=(1, 1, 1), orientation="RAS", channels=("MR",), norms=(), label_values=(0, 1), label_names=("bg", "a"),
                spatial_dims=3, patch_size=(8, 8, 12), slice_axis=2)
    image = torch.arange(20 * 20 * 30, dtype=torch.float32).reshape(1, 20, 20, 30)  # every z slice distinct
    label = (image % 7 == 0).to(torch.uint8)
    item = cached_transforms(plan)({"image": image, "label": label})

    def distinct_slices(prob):
        t = random_transforms(plan, load_config(None, ["data.patch_size=[8,8,12]", f"augment.slab_prob={prob}"] + _augment(0, but="slab_prob")), 40)
        t.set_random_state(0)
        counts = []
        for p in t(item):
            img, lab = torch.as_tensor(p["image"]), torch.as_tensor(p["label"])
            assert img.shape == lab.shape == (1, 8, 8, 12)
            same = [torch.equal(img[..., z], img[..., z + 1]) for z in range(11)]
            assert same == [torch.equal(lab[..., z], lab[..., z + 1]) for z in range(11)]  # the label repeats where the image does
            counts.append(12 - sum(same))
        return counts

    thin = distinct_slices(1.0)
    assert min(thin) >= int(np.ceil(12 * SLAB_MIN)) and min(thin) < 12 and len(set(thin)) > 3
    assert set(distinct_slices(0.0)) == {12}


def test_label_intensity_offsets_each_structure_alone():
    """RandLabelIntensityd: one offset per structure, within the range, on every channel;
    background and the input untouched; seeded; prob 0 is the identity."""
    import torch

    from volseg.data.transforms import RandLabelIntensityd

    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.normal(size=(2, 10, 10, 10)), dtype=torch.float32)
    label = torch.zeros(1, 10, 10, 10, dtype=torch.uint8)
    label[0, :3], label[0, 6:] = 1, 3  # class 2 absent from this patch
    original = image.clone()
    seen = []
    for seed in (0, 1, 0):
        t = RandLabelIntensityd(1.0, 0.5)
        t.set_random_state(seed)
        out = t({"image": image, "label": label})["image"]
        diff = out - image
        assert torch.equal(image, original)
        assert torch.equal(diff[:, 3:6], torch.zeros_like(diff[:, 3:6]))
        offsets = [diff[:, sl] for sl in (slice(0, 3), slice(6, 10))]
        for d in offsets:
            assert torch.allclose(d, d.flatten()[0].expand_as(d), atol=1e-6) and 0 < abs(float(d.flatten()[0])) <= 0.5
        assert abs(float(offsets[0].flatten()[0] - offsets[1].flatten()[0])) > 1e-4
        seen.append([round(float(d.flatten()[0]), 6) for d in offsets])
    assert seen[0] == seen[2] != seen[1]
    assert torch.equal(RandLabelIntensityd(0.0, 0.5)({"image": image, "label": label})["image"], image)


@pytest.mark.parametrize("dims, patch", [(3, [32, 32, 16]), (2, [32, 32])])
def test_every_augmentation_on_keeps_shapes_and_labels(dims, patch):
    from volseg.data.transforms import cached_transforms, random_transforms

    plan = PreprocessingPlan(spacing=(1, 1, 1), orientation="RAS", channels=("MR",), norms=(), label_values=(0, 1), label_names=("bg", "a"),
                spatial_dims=dims, patch_size=tuple(patch), slice_axis=2)
    cfg = load_config(None, [f"model.spatial_dims={dims}", f"data.patch_size={patch}"] + _augment(1))
    lab = np.zeros((1, 40, 40, 30), np.uint8)
    lab[0, 10:30, 10:30, 5:25] = 1
    item = cached_transforms(plan)({"image": np.random.default_rng(0).random((1, 40, 40, 30), dtype=np.float32), "label": lab})
    out = random_transforms(plan, cfg, 2)(item)
    assert len(out) == 2
    for p in out:
        assert tuple(p["image"].shape) == (1, *patch) and tuple(p["label"].shape) == (1, *patch)
        assert set(np.unique(np.asarray(p["label"]))) <= {0, 1}  # nearest interpolation of labels
        assert np.isfinite(np.asarray(p["image"])).all()


def test_restore_keeps_the_outermost_layers():
    """When the resampled grid rounds down, the scan's last layers must not come back empty."""
    from volseg.data.plan import ChannelNorm

    lab = np.ones((20, 40, 87), np.uint8)  # [z, y, x]: every voxel foreground
    image = _img(lab.astype(np.float32), spacing=(0.8, 0.8, 2.5))
    plan = PreprocessingPlan(spacing=(1.5, 1.5, 2.0), orientation="RAS", channels=("MR",), norms=(ChannelNorm("zscore"),), label_values=(0, 1),
                label_names=("bg", "a"), spatial_dims=3, patch_size=(16, 16, 16), slice_axis=2)
    pre = preprocess([image], plan, _img(lab, spacing=(0.8, 0.8, 2.5)))
    probs = pre["label"].astype(np.float16)  # binary plan: one sigmoid channel
    assert (restore_labels(probs, plan, image) == 1).all()


def test_ct_window_keeps_soft_tissue_contrast_for_a_bright_foreground(tmp_path):
    """A contrast-filled vessel as the only foreground (300-600 HU): its percentiles alone would
    clip fat (-100 HU), water (0) and muscle (50) to one value; the window is widened to the
    soft-tissue range, so they stay apart after normalisation."""
    rng = np.random.default_rng(0)
    body = np.full((20, 24, 24), -100.0)  # fat
    body[:, :12] = 0.0  # water
    body[:, :6] = 50.0  # muscle
    lab = np.zeros(body.shape, np.uint8)
    lab[5:15, 14:20, 8:16] = 1
    body[lab == 1] = rng.uniform(300, 600, int(lab.sum()))
    write_image(_img(body.astype(np.int16)), tmp_path / "a.nii.gz")
    write_image(_img(lab), tmp_path / "a_lab.nii.gz")
    m = load_manifest(_write_manifest(tmp_path, [{"image": "a.nii.gz", "label": "a_lab.nii.gz"}]))
    plan = plan_cases(m, m.training, load_config(None, ["data.patch_size=[16,16,16]"]))
    n = plan.norms[0]
    assert n.lo == -160.0 and n.hi > 590  # widened below, the foreground's own top kept
    assert 300 < n.mean < 600  # z-scored with the foreground's statistics
    pre = preprocess([read_image(tmp_path / "a.nii.gz")], plan, read_label(tmp_path / "a_lab.nii.gz"))
    background = np.unique(np.round(pre["image"][0][pre["label"][0] == 0], 3))
    assert len(background) == 3  # fat, water, muscle: three values (one under the percentile window)
    # a foreground already spanning soft tissue keeps nnU-Net's percentile window
    from volseg.preprocessing.intensity import ct_window

    assert ct_window(-300.0, 400.0) == (-300.0, 400.0) and ct_window(-2.0, 1621.0) == (-160.0, 1621.0)


def test_cases_smaller_than_the_patch_are_padded_with_their_edge_voxels(tiny_dataset):
    """Training pads as inference does (edge voxels repeated): zeros would be a tissue after
    normalisation (CT: the foreground's mean), a slab no real scan has."""
    from dataclasses import replace

    import torch

    from volseg.data.transforms import cached_transforms

    m = load_manifest(tiny_dataset)
    plan = replace(plan_cases(m, m.training, load_config(None, ["data.patch_size=[24,24,16]"])), patch_size=(8, 8, 12))
    image = torch.arange(2 * 8 * 8 * 4, dtype=torch.float32).reshape(2, 8, 8, 4) + 100
    label = torch.zeros(1, 8, 8, 4, dtype=torch.uint8)
    label[..., -1] = 1
    out = cached_transforms(plan)({"image": image, "label": label})
    img, lab = out["image"], out["label"]
    assert img.shape == (2, 8, 8, 12) and lab.shape == (1, 8, 8, 12)
    assert torch.equal(img[..., 4:8], image)  # centred: 4 slices each side
    assert all(torch.equal(img[..., k], image[..., 0]) for k in range(4))
    assert all(torch.equal(img[..., k], image[..., -1]) for k in range(8, 12))
    assert lab[..., 8:].all() and not lab[..., :4].any()


def test_ct_stored_without_its_rescale_intercept_is_read_as_hu(tiny_dataset, caplog):
    """A CT stored as HU + 1024 (no value below 0) is shifted back, with a warning naming what was
    done: training statistics, preprocessing (SimpleITK and torch paths) and the body crop all
    see the same HU as for the scan in HU. An 8-bit export (0..255) is refused: no offset makes
    it HU, and a network trained on HU would give a plausible-looking mask on it."""
    import logging
    import shutil

    from volseg.data.io import ImageReadError
    from volseg.preprocessing.crop import foreground_box
    from volseg.preprocessing.intensity import BODY_HU

    m = load_manifest(tiny_dataset)
    cfg = load_config(None, ["data.patch_size=[24,24,16]"])
    plan = plan_cases(m, m.training, cfg)
    hu = read_image(m.training[0].images[0])
    assert sitk.GetArrayViewFromImage(hu).min() < BODY_HU  # the phantom has air
    stored = sitk.Cast(hu + 1024, sitk.sitkUInt16)
    want = preprocess([hu], plan)["image"]
    with caplog.at_level(logging.WARNING, logger="volseg"):
        got = preprocess([stored], plan, source="offset.nii.gz")["image"]
    assert np.allclose(got, want, atol=1e-5)
    assert any("offset.nii.gz" in r.getMessage() and "1024 is subtracted" in r.getMessage() for r in caplog.records)
    assert np.allclose(preprocess([stored], plan, device="cpu")["image"].numpy(), preprocess([hu], plan, device="cpu")["image"].numpy(), atol=1e-5)
    assert foreground_box([stored], plan, 0.0) == foreground_box([hu], plan, 0.0) != ((0, want.shape[1]), (0, want.shape[2]), (0, want.shape[3]))

    # a manifest of such scans plans the same HU window as one in HU
    root = tiny_dataset.parent / "offset_copy"
    shutil.copytree(tiny_dataset.parent, root, dirs_exist_ok=True)
    m2 = load_manifest(root / tiny_dataset.name)
    for case in m2.training:
        write_image(sitk.Cast(read_image(case.images[0]) + 1024, sitk.sitkUInt16), case.images[0])
    n, n2 = plan.norms[0], plan_cases(m2, m2.training, cfg).norms[0]
    assert np.allclose([n.lo, n.hi, n.mean, n.std], [n2.lo, n2.hi, n2.mean, n2.std], atol=1e-3)

    eight_bit = sitk.Cast(sitk.IntensityWindowing(hu, -160, 240, 0, 255), sitk.sitkUInt8)
    with pytest.raises(ImageReadError, match=r"8bit.nii.gz: channel 'CT' holds 0\.\.255.*8-bit export"):
        preprocess([eight_bit], plan, source="8bit.nii.gz")


@pytest.mark.parametrize("names, orientation, dims, flipped", [
    (("bg", "liver", "kidney"), "PIR", 3, (0, 1, 2)),  # nothing lateral: every axis
    (("bg", "kidney_left", "kidney_right"), "PIR", 3, (0, 1)),  # the left-right axis is the third in PIR
    (("bg", "Left lung", "lung_r"), "RAS", 3, (1, 2)),
    (("bg", "vertebrae_L1", "vertebrae_L2"), "RAS", 3, (0, 1, 2)),  # L1 is a level, not a side
    (("bg", "kidney_l", "kidney_r"), "RAS", 2, (1,)),  # slice mode along z: in-plane A-P only
])
def test_no_left_right_mirroring_for_lateral_labels(names, orientation, dims, flipped):
    """Training flips and mirroring TTA skip the left-right axis when a label is lateral: a flipped
    left kidney would still be labelled left, teaching the network to confuse the sides."""
    import torch

    from volseg.data.transforms import cached_transforms, mirror_axes, random_transforms
    from volseg.inference.tta import mirror_flips

    patch = (8, 8, 8) if dims == 3 else (8, 8)
    plan = PreprocessingPlan(spacing=(1, 1, 1), orientation=orientation, channels=("MR",), norms=(), label_values=(0, 1, 2), label_names=names,
                spatial_dims=dims, patch_size=patch, slice_axis=2)
    assert mirror_axes(plan) == list(flipped)
    cfg = load_config(None, [f"model.spatial_dims={dims}", f"data.patch_size={list(patch)}", "augment.flip_prob=1"] + _augment(0, but="flip_prob"))
    image = torch.arange(8 * 8 * (8 if dims == 3 else 1), dtype=torch.float32).reshape(1, 8, 8, -1)
    label = torch.ones(1, *image.shape[1:], dtype=torch.uint8)
    out = random_transforms(plan, cfg, 1)(cached_transforms(plan)({"image": image, "label": label}))[0]["image"]
    want = image if dims == 3 else image[..., 0]
    want = torch.flip(want, [1 + (a if dims == 3 else [0, 1].index(a)) for a in flipped])
    assert torch.equal(torch.as_tensor(out), want)
    tta = mirror_flips(plan, True)
    assert sorted({d for f in tta for d in f}) == [2 + a for a in flipped] and len(tta) == 2 ** len(flipped)
