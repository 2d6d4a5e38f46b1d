"""Figures: axes counts, spacing-true aspect ratios, saving, and the HTML run report."""

import sys

import numpy as np
import pytest
import SimpleITK as sitk

from volseg import viz
from volseg.evaluation import evaluate, write_report

SPACING = (1.0, 1.0, 3.0)  # (x, y, z) mm, as SimpleITK
SHAPE = (9, 14, 17)  # [z, y, x]


@pytest.fixture(scope="module")
def volumes():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 100, SHAPE).astype(np.float32)
    truth = np.zeros(SHAPE, np.uint8)
    truth[2:6, 3:9, 4:12] = 1
    truth[6:8, 9:12, 10:14] = 2
    pred = truth.copy()
    pred[2:6, 3:9, 4:6] = 0  # false negatives
    pred[1, 3:9, 4:12] = 1  # false positives
    pred[6:8, 9:12, 10:12] = 1  # wrong class
    return image, pred, truth


def test_overlay_views_and_aspect(volumes):
    image, _, truth = volumes
    fig = viz.overlay(image, truth, SPACING, labels={1: "liver", 2: "tumour"})
    assert len(fig.axes) == 3
    # row height / column width in mm: axial y/x, coronal z/x, sagittal z/y
    assert [ax.get_aspect() for ax in fig.axes] == pytest.approx([1.0, 3.0, 3.0])
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"liver", "tumour"}
    img = sitk.GetImageFromArray(image)
    img.SetSpacing((0.5, 2.0, 4.0))
    fig = viz.overlay(img, truth, slices=(1, 2, 3))  # spacing taken from the sitk image
    assert [ax.get_aspect() for ax in fig.axes] == pytest.approx([4.0, 8.0, 2.0])
    assert fig.axes[0].get_title().endswith("z=1")


def test_error_map_montage_browse_save(volumes, tmp_path, monkeypatch):
    image, pred, truth = volumes
    fig = viz.error_map(image, pred, truth, SPACING)
    assert len(fig.axes) == 3 and fig.axes[1].get_aspect() == pytest.approx(3.0)
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    for kind in ("false positive", "false negative", "wrong class"):
        assert kind in legend
    m = viz.montage(image, truth, SPACING, axis="coronal", n=5)
    assert len(m.axes) == 5 and all(ax.get_aspect() == pytest.approx(3.0) for ax in m.axes)
    assert len(viz.montage(image, None, SPACING, axis=0, n=40).axes) == SHAPE[0]
    with pytest.raises(ValueError, match="axial"):
        viz.montage(image, truth, SPACING, axis="transverse")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails: static fallback
    assert len(viz.browse(image, truth, SPACING).axes) == 9
    out = viz.save_figure(fig, tmp_path / "err.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write(arr, path):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def test_training_curves_tolerate_gaps(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,train_loss,val_dice_mean,val_dice_liver,lr\n1,0.9,,,0.01\n2,0.7,0.5,0.4,0.005\n3,0.6,nan,,\n", encoding="utf-8")
    fig = viz.plot_training_curves(csv)
    assert len(fig.axes) == 3 and fig.axes[2].get_yscale() == "log"
    (tmp_path / "m2.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n", encoding="utf-8")
    assert len(viz.plot_training_curves(tmp_path / "m2.csv").axes) == 2


def test_write_report(tmp_path, volumes):
    image, pred, truth = volumes
    run = tmp_path / "run"
    _write(image, run / "images" / "case_a.nii.gz")
    _write(truth, run / "truth" / "case_a.nii.gz")
    _write(pred, run / "preds" / "case_a_seg.nii.gz")
    (run / "metrics.csv").write_text("epoch,train_loss,val_dice_mean,lr\n1,0.9,0.2,0.01\n2,0.5,,0.01\n", encoding="utf-8")
    evaluate(run / "preds", run / "truth", labels={0: "bg", 1: "liver", 2: "tumour"}, output=run / "eval", images=run / "images")
    html = write_report(run).read_text(encoding="utf-8")
    assert html.count('<img alt="') >= 3 and '<img alt="training curves" src="data:image/png;base64,' in html
    assert "<table>" in html and "<td>tumour</td>" in html and "case_a" in html
    # no evaluation folder: still a report, with a note
    out = write_report(run, eval_dir=tmp_path / "nowhere", output=tmp_path / "r.html")
    assert "metrics.csv: no such file" in out.read_text(encoding="utf-8")


def test_plot_metric_per_class_counts_nan():
    rows = [{"class": "liver", "dice": 0.9}, {"class": "liver", "dice": 0.8}, {"class": "tumour", "dice": float("nan")}, {"class": "tumour", "dice": 0.4}]
    fig = viz.plot_metric_per_class(rows, "dice")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["liver", "tumour\n(1 NaN)"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 3  # one dot per finite value
    with pytest.raises(ValueError, match="no rows to plot 'dice'"):
        viz.plot_metric_per_class([], "dice")
