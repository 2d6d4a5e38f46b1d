"""The run folder as the contract: a damaged plan.json is refused by name, never replayed."""

from __future__ import annotations

import json
import shutil

import pytest

from volseg.cli import main
from volseg.runfolder import RunFolderError, read_plan


def _damage(plan: dict, what: str) -> dict:
    plan = json.loads(json.dumps(plan))
    if what == "nan std":
        plan["norms"][0]["std"] = float("nan")
    elif what == "zero std":
        plan["norms"][0]["std"] = 0.0
    elif what == "duplicate labels":
        plan["label_values"][-1] = plan["label_values"][-2]
    elif what == "zero patch":
        plan["patch_size"][0] = 0
    elif what == "patch length":
        plan["patch_size"] = plan["patch_size"][:1]
    elif what == "negative spacing":
        plan["spacing"][2] = -1.0
    elif what == "unknown key":
        plan["spaceing"] = plan["spacing"]
    elif what == "bad orientation":
        plan["orientation"] = "RAR"
    elif what == "names":
        plan["label_names"] = plan["label_names"][:-1]
    return plan


DAMAGE = ["nan std", "zero std", "duplicate labels", "zero patch", "patch length", "negative spacing", "unknown key", "bad orientation", "names"]


@pytest.mark.parametrize("what", DAMAGE)
def test_a_damaged_plan_is_refused_by_name(what, tiny_run, tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("val_predictions", "tb", "*.log"))
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    (run / "plan.json").write_text(json.dumps(_damage(plan, what)), encoding="utf-8")
    with pytest.raises(RunFolderError, match="plan.json"):
        read_plan(run)
    scan = next(p for p in sorted(tiny_dataset.parent.rglob("*.nii.gz")) if "label" not in str(p))
    out = tmp_path / "pred"
    assert main(["infer", str(scan), "--model", str(run), "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "plan.json" in err and "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*_seg.nii.gz"))


def test_the_plan_training_writes_reads_back(tiny_run):
    plan = read_plan(tiny_run)
    assert plan.to_json() == (tiny_run / "plan.json").read_text(encoding="utf-8")
