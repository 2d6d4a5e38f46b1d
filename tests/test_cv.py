"""Cross-validation: folds, fold ensembles (averaged probabilities, bounded memory), the
postprocessing learned from the folds' validation predictions, and their CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from volseg.cli import main
from volseg.config import InferConfig
from volseg.data.manifest import load_manifest
from volseg.data.plan import ChannelNorm, PreprocessingPlan
from volseg.inference import ModelBundle, Predictor
from volseg.runfolder import RunFolderError

from .conftest import TINY

CV_TINY = [s for s in TINY if not s.startswith(("train.epochs", "train.steps_per_epoch"))] + ["train.epochs=2", "train.steps_per_epoch=6"]


@pytest.fixture(scope="module")
def cv_parent(tiny_dataset, tmp_path_factory) -> Path:
    """Two folds trained one at a time through the CLI (the planned config, CV_TINY on top)."""
    parent = tmp_path_factory.mktemp("cv") / "parent"
    for k in (0, 1):
        args = ["-q", "train", str(tiny_dataset), "--folds", "2", "--output", str(parent), "--device", "cpu"]
        assert main(args + [a for s in CV_TINY + [f"data.fold={k}"] for a in ("--set", s)]) == 0
    return parent


def _dice(pred: np.ndarray, truth: np.ndarray, values) -> float:
    from volseg.metrics import dice_per_class

    return float(np.mean([dice_per_class((pred == v).astype(np.uint8), (truth == v).astype(np.uint8), 2)[0] for v in values]))


def test_folds_partition_the_training_cases_and_share_one_plan(cv_parent, tiny_dataset):
    man = load_manifest(tiny_dataset)
    names = {c.name for c in man.training}
    splits = [json.loads((cv_parent / f"fold_{k}" / "dataset.json").read_text()) for k in (0, 1)]
    vals = [set(s["validation"]) for s in splits]
    assert vals[0] and vals[1] and not vals[0] & vals[1] and vals[0] | vals[1] == names
    for s, v in zip(splits, vals):
        assert set(s["training"]) == names - v
    plans = [(cv_parent / p).read_text() for p in ("plan.json", "fold_0/plan.json", "fold_1/plan.json")]
    assert plans[0] == plans[1] == plans[2]
    assert json.loads((cv_parent / "cv.json").read_text())["folds"] == 2
    for k, v in enumerate(vals):  # each fold predicted its own held-out cases
        assert {p.name for p in (cv_parent / f"fold_{k}" / "val_predictions").iterdir()} == {f"{n}_seg.nii.gz" for n in v}
    assert "largest_component" in json.loads((cv_parent / "postprocessing.json").read_text())


def test_each_fold_logs_to_its_own_file_and_resume_skips_finished_folds(cv_parent, tiny_dataset, tmp_path):
    from volseg.workflows import train_folds

    assert "fold_1" not in (cv_parent / "fold_0" / "train.log").read_text()
    parent = shutil.copytree(cv_parent, tmp_path / "parent")
    (parent / "postprocessing.json").unlink()
    stamps = [(parent / f"fold_{k}" / "last.pt").stat().st_mtime_ns for k in (0, 1)]
    assert train_folds(tiny_dataset, None, parent, 2, resume=True, device="cpu") == parent
    assert [(parent / f"fold_{k}" / "last.pt").stat().st_mtime_ns for k in (0, 1)] == stamps  # nothing retrained
    assert (parent / "postprocessing.json").is_file()


def test_fold_with_another_config_is_refused(cv_parent, tiny_dataset, capsys):
    args = ["train", str(tiny_dataset), "--folds", "2", "--output", str(cv_parent), "--device", "cpu", "--set", "data.fold=1",
            "--set", "train.lr=0.5"]
    assert main(args) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_folds_refuse_an_explicit_validation_list_and_too_few_cases(tiny_dataset, tmp_path):
    from volseg.config import load_config
    from volseg.data.manifest import ManifestError
    from volseg.workflows import train_folds

    data = json.loads(tiny_dataset.read_text())
    data = {**data, "training": [{k: str(tiny_dataset.parent / v) for k, v in e.items()} for e in data["training"]]}
    with_val = tmp_path / "with_val.json"
    with_val.write_text(json.dumps({**data, "training": data["training"][1:], "validation": data["training"][:1]}))
    with pytest.raises(ManifestError, match="validation"):
        train_folds(with_val, load_config(None, TINY), tmp_path / "a", 2, device="cpu")
    with pytest.raises(ManifestError, match="cannot make 5 folds"):
        train_folds(tiny_dataset, load_config(None, TINY), tmp_path / "b", 5, device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ensemble_averages_fold_probabilities_and_is_no_worse_than_its_worst_fold(cv_parent, tiny_dataset):
    from volseg.data.io import read_channels, read_label
    from volseg.preprocessing.pipeline import preprocess

    raw = {"largest_component": []}
    folds = [Predictor.from_run(cv_parent / f"fold_{k}", device="cpu", overrides=raw) for k in (0, 1)]
    ens = Predictor.from_run(cv_parent, device="cpu", overrides=raw)
    assert len(ens.models) == 2 and len(ens.run_info["ensemble"]) == 2
    man = load_manifest(tiny_dataset)
    values = [v for v in man.labels if v]
    scores = {"ens": [], 0: [], 1: []}
    for case in man.test:
        images = [img for p in case.images for img in read_channels(p)]
        x = preprocess(images, ens.plan)["image"]
        mean = (folds[0].probabilities(x).astype(np.float32) + folds[1].probabilities(x).astype(np.float32)) / 2
        np.testing.assert_allclose(ens.probabilities(x).astype(np.float32), mean, atol=2e-3)
        truth = sitk.GetArrayFromImage(read_label(case.label))
        scores["ens"].append(_dice(ens.predict(images)["labels"], truth, values))
        for k in (0, 1):
            scores[k].append(_dice(folds[k].predict(images)["labels"], truth, values))
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    assert means[0] > 0.02 and means[1] > 0.02, means  # the folds learned something (liver first, after 12 steps)
    assert means["ens"] >= min(means[0], means[1]) - 1e-6, means


class _FullVolumeCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Distinct tensor storages whose trailing dims are the whole preprocessed volume, and
    the largest tensor any op made (bytes)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.storages, self.largest = tuple(shape), set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
                if t.dim() >= 3 and tuple(t.shape[-3:]) == self.shape:
                    self.storages.add(t.untyped_storage().data_ptr())
        return out


def _toy_net(seed: int, k: int = 4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 6, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(6, k, 3, padding=1)).eval()


def test_ensemble_holds_the_buffers_of_one_model():
    """Three members stitch into the same buffers as one: no volume-sized tensor appears, and
    the largest allocation is the same (a window batch, or the ring)."""
    from monai.inferers import sliding_window_inference

    plan = PreprocessingPlan(spacing=(1.0, 1.0, 1.0), orientation="RAS", channels=("CT",), norms=(ChannelNorm("zscore"),), label_values=(0, 1, 2, 3),
                label_names=("bg", "a", "b", "c"), spatial_dims=3, patch_size=(16, 16, 8), slice_axis=2)
    x = torch.randn(1, 40, 36, 44)
    infer = InferConfig(crop="none", overlap=0.5, batch_size=2)
    counts = {}
    for n in (1, 3):
        pred = Predictor(ModelBundle.of([_toy_net(s) for s in range(n)], plan), infer, "cpu")
        with _FullVolumeCounter(x.shape[1:]) as c:
            pred.predict_index(x)
        counts[n] = (len(c.storages), c.largest)
    assert counts[3] == counts[1], counts
    with _FullVolumeCounter(x.shape[1:]) as c:  # the counter sees a whole-volume output when there is one
        with torch.no_grad():
            sliding_window_inference(x[None], (16, 16, 8), 2, _toy_net(0), 0.5, "gaussian")
    assert len(c.storages) >= 1


def test_ensemble_of_runs_with_different_plans_is_refused(cv_parent, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(cv_parent / "fold_1", other)
    plan = json.loads((other / "plan.json").read_text())
    plan["spacing"] = [2.0, 2.0, 3.0]
    (other / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(RunFolderError, match="spacing"):
        Predictor.from_run([cv_parent / "fold_0", other], device="cpu")


def _fake_run(tmp_path: Path, parent: Path, manifest: Path, islands: bool, one_kidney: bool = False) -> Path:
    """A run folder whose validation predictions are the phantoms' own labels, plus (with
    ``islands``) a spurious liver island and a spurious kidney island in background corners;
    ``one_kidney``: the smaller kidney is missed."""
    from scipy import ndimage

    run = tmp_path / (("islands" if islands else "clean") + ("_one_kidney" if one_kidney else ""))
    (run / "val_predictions").mkdir(parents=True)
    shutil.copy(parent / "plan.json", run / "plan.json")
    man = load_manifest(manifest)
    (run / "dataset.json").write_text(json.dumps({"manifest": str(manifest), "training": [], "validation": [c.name for c in man.training]}))
    for case in man.training:
        img = sitk.ReadImage(str(case.label))
        arr = sitk.GetArrayFromImage(img)
        if islands:
            assert not arr[:3, :3, :3].any() and not arr[-3:, -3:, -3:].any()
            arr[:3, :3, :3] = 1  # liver is one organ: the island only costs Dice
            arr[-3:, -3:, -3:] = 2  # kidneys are two: keeping the largest would drop one
        if one_kidney:
            parts, n = ndimage.label(arr == 2, structure=np.ones((3, 3, 3)))
            sizes = np.bincount(parts.ravel())[1:]
            assert n >= 2
            arr[(parts > 0) & (parts != 1 + int(np.argmax(sizes)))] = 0
            arr[-3:, -3:, -3:] = 2  # and an island: the largest-component step now gains on validation
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(run / "val_predictions" / f"{case.name}_seg.nii.gz"))
    return run


def test_postprocessing_switches_on_only_where_it_raises_dice(cv_parent, tiny_dataset, tmp_path):
    from volseg.postprocessing import learn_postprocessing

    assert learn_postprocessing(_fake_run(tmp_path, cv_parent, tiny_dataset, islands=True)) == [1]
    rule = json.loads((tmp_path / "islands" / "postprocessing.json").read_text())["labels"]
    assert rule["liver"]["dice_largest_component"] > rule["liver"]["dice"] and rule["kidney"]["dice_largest_component"] < rule["kidney"]["dice"]
    assert learn_postprocessing(_fake_run(tmp_path, cv_parent, tiny_dataset, islands=False)) == []
    # a model that misses one kidney gains from the step on validation, but the reference kidneys
    # are two pieces: the step would delete a found kidney at test time, so it stays off
    run = _fake_run(tmp_path, cv_parent, tiny_dataset, islands=True, one_kidney=True)
    assert learn_postprocessing(run) == [1]
    kidney = json.loads((run / "postprocessing.json").read_text())["labels"]["kidney"]
    assert kidney["dice_largest_component"] > kidney["dice"] and kidney["reference_in_largest_component"] < 0.95 and not kidney["applied"]


def test_infer_applies_the_learned_rule_unless_told_otherwise(cv_parent, tmp_path):
    cv_parent = shutil.copytree(cv_parent, tmp_path / "parent")
    (cv_parent / "postprocessing.json").write_text(json.dumps({"largest_component": [1, 3]}))
    pred = Predictor.from_run(cv_parent, device="cpu")
    assert pred.infer.largest_component == (1, 3) and pred.run_info["postprocessing"]["source"].endswith("postprocessing.json")
    pred = Predictor.from_run(cv_parent, device="cpu", overrides={"largest_component": []})
    assert pred.infer.largest_component == () and pred.run_info["postprocessing"]["source"] == "override"
    assert Predictor.from_run([cv_parent / "fold_0", cv_parent / "fold_1"], device="cpu").infer.largest_component == ()
    run = tmp_path / "explicit"
    shutil.copytree(cv_parent / "fold_0", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["infer"]["largest_component"] = [2]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    pred = Predictor.from_run(run, device="cpu")
    assert pred.infer.largest_component == (2,) and pred.run_info["postprocessing"]["source"].startswith("config")


def test_cli_evaluate_cv_and_infer_with_the_parent(cv_parent, tiny_dataset, tmp_path, capsys):
    assert main(["evaluate", "--cv", str(cv_parent), "--output", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "mean foreground dice" in out and "liver" in out
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == len(load_manifest(tiny_dataset).training)
    assert main(["evaluate", "--cv", str(cv_parent), "--pred", str(tmp_path)]) == 2
    scan = load_manifest(tiny_dataset).test[0].images[0]
    assert main(["-q", "infer", str(scan), "--model", str(cv_parent), "--output", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    side = json.loads(next((tmp_path / "pred").glob("*.json")).read_text())
    assert len(side["model"]["ensemble"]) == 2 and "postprocessing" in side["model"]
    assert main(["export", str(cv_parent)]) == 2
    assert "fold_0" in capsys.readouterr().err
