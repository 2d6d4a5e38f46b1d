"""Metrics against hand-computed values on tiny anisotropic volumes, and evaluate() end to end.

Arrays are [z, y, x]; ``evaluate_case`` takes spacing in the same order, so (3, 1, 1) means
3 mm slices; files carry SimpleITK spacing (x, y, z) = (1, 1, 3).
"""

import json
import logging
import math

import numpy as np
import pytest
import SimpleITK as sitk

from volseg.evaluation import EvaluationError, evaluate, evaluate_case, format_summary_table, load_results, summarize

SP_ZYX = (3.0, 1.0, 1.0)
SHAPE = (7, 9, 11)  # odd sizes, distinct per axis


def _one(pred, truth, spacing=SP_ZYX, tol=2.0):
    (row,) = evaluate_case(pred, truth, spacing, {0: "background", 1: "organ"}, tolerance_mm=tol)
    return row


def _plate(z, x0=2, x1=7):
    a = np.zeros(SHAPE, np.uint8)
    a[z, 1:5, x0:x1] = 1  # one voxel thick: every voxel is a surface voxel
    return a


def test_plates_one_slice_apart_are_three_mm_apart():
    row = _one(_plate(2), _plate(3))
    assert row["dice"] == 0 and row["iou"] == 0
    assert row["hd95"] == pytest.approx(3.0) and row["assd"] == pytest.approx(3.0)
    assert row["nsd"] == 0.0  # 3 mm > 2 mm tolerance
    assert _one(_plate(2), _plate(3), tol=3.0)["nsd"] == pytest.approx(1.0)
    # the same shift along x (1 mm voxels): 4 of 20 surface voxels per side are 1 mm off
    row = _one(_plate(2), _plate(2, 3, 8))
    assert row["dice"] == pytest.approx(2 * 16 / 40) and row["iou"] == pytest.approx(16 / 24)
    assert row["hd95"] == pytest.approx(1.0) and row["assd"] == pytest.approx(8 / 40)
    assert row["nsd"] == pytest.approx(1.0)


def test_cubes_offset_by_one_slice():
    a, b = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    a[0:3, 2:5, 3:6] = 1
    b[1:4, 2:5, 3:6] = 1
    row = _one(a, b)
    # 18 shared voxels of 27 each
    assert row["dice"] == pytest.approx(36 / 54) and row["iou"] == pytest.approx(18 / 36)
    assert row["volume_pred_ml"] == pytest.approx(27 * 3 / 1000) and row["volume_true_ml"] == pytest.approx(0.081)
    # 26 surface voxels per cube: 16 shared (0 mm), the outer face (9 voxels) 3 mm away, and the
    # centre of the inner face 1 mm from the other cube's ring; the same both ways.
    assert row["assd"] == pytest.approx(2 * (9 * 3 + 1) / 52, rel=1e-5)
    assert row["hd95"] == pytest.approx(3.0)
    assert row["nsd"] == pytest.approx(34 / 52, rel=1e-5)


def test_multiclass_noncontiguous_labels_and_volume():
    pred, truth = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    truth[1:3, 1:3, 1:3] = 4
    pred[1:3, 1:3, 1:3] = 4
    truth[4:6, 4:7, 4:8] = 2
    pred[4:6, 4:7, 4:6] = 2  # half of class 2
    rows = evaluate_case(pred, truth, (2.0, 0.5, 1.5), {0: "bg", 2: "b", 4: "d"})
    assert [r["label"] for r in rows] == [2, 4]
    r2, r4 = rows
    assert r2["dice"] == pytest.approx(2 * 12 / 36) and r4["dice"] == pytest.approx(1.0)
    assert r4["hd95"] == 0 and r4["assd"] == 0
    assert r2["volume_true_ml"] == pytest.approx(24 * 2 * 0.5 * 1.5 / 1000)


def test_empty_mask_convention():
    empty, blob = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    blob[2:4, 2:4, 2:4] = 1
    both = _one(empty, empty)
    assert (both["dice"], both["iou"], both["nsd"], both["hd95"], both["assd"]) == (1, 1, 1, 0, 0)
    for pred, truth in ((empty, blob), (blob, empty)):
        row = _one(pred, truth)
        assert (row["dice"], row["iou"], row["nsd"]) == (0, 0, 0)
        assert math.isnan(row["hd95"]) and math.isnan(row["assd"])
    rows = [dict(_one(empty, blob), case="a"), dict(_one(blob, blob), case="b")]
    s = summarize(rows, {1: "organ"})["classes"]["organ"]
    assert s["hd95"] == {"mean": 0.0, "sd": 0.0, "n": 1, "n_nan": 1}
    assert s["dice"]["mean"] == pytest.approx(0.5) and s["dice"]["n"] == 2 and s["dice"]["n_nan"] == 0


def test_bad_inputs():
    a = np.zeros(SHAPE, np.uint8)
    with pytest.raises(EvaluationError, match="shape"):
        evaluate_case(a, a[:-1], SP_ZYX, {1: "x"})
    with pytest.raises(EvaluationError, match="spacing"):
        evaluate_case(a, a, (1.0, 1.0), {1: "x"})


