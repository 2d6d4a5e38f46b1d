"""The training engine end to end on tiny data: validation in eval mode (deep supervision,
batch norm, dropout, the shipped default config), sigmoid / two-channel / 2D slice runs through
``volseg infer``, caching (counted), resume (extend, stored split), augmentation firing rates,
divergence, determinism, the run-folder lock and safe checkpoint loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from volseg.cli import main
from volseg.config import load_config
from volseg.training import train

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
ONE_EPOCH = TINY + ["train.epochs=1"]


def _rows(run: Path):
    lines = (run / "metrics.csv").read_text(encoding="utf-8").strip().splitlines()
    return [dict(zip(lines[0].split(","), ln.split(","))) for ln in lines[1:]]


def _sets(overrides):
    return sum((["--set", s] for s in overrides), [])


def _manifest(tmp: Path, tiny_dataset: Path, **changes) -> Path:
    """A copy of the tiny manifest with absolute paths and ``changes`` applied."""
    data = json.loads(tiny_dataset.read_text(encoding="utf-8"))
    root = tiny_dataset.parent
    for split in ("training", "test"):
        data[split] = [{k: str((root / v).resolve()) for k, v in e.items()} for e in data[split]]
    data.update(changes)
    path = tmp / "dataset.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# 1. validation runs the network in eval mode


@pytest.fixture
def watch_validation(monkeypatch):
    """Wrap Predictor.predict_index (what validation calls): record the mode around each call,
    check batch-norm buffers are untouched and that two calls give the same probabilities (no
    dropout)."""
    import torch

    from volseg.inference import Predictor

    seen = []
    original = Predictor.predict_index

    def predict_index(self, image, box=None):
        buffers = {k: v.clone() for k, v in self.model.state_dict().items() if "running" in k or "num_batches" in k}
        was_training = self.model.training
        index = original(self, image, box)
        first, again = self.probabilities(image, box), self.probabilities(image, box)
        after = self.model.state_dict()
        seen.append({
            "restored": self.model.training == was_training,
            "buffers_same": all(torch.equal(v, after[k]) for k, v in buffers.items()),
            "n_buffers": len(buffers),
            "deterministic": np.array_equal(first, again),
        })
        return index

    monkeypatch.setattr(Predictor, "predict_index", predict_index)
    return seen


@pytest.mark.parametrize("extra", [
    ["model.deep_supervision=true"],
    ["model.norm=batch", "model.dropout=0.5"],
], ids=["deep_supervision", "batchnorm_dropout"])
def test_validation_in_eval_mode(tiny_dataset, tmp_path, watch_validation, extra):
    run = train(tiny_dataset, load_config(None, ONE_EPOCH + extra), tmp_path / "run", device="cpu")
    rows = _rows(run)
    assert len(rows) == 1 and 0.0 <= float(rows[0]["val_dice_mean"]) <= 1.0
    assert len(watch_validation) == 1  # one validation case
    for call in watch_validation:
        assert call["restored"] and call["buffers_same"] and call["deterministic"]
    if "model.norm=batch" in extra:
        assert watch_validation[0]["n_buffers"] > 0


def test_predictor_restores_training_mode():
    import torch

    from volseg.config import ModelConfig
    from volseg.data.plan import ChannelNorm, PreprocessingPlan
    from volseg.inference import ModelBundle, Predictor
    from volseg.nets import build_network

    plan = PreprocessingPlan((1.0, 1.0, 1.0), "RAS", ("CT",), (ChannelNorm("none"),), (0, 1, 2), ("bg", "a", "b"), 3, (16, 16, 16), 2)
    net = build_network(ModelConfig(features=(4, 8), norm="batch", dropout=0.5, deep_supervision=True), 1, 3)
    pred = Predictor(ModelBundle.of(net, plan), device="cpu")
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    x = np.random.default_rng(0).normal(size=(1, 20, 18, 17)).astype(np.float32)
    a, b = pred.probabilities(x), pred.probabilities(x)
    assert net.training and np.array_equal(a, b) and a.shape == (3, 20, 18, 17)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_shipped_gpu_fullres_config_trains_through_validation(tiny_dataset, tmp_path):
    """configs/gpu_fullres.yaml as shipped (deep supervision, 2 loader workers, memory cache),
    shrunk only in size and length."""
    small = ["model.features=[4,8,16]", "data.patch_size=[24,24,16]", "train.epochs=1", "train.steps_per_epoch=2",
             "train.val_every=1", "data.val_fraction=0.25"]
    cfg = load_config(ROOT / "configs/gpu_fullres.yaml", small)
    assert cfg.model.deep_supervision and cfg.data.num_workers == 2
    run = train(tiny_dataset, cfg, tmp_path / "run", device="cpu")
    rows = _rows(run)
    assert len(rows) == 1 and rows[0]["val_dice_mean"] != ""
    assert float(rows[0]["data_wait_s"]) >= 0 and float(rows[0]["train_s"]) >= float(rows[0]["data_wait_s"])
    assert (run / "best.pt").is_file()


def _binary_dataset(tmp: Path, tiny_dataset: Path) -> Path:
    """The tiny dataset with liver as the only label (one sigmoid output)."""
    data = json.loads(tiny_dataset.read_text(encoding="utf-8"))
    root = tiny_dataset.parent
    for split in ("training", "test"):
        for e in data[split]:
            lab = sitk.ReadImage(str(root / e["label"]))
            out = tmp / f"{split}_{Path(e['label']).name}"
            sitk.WriteImage(sitk.Cast(lab == 1, sitk.sitkUInt8), str(out))
            e["image"], e["label"] = str((root / e["image"]).resolve()), str(out)
    data["labels"] = {"0": "background", "1": "liver"}
    path = tmp / "binary.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _two_channel_dataset(tmp: Path, tiny_dataset: Path) -> Path:
    """Each case gets a second channel ("MRI": a smoothed, rescaled copy on the same grid)."""
    data = json.loads(tiny_dataset.read_text(encoding="utf-8"))
    root = tiny_dataset.parent
    for split in ("training", "test"):
        for e in data[split]:
            img = sitk.ReadImage(str(root / e["image"]), sitk.sitkFloat32)
            second = tmp / f"{split}_{Path(e['image']).name.replace('.nii.gz', '_0001.nii.gz')}"
            sitk.WriteImage(sitk.SmoothingRecursiveGaussian(img, 1.0) * 0.01 + 5.0, str(second))
            e["image"] = [str((root / e["image"]).resolve()), str(second)]
            e["label"] = str((root / e["label"]).resolve())
    data["modality"] = {"0": "CT", "1": "MRI"}
    path = tmp / "two_channels.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["binary", "two_channels"])
def test_train_then_infer(tiny_dataset, tmp_path, kind):
    manifest = (_binary_dataset if kind == "binary" else _two_channel_dataset)(tmp_path, tiny_dataset)
    run, out = tmp_path / "run", tmp_path / "pred"
    assert main(["-q", "train", str(manifest), "--output", str(run), "--device", "cpu"] + _sets(ONE_EPOCH)) == 0
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    assert _rows(run)[0]["val_dice_mean"] != ""
    assert main(["-q", "infer", str(manifest), "--model", str(run), "--output", str(out), "--device", "cpu"]) == 0
    test = json.loads(manifest.read_text(encoding="utf-8"))["test"]
    for e in test:
        first = e["image"][0] if isinstance(e["image"], list) else e["image"]
        seg = sitk.ReadImage(str(out / f"{Path(first).name.replace('.nii.gz', '')}_seg.nii.gz"))
        assert seg.GetSize() == sitk.ReadImage(first).GetSize()
        assert set(np.unique(sitk.GetArrayViewFromImage(seg))) <= set(plan["label_values"])
    if kind == "binary":
        assert plan["label_values"] == [0, 1] and json.loads(json.dumps(plan))["norms"][0]["scheme"] == "ct"
    else:
        assert [n["scheme"] for n in plan["norms"]] == ["ct", "zscore"]


@pytest.mark.parametrize("axis", [0, 2])
def test_slice_mode_through_validation_and_infer(tiny_dataset, tmp_path, axis):
    sets = [s for s in ONE_EPOCH if not s.startswith("data.patch_size")]
    sets += ["model.spatial_dims=2", "data.patch_size=[24,16]" if axis == 0 else "data.patch_size=[24,24]", f"data.slice_axis={axis}"]
    run, out = tmp_path / "run", tmp_path / "pred"
    assert main(["-q", "train", str(tiny_dataset), "--output", str(run), "--device", "cpu"] + _sets(sets)) == 0
    assert _rows(run)[0]["val_dice_mean"] != ""
    assert main(["-q", "infer", str(tiny_dataset), "--model", str(run), "--output", str(out), "--device", "cpu"]) == 0
    assert len(list(out.glob("*_seg.nii.gz"))) == 2


# --------------------------------------------------------------------------------------------
# 2. caching


@pytest.fixture
def count_preprocess(monkeypatch):
    from volseg.training import data

    calls = []
    original = data.preprocess_case

    def counted(case, plan):
        calls.append(case.name)
        return original(case, plan)

    monkeypatch.setattr(data, "preprocess_case", counted)
    return calls


def test_memory_cache_preprocesses_each_case_once(tiny_dataset, tmp_path, count_preprocess):
    train(tiny_dataset, load_config(None, TINY + ["data.cache=memory"]), tmp_path / "run", device="cpu")
    assert sorted(count_preprocess) == sorted(set(count_preprocess)) and len(count_preprocess) == 4  # 3 training + 1 validation
    assert not (tmp_path / "volseg_cache").exists()


def test_disk_cache_is_reused_by_a_second_run_with_the_same_plan(tiny_dataset, tmp_path, count_preprocess):
    cfg = load_config(None, ONE_EPOCH + ["data.cache=disk"])
    train(tiny_dataset, cfg, tmp_path / "first", device="cpu")
    assert sorted(count_preprocess) == sorted(set(count_preprocess)) and len(count_preprocess) == 4
    caches = list((tmp_path / "volseg_cache").iterdir())
    assert len(caches) == 1 and len(list((caches[0] / "train").glob("*.pt"))) == 3
    count_preprocess.clear()
    train(tiny_dataset, cfg, tmp_path / "second", device="cpu")
    assert count_preprocess == []
    # another plan (spacing) gets its own cache
    train(tiny_dataset, load_config(None, ONE_EPOCH + ["data.cache=disk", "data.spacing=[2,2,2]"]), tmp_path / "third", device="cpu")
    assert len(count_preprocess) == 4 and len(list((tmp_path / "volseg_cache").iterdir())) == 2


def test_memory_cache_falls_back_to_disk_when_ram_is_short(tiny_dataset, tmp_path, count_preprocess, monkeypatch, caplog):
    from volseg.training import data

    monkeypatch.setattr(data, "available_ram_bytes", lambda: 1000)
    cache = tmp_path / "elsewhere"
    with caplog.at_level(logging.WARNING, logger="volseg"):
        train(tiny_dataset, load_config(None, ONE_EPOCH + [f"data.cache_dir={cache}"]), tmp_path / "run", device="cpu")
    assert any("using the disk cache" in r.getMessage() for r in caplog.records)
    assert len(list(cache.glob("*/train/*.pt"))) == 3 and len(count_preprocess) == 4


def test_augmentation_never_writes_into_the_memory_cache(tiny_dataset):
    """The memory cache hands its arrays to the random transforms without a copy."""
    import torch

    from volseg.data.manifest import load_manifest
    from volseg.planning import plan_cases
    from volseg.training.data import build_datasets

    man = load_manifest(tiny_dataset)
    cfg = load_config(None, TINY + ["augment.rotate_prob=1", "augment.scale_prob=1", "augment.elastic_prob=1", "augment.flip_prob=1",
                                    "augment.noise_prob=1", "augment.intensity_scale_prob=1", "augment.intensity_shift_prob=1",
                                    "augment.label_intensity_prob=1", "augment.slab_prob=1"])
    plan = plan_cases(man, man.training[:2], cfg)
    ds, _, _ = build_datasets(man.training[:2], (), plan, cfg, Path("unused"), 2)
    before = [{k: torch.as_tensor(v).clone() for k, v in c.items() if k in ("image", "label")} for c in ds._cache]
    for i in range(6):
        ds[i % 2]
    for snap, cached in zip(before, ds._cache):
        assert all(torch.equal(v, torch.as_tensor(cached[k])) for k, v in snap.items())
        assert "label_cls_indices" in cached


def test_cache_size_estimate_from_the_plan(tiny_dataset):
    from volseg.data.manifest import load_manifest
    from volseg.planning import plan_cases
    from volseg.preprocessing.pipeline import preprocess_case
    from volseg.training.data import estimate_cache_bytes

    man = load_manifest(tiny_dataset)
    plan = plan_cases(man, man.training, load_config(None, TINY))
    case = man.training[0]
    voxels = preprocess_case(case, plan)["image"][0].size
    est = estimate_cache_bytes([case], plan, with_indices=False)
    assert abs(est / (voxels * 5) - 1) < 0.1  # 4 bytes image + 1 byte label per voxel


# --------------------------------------------------------------------------------------------
# 3. resume


def test_resume_extends_with_the_poly_curve_of_the_new_total(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert main(["-q", "train", str(tiny_dataset), "--output", str(run), "--device", "cpu"] + _sets(ONE_EPOCH)) == 0
    assert float(_rows(run)[0]["lr"]) == 0.0  # a finished run ends at lr 0
    assert main(["-q", "train", str(tiny_dataset), "--output", str(run), "--resume", "--device", "cpu", "--set", "train.epochs=3"]) == 0
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    lr0, total = 3e-3, 3 * 2
    assert float(rows[1]["lr"]) > 0
    assert float(rows[1]["lr"]) == pytest.approx(lr0 * (1 - 4 / total) ** 0.9, rel=1e-4)
    assert float(rows[2]["lr"]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("planned", [True, False])
def test_too_few_cases_fail_before_planning_and_before_the_split_warning(tiny_dataset, tmp_path, capsys, caplog, monkeypatch, planned):
    """One labelled case against data.min_cases=2: one error naming the key, before any scan is
    fingerprinted (the planner's or the plan's) and without the split's 'no validation' warning."""
    import volseg.training.engine as engine

    one = json.loads(_manifest(tmp_path, tiny_dataset).read_text(encoding="utf-8"))
    one["training"] = one["training"][:1]
    manifest = tmp_path / "one.json"
    manifest.write_text(json.dumps(one), encoding="utf-8")

    def boom(*a, **k):
        raise AssertionError("scans were fingerprinted")

    monkeypatch.setattr(engine, "fingerprint", boom)
    monkeypatch.setattr(engine, "make_plan", boom)
    config = [] if planned else ["--config", "demo"]
    with caplog.at_level(logging.WARNING, logger="volseg"):
        assert main(["train", str(manifest), "--output", str(tmp_path / "run"), "--device", "cpu"] + config) == 2
    err = capsys.readouterr().err
    assert "1 labelled case(s), need at least 2 (data.min_cases" in err
    assert not any("none is held out" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "run" / "planned_config.yaml").exists()


