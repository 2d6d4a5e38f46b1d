"""Per-structure statistics: volumes from counts and spacing, intensities of the scan as read,
world coordinates, null for an empty label, one CSV for a batch."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import SimpleITK as sitk

import volseg
from volseg.stats import statistics_csv


def _scan():
    hu = np.full((6, 8, 10), -100.0)
    hu[1:3, 2:4, 3:6] = 50.0  # label 1: 2 x 2 x 3 = 12 voxels
    hu[4, 6, 8] = 400.0  # label 2, one voxel...
    hu[5, 0, 0] = 500.0  # ...and a second component
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing((0.5, 0.8, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # rotated 90 degrees in-plane
    labels = np.zeros(hu.shape, np.uint8)
    labels[hu == 50] = 1
    labels[hu >= 400] = 2
    return img, labels


def test_figures_match_counts_spacing_and_the_scan(tmp_path):
    img, labels = _scan()
    s = volseg.statistics(labels, img, {0: "bg", 1: "liver", 2: "spots", 3: "absent"}, case="c1", unit="HU")
    liver, spots, absent = s["labels"]["liver"], s["labels"]["spots"], s["labels"]["absent"]
    assert liver["voxels"] == 12 and liver["volume_ml"] == pytest.approx(12 * 0.5 * 0.8 * 2.0 / 1000)
    assert liver["intensity"]["mean"] == 50 and liver["intensity"]["std"] == 0 and liver["components"] == 1
    assert spots["voxels"] == 2 and spots["components"] == 2 and spots["intensity"]["median"] == 450
    # the centroid: the mean voxel centre, through the image's own index -> world mapping
    idx = np.argwhere(labels == 1)[:, ::-1].astype(float)
    world = np.array([img.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])
    assert np.allclose(liver["centroid_mm"], world.mean(axis=0))
    assert np.allclose(liver["bbox_mm"]["min"], world.min(axis=0)) and np.allclose(liver["bbox_mm"]["max"], world.max(axis=0))
    assert absent == {"label": 3, "voxels": 0, "volume_ml": 0.0, "intensity": None, "bbox_mm": None, "centroid_mm": None, "components": 0}
    assert "LPS" in s["coordinates"] and s["intensity_unit"] == "HU"
    json.dumps(s, allow_nan=False)  # JSON-ready: no NaN anywhere


def test_files_in_and_one_csv_row_per_case_and_label(tmp_path):
    img, labels = _scan()
    sitk.WriteImage(img, str(tmp_path / "scan.nii.gz"))
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(img)
    sitk.WriteImage(lab, str(tmp_path / "mask.nii.gz"))
    s = volseg.statistics(tmp_path / "mask.nii.gz", tmp_path / "scan.nii.gz", {0: "bg", 1: "liver", 2: "spots", 3: "absent"}, case="c1")
    assert s["labels"]["liver"]["voxels"] == 12
    rows = list(csv.DictReader(io.StringIO(statistics_csv([s, {**s, "case": "c2"}]))))
    assert len(rows) == 6 and rows[0]["name"] == "liver" and float(rows[0]["mean"]) == 50
    assert rows[2]["name"] == "absent" and rows[2]["mean"] == "" and rows[2]["volume_ml"] == "0"


def test_a_label_map_on_another_grid_is_refused(tmp_path):
    img, labels = _scan()
    lab = sitk.GetImageFromArray(labels)  # default origin/spacing: another grid
    with pytest.raises(ValueError, match="different voxel grids"):
        volseg.statistics(lab, img, {0: "bg", 1: "liver"})


def test_evaluate_shows_the_figures_next_to_the_overlap(tmp_path):
    from volseg.evaluation import evaluate, format_summary_table, load_results

    img, labels = _scan()
    for folder, arr in (("pred", labels), ("truth", np.where(labels == 2, 0, labels).astype(np.uint8))):
        (tmp_path / folder).mkdir()
        lab = sitk.GetImageFromArray(arr)
        lab.CopyInformation(img)
        sitk.WriteImage(lab, str(tmp_path / folder / "c1.nii.gz"))
    (tmp_path / "scans").mkdir()
    sitk.WriteImage(img, str(tmp_path / "scans" / "c1.nii.gz"))
    res = evaluate(tmp_path / "pred", tmp_path / "truth", labels={0: "bg", 1: "liver", 2: "spots"}, images=tmp_path / "scans", output=tmp_path / "ev")
    liver, spots = res.rows
    assert liver["class"] == "liver" and liver["mean_pred"] == 50 and liver["mean_true"] == 50 and liver["components_pred"] == 1
    assert spots["mean_pred"] == 450 and np.isnan(spots["mean_true"]) and spots["components_true"] == 0
    table = format_summary_table(res)
    assert "mean pred/true" in table and "450 / -" in table, table
    assert load_results(tmp_path / "ev").rows[0]["mean_pred"] == 50
