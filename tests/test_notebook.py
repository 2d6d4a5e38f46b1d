"""notebooks/explore_predictions.ipynb runs top to bottom, from its own folder, on a real tiny run
made the way `volseg demo` makes one (train -> infer -> evaluate), with relative CLI paths."""

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from volseg.cli import main  # noqa: E402
from volseg.evaluation import load_results  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_predictions.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "VOLSEG_RUN_DIR" in code[0].source and "VOLSEG_EVAL_DIR" in code[0].source


@pytest.fixture(scope="module")
def evaluated_run(tiny_run, tiny_dataset, tmp_path_factory):
    """``tiny_run`` + `volseg infer` + `volseg evaluate` run from a working folder with relative
    paths (as `make demo` does from the checkout), so ``metrics.csv`` records relative inputs."""
    work = tmp_path_factory.mktemp("work")
    manifest = os.path.relpath(tiny_dataset, work)
    old = os.getcwd()
    os.chdir(work)
    try:
        assert main(["-q", "infer", manifest, "--model", os.path.relpath(tiny_run, work), "--output", "predictions", "--device", "cpu"]) == 0
        assert main(["-q", "evaluate", "--pred", "predictions", "--truth", manifest, "--images", manifest, "--output", "eval"]) == 0
    finally:
        os.chdir(old)
    return tiny_run, work / "eval"


def test_recorded_paths_resolve_from_anywhere(evaluated_run, tmp_path, monkeypatch):
    _, eval_dir = evaluated_run
    monkeypatch.chdir(tmp_path)  # not the folder evaluate ran in
    rows = load_results(eval_dir).rows
    assert rows
    for r in rows:
        for key in ("pred_path", "truth_path", "image_path"):
            assert Path(r[key]).is_absolute() and Path(r[key]).is_file(), (key, r[key])


def test_notebook_runs_from_its_folder_on_a_real_run(evaluated_run, monkeypatch):
    run, eval_dir = evaluated_run
    # the kernel inherits this process's environment and starts in notebooks/; the folders are
    # given relative to the checkout root, as in the README's `VOLSEG_RUN_DIR=demo/run`
    monkeypatch.setenv("VOLSEG_RUN_DIR", os.path.relpath(run, NOTEBOOK.parents[1]))
    monkeypatch.setenv("VOLSEG_EVAL_DIR", os.path.relpath(eval_dir, NOTEBOOK.parents[1]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert str(run) in text and "liver" in text and "mean foreground dice" in text and "not found" not in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    n_cases = len({r["case"] for r in load_results(eval_dir).rows})
    # training curves + (overlay + error map) per drawn case
    assert len(pngs) >= 1 + 2 * min(n_cases, 3), json.dumps([repr(o.get("data", {}).keys()) for o in outputs])
    browser = outputs[-2].get("data", {})  # a slider with ipywidgets, else a static montage
    assert "application/vnd.jupyter.widget-view+json" in browser or "image/png" in browser
    viewer = outputs[-1].get("data", {})  # NiiVue with ipyniivue (the viewer extra), else a static overlay
    try:
        import ipyniivue  # noqa: F401

        assert "application/vnd.jupyter.widget-view+json" in viewer
    except ImportError:
        assert "image/png" in viewer
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    order = load_results(eval_dir).worst_cases()
    assert [html.index(c) for c in order] == sorted(html.index(c) for c in order)  # worst case first