def test_resume_uses_the_stored_split_and_names_missing_cases(tiny_dataset, tmp_path, monkeypatch, capsys):
    manifest = _manifest(tmp_path, tiny_dataset)
    run = tmp_path / "run"
    assert main(["-q", "train", str(manifest), "--output", str(run), "--device", "cpu"] + _sets(ONE_EPOCH)) == 0
    stored = json.loads((run / "dataset.json").read_text(encoding="utf-8"))
    # the manifest now names a validation list: resume must keep the stored split anyway
    data = json.loads(manifest.read_text(encoding="utf-8"))
    data["validation"] = data["training"][:2]
    data["training"] = data["training"][2:]
    manifest.write_text(json.dumps(data), encoding="utf-8")
    from volseg.training import engine

    def no_split(*a, **k):
        raise AssertionError("resume recomputed the split")

    monkeypatch.setattr(engine, "split_cases", no_split)
    assert main(["-q", "train", str(manifest), "--output", str(run), "--resume", "--device", "cpu", "--set", "train.epochs=2"]) == 0
    assert json.loads((run / "dataset.json").read_text(encoding="utf-8")) == stored
    # a case of the stored split disappears from the manifest
    gone = stored["training"][0]
    data["training"] = [e for e in data["training"] if gone not in e["image"]]
    data["validation"] = [e for e in data["validation"] if gone not in e["image"]]
    manifest.write_text(json.dumps(data), encoding="utf-8")
    capsys.readouterr()
    assert main(["-q", "train", str(manifest), "--output", str(run), "--resume", "--device", "cpu", "--set", "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert gone in err and "no longer has" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# 4. augmentation


def _firing(cfg_overrides, trials=400):
    """Fraction of patches on which each RandAffined of the training chain fires, by what it
    was built to do (rotation or scaling)."""
    from monai.transforms import RandAffined

    from volseg.data.plan import ChannelNorm, PreprocessingPlan
    from volseg.data.transforms import random_transforms

    plan = PreprocessingPlan((1.0, 1.0, 1.0), "RAS", ("CT",), (ChannelNorm("none"),), (0, 1), ("bg", "fg"), 3, (8, 8, 8), 2)
    chain = random_transforms(plan, load_config(None, ["data.patch_size=[8,8,8]"] + cfg_overrides), 1)
    chain.set_random_state(seed=0)
    affines = [t for t in chain.transforms if isinstance(t, RandAffined)]
    item = {"image": np.ones((1, 8, 8, 8), np.float32), "label": np.zeros((1, 8, 8, 8), np.uint8)}
    for t in affines:
        t(dict(item))  # they run on a patch
    fired = {"rotate": 0, "scale": 0, "both": 0}
    for _ in range(trials):
        on = {}
        for t in affines:
            t.randomize(None)  # the per-call draw, without the resampling
            on["rotate" if any(r is not None for r in t.rand_affine.rand_affine_grid.rotate_range) else "scale"] = t._do_transform
        fired["rotate"] += on.get("rotate", False)
        fired["scale"] += on.get("scale", False)
        fired["both"] += on.get("rotate", False) and on.get("scale", False)
    return {k: v / trials for k, v in fired.items()}, affines


def test_rotation_and_scaling_fire_independently_with_their_own_probabilities():
    rates, affines = _firing(["augment.rotate_prob=0.3", "augment.scale_prob=0.3"])
    assert len(affines) == 2
    # 400 draws: standard error 0.023; the merged affine fired with 0.51
    assert abs(rates["rotate"] - 0.3) < 0.08 and abs(rates["scale"] - 0.3) < 0.08
    assert abs(rates["both"] - 0.09) < 0.05
    rates, affines = _firing(["augment.rotate_prob=0", "augment.scale_prob=0.5"])
    assert len(affines) == 1 and rates["rotate"] == 0 and abs(rates["scale"] - 0.5) < 0.08


def test_2d_elastic_settings_come_from_augment():
    from monai.transforms import Rand2DElasticd

    from volseg.data.plan import ChannelNorm, PreprocessingPlan
    from volseg.data.transforms import random_transforms

    plan = PreprocessingPlan((1.0, 1.0, 1.0), "RAS", ("CT",), (ChannelNorm("none"),), (0, 1), ("bg", "fg"), 2, (16, 16), 2)

    def elastic(overrides):
        cfg = load_config(None, ["model.spatial_dims=2", "data.patch_size=[16,16]", "augment.elastic_prob=1"] + overrides)
        (t,) = [t for t in random_transforms(plan, cfg, 1).transforms if isinstance(t, Rand2DElasticd)]
        grid = t.rand_2d_elastic.deform_grid
        return tuple(grid.spacing), tuple(grid.magnitude)

    base = elastic([])
    assert elastic(["augment.elastic_magnitude=[100,300]"])[1] == pytest.approx(tuple(2 * m for m in base[1]))
    assert elastic(["augment.elastic_sigma=[10,16]"])[0] == pytest.approx(tuple(2 * s for s in base[0]))


# --------------------------------------------------------------------------------------------
# 6. reliability: divergence, determinism, lock, checkpoints


def test_diverging_loss_ends_with_one_line_and_keeps_last_epoch(tiny_dataset, tmp_path, monkeypatch, capsys):
    import torch

    from volseg.training import engine

    build = engine.build_parts

    def nan_after_two_steps(cfg, plan, device):
        parts = build(cfg, plan, device)
        loss, calls = parts.loss, []

        def poisoned(out, y):
            calls.append(1)
            value = loss(out, y)
            return value * torch.tensor(float("nan")) if len(calls) > 2 else value

        parts.loss = poisoned
        return parts

    monkeypatch.setattr(engine, "build_parts", nan_after_two_steps)
    run = tmp_path / "run"
    code = main(["-q", "train", str(tiny_dataset), "--output", str(run), "--device", "cpu"] + _sets(TINY))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "iteration 3" in err and "train.lr" in err
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in _rows(run)] == ["1"]


def test_training_steps_run_in_the_amp_dtype(tiny_dataset, tmp_path, monkeypatch):
    """``train.amp`` on a CPU with native bf16: the training convolutions run in bfloat16 with
    no loss scaling (bf16 has float32's range); ``train.amp=false``: float32."""
    import torch

    from volseg.training import engine

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    build, seen = engine.build_parts, {}

    def watched(cfg, plan, device):
        parts = build(cfg, plan, device)
        conv = next(m for m in parts.model.modules() if isinstance(m, torch.nn.Conv3d))
        conv.register_forward_hook(lambda m, i, o: seen.setdefault("train" if m.training else "eval", set()).add(o.dtype))
        seen["scaler"] = parts.scaler.is_enabled()
        return parts

    monkeypatch.setattr(engine, "build_parts", watched)
    for amp, dtype in (("true", torch.bfloat16), ("false", torch.float32)):
        seen.clear()
        assert main(["-q", "train", str(tiny_dataset), "--output", str(tmp_path / amp), "--device", "cpu"] + _sets(ONE_EPOCH + [f"train.amp={amp}"])) == 0
        assert seen["train"] == {dtype} and seen["scaler"] is False


def test_same_seed_gives_bit_identical_weights(tiny_dataset, tmp_path):
    import torch

    cfg = load_config(None, ONE_EPOCH + ["data.val_fraction=0", "model.dropout=0.2"])
    a = torch.load(train(tiny_dataset, cfg, tmp_path / "a", device="cpu") / "last.pt", weights_only=True)["model"]
    b = torch.load(train(tiny_dataset, cfg, tmp_path / "b", device="cpu") / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_writer_is_refused_and_stale_lock_taken_over(tiny_dataset, tmp_path, capsys, caplog):
    import os
    import socket

    from volseg.runfolder import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        code = main(["-q", "train", str(tiny_dataset), "--output", str(run), "--device", "cpu"] + _sets(ONE_EPOCH))
        err = capsys.readouterr().err
        assert code == 2 and f"pid {os.getpid()}" in err and socket.gethostname() in err and "started" in err
        assert not (run / "last.pt").exists()
    # a lock file left by a killed run (nobody holds the flock): taken over with a warning
    (run / ".lock").write_text(json.dumps({"pid": 999999999, "host": socket.gethostname(), "started": "yesterday"}), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="volseg"):
        train(tiny_dataset, load_config(None, ONE_EPOCH), run, device="cpu")
    assert any("stale lock" in r.getMessage() and "999999999" in r.getMessage() for r in caplog.records)
    assert (run / ".lock").read_text(encoding="utf-8") == ""  # released


@pytest.fixture(scope="module")
def small_run(tiny_dataset, tmp_path_factory) -> Path:
    return train(tiny_dataset, load_config(None, ONE_EPOCH), tmp_path_factory.mktemp("small") / "run", device="cpu")


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tb", ".lock"))
    return dst


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_checkpoint_that_would_run_code_is_refused(small_run, tiny_dataset, tmp_path, capsys):
    import torch

    run = _copy_run(small_run, tmp_path / "run")
    marker = tmp_path / "marker.txt"
    state = torch.load(run / "best.pt", weights_only=True)
    state["extra"] = _Payload(str(marker))
    torch.save(state, run / "best.pt")
    scan = json.loads(tiny_dataset.read_text(encoding="utf-8"))["test"][0]["image"]
    code = main(["-q", "infer", str(tiny_dataset.parent / scan), "--model", str(run), "--output", str(tmp_path / "o.nii.gz")])
    err = capsys.readouterr().err
    assert code != 0 and "best.pt" in err and "refused" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "o.nii.gz").exists()
    # the same for --resume with a crafted last.pt
    state = torch.load(run / "last.pt", weights_only=True)
    state["extra"] = _Payload(str(marker))
    torch.save(state, run / "last.pt")
    code = main(["-q", "train", str(tiny_dataset), "--output", str(run), "--resume", "--set", "train.epochs=2"])
    err = capsys.readouterr().err
    assert code == 2 and "last.pt" in err and "refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("name, content", [
    ("best.pt", b"\x00garbage"),
    ("plan.json", b"{not json"),
    ("config.yaml", b"model: [unclosed"),
])
def test_corrupt_run_files_are_one_line_errors(small_run, tmp_path, capsys, name, content):
    run = _copy_run(small_run, tmp_path / "run")
    (run / name).write_bytes(content)
    code = main(["-q", "export", str(run), "--output", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and name in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_corrupt_last_pt_on_resume(small_run, tiny_dataset, tmp_path, capsys):
    run = _copy_run(small_run, tmp_path / "run")
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    code = main(["-q", "train", str(tiny_dataset), "--output", str(run), "--resume", "--set", "train.epochs=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "last.pt" in err and len(err.splitlines()) == 1


def test_missing_best_pt_warns_and_records_last(small_run, tmp_path, caplog):
    from volseg.inference import Predictor

    run = _copy_run(small_run, tmp_path / "run")
    (run / "best.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="volseg"):
        pred = Predictor.from_run(run, device="cpu")
    assert pred.run_info["checkpoint"] == "last.pt" and "best.pt" in pred.run_info["warnings"][0]
    assert any("using last.pt" in r.getMessage() for r in caplog.records)
    (run / "last.pt").unlink()
    with pytest.raises(FileNotFoundError, match="best.pt"):
        Predictor.from_run(run, device="cpu")


def test_all_empty_labels_warn_under_zscore(tiny_dataset, tmp_path, caplog):
    from volseg.data.manifest import load_manifest
    from volseg.planning import plan_cases

    data = json.loads(tiny_dataset.read_text(encoding="utf-8"))
    root = tiny_dataset.parent
    for e in data["training"]:
        lab = sitk.ReadImage(str(root / e["label"]))
        empty = tmp_path / Path(e["label"]).name
        sitk.WriteImage(lab * 0, str(empty))
        e["image"], e["label"] = str((root / e["image"]).resolve()), str(empty)
    data["modality"] = {"0": "MRI"}
    (tmp_path / "empty.json").write_text(json.dumps(data), encoding="utf-8")
    man = load_manifest(tmp_path / "empty.json")
    with caplog.at_level(logging.WARNING, logger="volseg"):
        plan = plan_cases(man, man.training, load_config(None, TINY))
    assert plan.norms[0].scheme == "zscore"
    assert any("foreground" in r.getMessage() for r in caplog.records)


@pytest.mark.cuda
def test_cuda_training_with_amp_validation_resume_and_infer(tiny_dataset, tmp_path):
    """The shipped config on the GPU (AMP, GradScaler, deep supervision), validation on the
    device, extension by --resume, then volseg infer --device cuda."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    small = ["model.features=[8,16,32]", "data.patch_size=[24,24,16]", "train.epochs=2", "train.steps_per_epoch=3",
             "train.val_every=1", "data.val_fraction=0.25", "data.num_workers=0"]
    run = train(tiny_dataset, load_config(ROOT / "configs/gpu_fullres.yaml", small), tmp_path / "run", device="cuda")
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"] and all(r["val_dice_mean"] != "" for r in _rows(run))
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["epoch"] == 2
    assert main(["-q", "train", str(tiny_dataset), "--output", str(run), "--resume", "--device", "cuda", "--set", "train.epochs=3"]) == 0
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and np.isfinite(float(rows[2]["train_loss"]))
    assert main(["-q", "infer", str(tiny_dataset), "--model", str(run), "--output", str(tmp_path / "pred"), "--device", "cuda"]) == 0
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 2


def test_two_trainings_in_one_process_write_two_clean_logs(tiny_dataset, tmp_path):
    """Each ``train`` call attaches its run's train.log and detaches it when it ends: the first
    log holds none of the second run's lines, no handler or file stays open, and the package
    logger's level is what it was."""
    logger = logging.getLogger("volseg")
    handlers, level = list(logger.handlers), logger.level
    cfg = load_config(None, [*TINY, "train.epochs=1"])
    first = train(tiny_dataset, cfg, tmp_path / "first", device="cpu")
    second = train(tiny_dataset, cfg, tmp_path / "second", device="cpu")
    assert logger.handlers == handlers and logger.level == level
    one, two = ((r / "train.log").read_text(encoding="utf-8") for r in (first, second))
    assert "epoch 1/1" in one and "epoch 1/1" in two
    assert str(second) not in one and str(first) not in two
    assert one.count("epoch 1/1") == 1 and two.count("epoch 1/1") == 1
