"""A tiny tumour run in region mode with sparse labels, end to end: the run folder records the
mode, inference paints the regions (never the ignore value), evaluation and export carry the
regions, and ``--pretrained`` fine-tunes from a run, a checkpoint and an exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from volseg.cli import main
from volseg.config import load_config
from volseg.data.synth import make_tumor_dataset

TUMOR_TINY = [
    "model.features=[4,8]",
    "model.norm=instance",
    "data.patch_size=[16,16,16]",
    "data.samples_per_volume=2",
    "data.val_fraction=0.25",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.batch_size=2",
    "infer.overlap=0.25",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tumor_run(tmp_path_factory):
    from volseg.training import train

    root = tmp_path_factory.mktemp("tumor")
    data = make_tumor_dataset(root / "data", cases=4, test_cases=1, shape=(24, 24, 20), sparse=3, seed=1)
    run = train(data, load_config(None, TUMOR_TINY), root / "run", device="cpu")
    return data, run


def test_run_folder_records_regions_and_ignore(tumor_run):
    _, run = tumor_run
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    assert plan["regions"] == [[1, 2, 3], [2, 3], [3]] and plan["regions_class_order"] == [1, 2, 3] and plan["ignore_label"] == 4
    header = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "val_dice_whole tumor" in header and "val_dice_enhancing tumor" in header


def test_infer_evaluate_export_in_region_mode(tumor_run, tmp_path, capsys):
    data, run = tumor_run
    test_image = Path(data).parent / "imagesTs" / "tumor_004.nii.gz"
    out = tmp_path / "pred"
    assert main(["-q", "infer", str(test_image), "--model", str(run), "--output", str(out), "--device", "cpu", "--probabilities"]) == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "tumor_004_seg.nii.gz")))
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3}  # never the ignore value 4
    prob = sitk.ReadImage(str(out / "tumor_004_prob.nii.gz"))
    assert prob.GetDimension() == 4 and prob.GetSize()[3] == 3  # one probability per region
    sidecar = json.loads((out / "tumor_004_seg.json").read_text(encoding="utf-8"))
    assert sidecar["regions"] == {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}

    assert main(["-q", "evaluate", "--pred", str(out), "--truth", str(data), "--output", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text(encoding="utf-8"))
    assert {"whole tumor", "tumor core", "enhancing tumor"} <= set(json.dumps(summary).split('"'))

    assert main(["-q", "export", str(run), "--output", str(tmp_path / "m.ts.pt")]) == 0
    meta = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert meta["output"]["activation"] == "sigmoid" and meta["output"]["regions_class_order"] == [1, 2, 3]
    net = torch.jit.load(str(tmp_path / "m.ts.pt"))
    p = net(torch.randn(1, 1, 16, 16, 16))
    assert p.shape == (1, 3, 16, 16, 16) and float(p.min()) >= 0 and float(p.max()) <= 1
    capsys.readouterr()


def test_pretrained_from_run_checkpoint_and_export(tumor_run, tmp_path, capsys):
    data, run = tumor_run
    sets = sum((["--set", s] for s in TUMOR_TINY + ["train.steps_per_epoch=1"]), [])
    assert main(["-q", "export", str(run), "--output", str(tmp_path / "m.ts.pt")]) == 0
    from volseg.nets import build_network
    from volseg.runfolder import read_config, read_plan
    from volseg.training.pretrained import load_pretrained

    cfg, plan = read_config(run), read_plan(run)
    for source in (run, run / "last.pt", tmp_path / "m.ts.pt"):
        net = build_network(cfg.model, 1, plan.out_channels)
        record = load_pretrained(net, source, plan)
        assert record["head"] == "reused"
        want = torch.load(run / "best.pt" if source == run and (run / "best.pt").is_file() else run / "last.pt", weights_only=True)["model"]
        got = net.state_dict()
        assert record["tensors_loaded"] == len(want) and all(torch.equal(got[k], want[k]) for k in want)
    out = tmp_path / "from_run"
    assert main(["-q", "train", str(data), "--output", str(out), "--device", "cpu", "--pretrained", str(run)] + sets) == 0
    assert json.loads((out / "pretrained.json").read_text(encoding="utf-8"))["source"] == str(run.resolve())
    # another label set (one class per label, softmax): the head is re-initialised and says so
    man = json.loads(Path(data).read_text(encoding="utf-8"))
    man["labels"] = {"0": "background", "1": "edema", "2": "necrosis", "3": "enhancing", "4": "ignore"}
    del man["regions_class_order"]
    labels_manifest = Path(data).with_name("labels.json")
    labels_manifest.write_text(json.dumps(man), encoding="utf-8")
    out = tmp_path / "relabelled"
    assert main(["-q", "train", str(labels_manifest), "--output", str(out), "--device", "cpu", "--pretrained", str(run)] + sets) == 0
    assert json.loads((out / "pretrained.json").read_text(encoding="utf-8"))["head"] == "reinitialised"
    # another network: one line listing the mismatched tensors
    code = main(["-q", "train", str(data), "--output", str(tmp_path / "other"), "--device", "cpu", "--pretrained", str(run)] + sets
                + ["--set", "model.features=[4,16]"])
    err = capsys.readouterr().err
    assert code == 2 and "mismatched tensors" in err and "encoders.1" in err and len(err.strip().splitlines()) == 1
