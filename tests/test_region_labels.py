"""Region labels and the ignore label: manifests (both conventions, bad ones refused), the plan
record, the masked loss (exact), sampling, inference painting, per-region metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from volseg.data.io import write_image
from volseg.data.manifest import ManifestError, load_manifest, validate_cases
from volseg.data.plan import IGNORE_INDEX, ChannelNorm, PreprocessingPlan
from volseg.training.loss import MaskedDiceCE, build_loss

BRATS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}


def _manifest(root: Path, labels, order=None, label_arrays=None) -> Path:
    training = []
    for i, lab in enumerate(label_arrays if label_arrays is not None else [np.arange(4, dtype=np.uint8).repeat(16).reshape(4, 4, 4)]):
        img = sitk.GetImageFromArray(lab.astype(np.float32))
        write_image(img, root / f"c{i}.nii.gz")
        write_image(sitk.GetImageFromArray(lab.astype(np.uint8)), root / f"c{i}_lab.nii.gz")
        training.append({"image": f"c{i}.nii.gz", "label": f"c{i}_lab.nii.gz"})
    m = {"name": "t", "modality": {"0": "MRI"}, "labels": labels, "training": training}
    if order is not None:
        m["regions_class_order"] = order
    (root / "dataset.json").write_text(json.dumps(m), encoding="utf-8")
    return root / "dataset.json"


def _plan(regions=(), names=(), order=(), ignore=None, values=(0, 1, 2, 3)) -> PreprocessingPlan:
    return PreprocessingPlan(spacing=(1.0, 1.0, 1.0), orientation="RAS", channels=("MRI",), norms=(ChannelNorm("zscore"),),
                             label_values=tuple(values), label_names=tuple(f"l{v}" for v in values), spatial_dims=3,
                             patch_size=(8, 8, 8), slice_axis=2, regions=tuple(regions), region_names=tuple(names),
                             regions_class_order=tuple(order), ignore_label=ignore)


REGION_PLAN = dict(regions=((1, 2, 3), (2, 3), (3,)), names=("wt", "tc", "et"), order=(1, 2, 3))


# -- manifests ---------------------------------------------------------------------------------
def test_nnunet_region_labels_and_ignore_are_read(tmp_path):
    m = load_manifest(_manifest(tmp_path, {**BRATS, "ignore": 4}, [1, 2, 3]))
    assert m.regions == (("whole tumor", (1, 2, 3)), ("tumor core", (2, 3)), ("enhancing tumor", (3,)))
    assert m.regions_class_order == (1, 2, 3) and m.ignore_label == 4
    assert sorted(m.labels) == [0, 1, 2, 3] and 4 not in m.labels


def test_nnunet_plain_labels_and_msd_ignore(tmp_path):
    m = load_manifest(_manifest(tmp_path, {"background": 0, "liver": 1, "ignore": 2}))
    assert m.labels == {0: "background", 1: "liver"} and m.ignore_label == 2 and m.regions == ()
    m = load_manifest(_manifest(tmp_path, {"0": "background", "1": "liver", "5": "ignore"}))
    assert m.labels == {0: "background", 1: "liver"} and m.ignore_label == 5


def test_msd_labels_unchanged(tmp_path):
    m = load_manifest(_manifest(tmp_path, {"0": "background", "1": "a", "2": "b"}))
    assert m.labels == {0: "background", 1: "a", 2: "b"} and m.regions == () and m.ignore_label is None


@pytest.mark.parametrize("labels, order, words", [
    ({"background": 0, "a": [1, 2], "b": [2, 3]}, [1, 3], ["'a' [1, 2] and 'b' [2, 3] overlap"]),
    (BRATS, [1, 2, 5], ["regions_class_order' values [5] are in no region"]),
    (BRATS, None, ["'regions_class_order' None"]),
    (BRATS, [1, 2], ["has 2 entries for 3 regions"]),
    (BRATS, [1, 3, 2], ["paints region 'enhancing tumor' [3] with 2"]),
    ({"background": 0, "et": 3, "tc": [2, 3], "wt": [1, 2, 3]}, [3, 2, 1], ["paints label values back as {2: 1, 3: 1}"]),
    ({"background": 0, "a": 1, "ignore": 1, "b": 2}, None, ["ignore=1 must be the highest label value"]),
    ({"0": "background", "1": "ignore", "2": "a"}, None, ["ignore=1 must be the highest label value"]),
    ({**BRATS, "ignore": [4, 5]}, [1, 2, 3], ["ignore label is one integer value"]),
    ({"background": 0, "a": 1}, [1], ["no label is a region"]),
])
def test_bad_region_manifests_one_line_each(tmp_path, labels, order, words):
    with pytest.raises(ManifestError) as e:
        load_manifest(_manifest(tmp_path, labels, order))
    for w in words:
        assert w in str(e.value)


def test_region_value_absent_from_data_is_refused(tmp_path):
    arrays = [np.array([0, 1, 2, 2], np.uint8).repeat(16).reshape(4, 4, 4)]  # no 3 anywhere
    m = load_manifest(_manifest(tmp_path, BRATS, [1, 2, 3], arrays))
    with pytest.raises(ManifestError, match=r"name label values \[3\] that no label map holds"):
        validate_cases(m, m.training)


def test_ignore_value_is_allowed_in_label_files(tmp_path):
    arrays = [np.array([0, 1, 4, 4], np.uint8).repeat(16).reshape(4, 4, 4)]
    m = load_manifest(_manifest(tmp_path, {"background": 0, "a": 1, "ignore": 4}, None, arrays))
    validate_cases(m, m.training)


# -- the plan record --------------------------------------------------------------------------
def test_plan_records_the_mode_and_a_plain_plan_is_unchanged():
    plain = _plan()
    assert "regions" not in plain.to_json() and "ignore_label" not in plain.to_json()
    assert PreprocessingPlan.from_json(plain.to_json()) == plain
    reg = _plan(**REGION_PLAN, ignore=4)
    back = PreprocessingPlan.from_json(reg.to_json())
    assert back == reg and back.out_channels == 3 and back.sigmoid and not back.binary
    bad = json.loads(reg.to_json())
    bad["regions_class_order"] = [1, 2, 2]
    with pytest.raises(ValueError, match="regions_class_order"):
        PreprocessingPlan.from_json(json.dumps(bad))


def test_preprocessing_maps_ignore_to_its_index():
    from volseg.preprocessing import preprocess

    lab = np.array([0, 1, 4, 3], np.uint8).repeat(16).reshape(4, 4, 4)
    img = sitk.GetImageFromArray(lab.astype(np.float32))
    out = preprocess([img], _plan(ignore=4), sitk.GetImageFromArray(lab))
    assert sorted(np.unique(out["label"]).tolist()) == [0, 1, 3, IGNORE_INDEX]


# -- the loss ---------------------------------------------------------------------------------
def _grads(loss_fn, logits, *args):
    x = logits.clone().requires_grad_(True)
    loss = loss_fn(x, *args)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("mode", ["labels", "binary", "regions"])
def test_masked_loss_is_exact(mode):
    """Changing only the ignored voxels' labels leaves loss and gradients bit-identical, the
    ignored voxels' logits get zero gradient, and the loss equals the loss of the annotated part
    alone."""
    g = torch.Generator().manual_seed(0)
    k = {"labels": 4, "binary": 1, "regions": 3}[mode]
    classes = 2 if mode == "binary" else 4
    regions = [[1, 2, 3], [2, 3], [3]] if mode == "regions" else None
    loss_fn = MaskedDiceCE(regions, binary=mode == "binary")
    logits = torch.randn(2, k, 6, 6, 8, generator=g)
    label = torch.randint(0, classes, (2, 1, 6, 6, 8), generator=g).float()
    valid = torch.zeros_like(label, dtype=torch.bool)
    valid[..., ::3] = True  # every third slice annotated
    other = torch.where(valid, label, torch.randint(0, classes, label.shape, generator=g).float())
    assert not torch.equal(other, label)
    l1, g1 = _grads(loss_fn, logits, label, valid)
    l2, g2 = _grads(loss_fn, logits, other, valid)
    l3, g3 = _grads(loss_fn, logits, torch.where(valid, label, torch.full_like(label, IGNORE_INDEX)))  # the ignore index itself
    assert torch.equal(l1, l2) and torch.equal(g1, g2) and torch.equal(l1, l3) and torch.equal(g1, g3)
    assert torch.count_nonzero(g1.movedim(1, 0)[:, ~valid[:, 0]]) == 0
    part, _ = _grads(loss_fn, logits[..., ::3].contiguous(), label[..., ::3].contiguous())  # nothing ignored there
    assert torch.allclose(l1, part, atol=1e-6)


def test_plain_plan_keeps_monai_dice_ce():
    from monai.losses import DiceCELoss

    assert isinstance(build_loss(_plan(), 1.0, 1.0), DiceCELoss)
    assert isinstance(build_loss(_plan(ignore=4), 1.0, 1.0), MaskedDiceCE)


# -- sampling ---------------------------------------------------------------------------------
def test_sampling_never_centres_on_ignored_voxels_and_balances_regions():
    from volseg.data.transforms import cached_transforms, class_ratios

    lab = np.zeros((1, 8, 8, 8), np.uint8)
    lab[0, 1:7, 1:7, 1:7] = 1
    lab[0, 3:5, 3:5, 3:5] = 3
    lab[0, :, :, ::2] = IGNORE_INDEX
    ignored = set(np.flatnonzero(lab[0] == IGNORE_INDEX).tolist())
    for plan in (_plan(ignore=4), _plan(**REGION_PLAN, ignore=4)):
        out = cached_transforms(plan)({"image": np.zeros((1, 8, 8, 8), np.float32), "label": lab})
        lists = [set(np.asarray(i).tolist()) for i in out["label_cls_indices"]]
        assert len(lists) == (4 if plan.has_regions else plan.num_classes) == len(class_ratios(plan, None))
        assert all(not (s & ignored) for s in lists)
        assert sum(len(s) for s in lists[:1]) == int((lab[0] == 0).sum())
    assert lists[1] >= lists[3] and lists[3] == set(np.flatnonzero(lab[0] == 3).tolist())  # region nesting: et inside wt


# -- inference and metrics ---------------------------------------------------------------------
def test_restore_paints_regions_in_order():
    from volseg.preprocessing import restore_labels

    ref = sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32))
    probs = np.zeros((3, 8, 8, 8), np.float32)
    probs[0, 1:7, 1:7, 1:7] = 0.9  # whole tumour
    probs[1, 2:6, 2:6, 2:6] = 0.8  # core
    probs[2, 3:5, 3:5, 3:5] = 0.7  # enhancing
    labels = restore_labels(probs, _plan(**REGION_PLAN, ignore=4), ref)  # [z, y, x]
    assert labels[0, 0, 0] == 0 and labels[1, 1, 1] == 1 and labels[2, 2, 2] == 2 and labels[4, 4, 4] == 3
    assert 4 not in np.unique(labels)


def test_dice_per_region_skips_ignored_voxels():
    from volseg.metrics import dice_per_output

    plan = _plan(**REGION_PLAN, ignore=4)
    truth = np.array([0, 1, 2, 3, IGNORE_INDEX, IGNORE_INDEX])
    pred = np.array([0, 1, 2, 3, 3, 1], np.uint8)  # wrong only where nothing is known
    names, dice = dice_per_output(pred, truth, plan)
    assert names == ["wt", "tc", "et"] and dice == [1.0, 1.0, 1.0]
    names, dice = dice_per_output(pred, truth, _plan(ignore=4))
    assert dice == [1.0, 1.0, 1.0]


def test_evaluate_reports_the_manifest_regions(tmp_path):
    from volseg.evaluation import evaluate

    truth = np.array([0, 1, 2, 3], np.uint8).repeat(16).reshape(4, 4, 4)
    m = _manifest(tmp_path, {**BRATS, "ignore": 4}, [1, 2, 3], [np.where(np.arange(64).reshape(4, 4, 4) % 7 == 0, 4, truth)])
    pred = truth.copy()
    pred[3] = 2  # enhancing predicted as core: wt and tc right, et missed
    (tmp_path / "pred").mkdir()
    write_image(sitk.GetImageFromArray(pred), tmp_path / "pred" / "c0.nii.gz")
    res = evaluate(tmp_path / "pred", m)
    dice = {r["class"]: r["dice"] for r in res.rows}
    assert set(dice) == {"whole tumor", "tumor core", "enhancing tumor"}
    assert dice["whole tumor"] == 1.0 and dice["tumor core"] == 1.0 and dice["enhancing tumor"] == 0.0