def _write(arr, path, spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def test_geometry_mismatch_names_both_files(tmp_path):
    p = _write(_plate(2), tmp_path / "pred" / "case_a.nii.gz", spacing=(1.0, 1.0, 2.5))
    t = _write(_plate(2), tmp_path / "truth" / "case_a.nii.gz")
    with pytest.raises(EvaluationError) as exc:
        evaluate(p, t, labels={1: "organ"})
    assert str(p) in str(exc.value) and str(t) in str(exc.value) and "spacing" in str(exc.value)


def test_evaluate_folders_end_to_end(tmp_path, caplog):
    truth2 = _plate(3)
    truth2[5, 6:8, 6:9] = 2
    _write(_plate(3), tmp_path / "truth" / "case_a.nii.gz")
    _write(truth2, tmp_path / "truth" / "case_b.nii.gz")
    _write(_plate(2), tmp_path / "pred" / "case_a_seg.nii.gz")  # 1 slice = 3 mm off
    _write(_plate(3), tmp_path / "pred" / "case_b.nii.gz")  # class 2 missed: NaN distances
    _write(_plate(3), tmp_path / "pred" / "case_extra.nii.gz")
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        res = evaluate(tmp_path / "pred", tmp_path / "truth", labels={0: "bg", 1: "plate", 2: "blob"}, output=out, images={"case_a": "img_a.nii.gz"})
    assert "case_extra" in caplog.text  # a prediction without reference is reported, not evaluated
    assert [(r["case"], r["class"]) for r in res.rows] == [("case_a", "plate"), ("case_a", "blob"), ("case_b", "plate"), ("case_b", "blob")]
    assert res.rows[0]["hd95"] == pytest.approx(3.0)  # sitk spacing (x, y, z) reversed for [z, y, x]
    assert res.rows[0]["image_path"] == "img_a.nii.gz" and res.rows[2]["image_path"] == ""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    assert summary["classes"]["blob"]["hd95"] == {"mean": 0.0, "sd": 0.0, "n": 1, "n_nan": 1}  # case_a: both empty
    assert summary["classes"]["plate"]["dice"]["mean"] == pytest.approx(0.5)
    assert summary["mean_foreground_dice"] == pytest.approx((0.5 + 0.5) / 2)
    loaded = load_results(out)
    assert len(loaded.rows) == 4 and math.isnan(loaded.rows[3]["hd95"]) and loaded.rows[0]["pred_path"].endswith("case_a_seg.nii.gz")
    assert loaded.worst_cases() == ["case_a", "case_b"]
    table = format_summary_table(res)
    assert "plate" in table and "±" in table and "(1 NaN)" in table
    # labels inferred from the values when not given
    assert {r["class"] for r in evaluate(tmp_path / "pred", tmp_path / "truth").rows} == {"label_1", "label_2"}


def test_unmatched_cases_and_manifest(tmp_path, caplog):
    _write(_plate(3), tmp_path / "truth" / "case_a.nii.gz")
    _write(_plate(3), tmp_path / "truth" / "case_b.nii.gz")
    _write(_plate(3), tmp_path / "pred" / "case_a.nii.gz")
    with pytest.raises(EvaluationError, match="case_b"):
        evaluate(tmp_path / "pred", tmp_path / "truth", labels={1: "p"})
    with caplog.at_level(logging.WARNING):
        assert len(evaluate(tmp_path / "pred", tmp_path / "truth", labels={1: "p"}, allow_missing=True).rows) == 1
    assert "case_b" in caplog.text
    stray = _write(_plate(3), tmp_path / "other" / "zzz.nii.gz")
    with pytest.raises(EvaluationError, match="no prediction"):
        evaluate(stray, tmp_path / "truth", labels={1: "p"})
    # a manifest: labelled test cases, its labels and image paths
    manifest = {
        "name": "t", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "plate"},
        "training": [{"image": "img/case_b.nii.gz", "label": "truth/case_b.nii.gz"}],
        "test": [{"image": "img/case_a.nii.gz", "label": "truth/case_a.nii.gz"}],
    }  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(manifest), encoding="utf-8")
    res = evaluate(tmp_path / "pred", tmp_path / "dataset.json")
    assert [(r["case"], r["class"], r["dice"]) for r in res.rows] == [("case_a", "plate", 1.0)]
    assert res.rows[0]["image_path"] == str(tmp_path / "img" / "case_a.nii.gz")
    # training fallback (no labelled test cases): only the predicted cases; images from a manifest
    manifest["test"] = ["img/case_c.nii.gz"]
    manifest["training"].append({"image": "img/case_a.nii.gz", "label": "truth/case_a.nii.gz"})
    (tmp_path / "train.json").write_text(json.dumps(manifest), encoding="utf-8")
    res = evaluate(tmp_path / "pred", tmp_path / "train.json", labels=tmp_path / "train.json", images=tmp_path / "dataset.json")
    assert [(r["case"], r["image_path"]) for r in res.rows] == [("case_a", str(tmp_path / "img" / "case_a.nii.gz"))]
