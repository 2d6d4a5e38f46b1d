"""notebooks/explore_predictions.ipynb runs top to bottom on a tiny fake run (via env vars)."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from volseg.evaluation import evaluate  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_predictions.ipynb"


def _write(arr, path):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "VOLSEG_RUN_DIR" in code[0].source and "VOLSEG_EVAL_DIR" in code[0].source


def test_notebook_runs_on_a_fake_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    rng = np.random.default_rng(1)
    for i, shift in enumerate((0, 2)):
        truth = np.zeros((8, 13, 15), np.uint8)
        truth[2:6, 3:10, 3:12] = 1
        truth[3:5, 5:8, 9:11] = 2
        pred = np.roll(truth, shift, axis=2)
        _write(rng.normal(size=truth.shape).astype(np.float32), run / "images" / f"case_{i}.nii.gz")
        _write(truth, run / "truth" / f"case_{i}.nii.gz")
        _write(pred, run / "preds" / f"case_{i}_seg.nii.gz")
    (run / "metrics.csv").write_text("epoch,train_loss,val_dice_mean,val_dice_organ,lr\n1,0.8,,,0.01\n2,0.6,0.7,0.7,0.008\n", encoding="utf-8")
    evaluate(run / "preds", run / "truth", labels={0: "bg", 1: "organ", 2: "lesion"}, output=run / "eval", images=run / "images")
    # the kernel inherits this process's environment
    monkeypatch.setenv("VOLSEG_RUN_DIR", str(run))
    monkeypatch.setenv("VOLSEG_EVAL_DIR", str(run / "eval"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert str(run) in text and "organ" in text and "mean foreground dice" in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    # curves + (overlay + error map) x 2 cases + the browser (montage without ipywidgets)
    assert len(pngs) >= 5, json.dumps([o.get("data", {}).keys().__repr__() for o in outputs])
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert html.index("case_1") < html.index("case_0")  # worst case first
