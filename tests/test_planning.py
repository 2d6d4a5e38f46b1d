"""The planner: fingerprint -> commented config, on synthetic datasets of known properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from volseg.cli import main
from volseg.config import ModelConfig, load_config
from volseg.data.manifest import is_ct_modality, load_manifest
from volseg.planning.fingerprint import fingerprint
from volseg.planning.memory import measure_step_memory
from volseg.planning.planner import plan_config, render_plan


@pytest.fixture(scope="module")
def thick(tmp_path_factory):
    """0.7 x 0.7 x 5 mm CT phantoms: thick-slice data."""
    from volseg.data.synth import make_dataset

    man = load_manifest(make_dataset(tmp_path_factory.mktemp("thick"), cases=3, test_cases=0, shape=(48, 48, 16), spacing=(0.7, 0.7, 5.0), seed=1))
    return man, fingerprint(man, man.training)


@pytest.fixture(scope="module")
def iso(tmp_path_factory):
    """1.5 mm isotropic CT phantoms, big enough that small budgets limit the patch."""
    from volseg.data.synth import make_dataset

    man = load_manifest(make_dataset(tmp_path_factory.mktemp("iso"), cases=3, test_cases=0, shape=(48, 48, 40), spacing=(1.5, 1.5, 1.5), seed=2))
    return man, fingerprint(man, man.training)


@pytest.mark.parametrize("name, ct", [("CT", True), ("ct", True), ("CECT", True), ("CT arterial", True), ("venous-phase ct", True),
                                      ("Computed Tomography", True), ("MRI", False), ("T2", False), ("SPECT", False), ("PET", False), ("ADC", False)])
def test_ct_modality_names(name, ct):
    assert is_ct_modality(name) is ct


def test_thick_slices_get_the_anisotropic_treatment(thick, iso):
    man, fp = thick
    cfg, comments = plan_config(fp, man, memory_gb=0.5)
    assert cfg.data.spacing == pytest.approx((0.7, 0.7, 5.0), abs=1e-3)
    assert cfg.data.slice_axis == 2 and "2D slice mode" in comments["data", "spacing"]
    # the 5 mm axis is not pooled until the 0.7 mm grid is as coarse (nnU-Net's anisotropic pooling)
    z = [st[2] for st in cfg.model.strides]
    assert z[0] == 1 and all(st[:2] == (2, 2) for st in cfg.model.strides[: z.index(2) if 2 in z else None])
    assert "twice as coarse" in comments["model", "pooling"]
    # the thick axis takes the 10th percentile, not the median
    fp2 = dict(fp, spacings_mm=[[0.7, 0.7, s] for s in (2.5, 5.0, 5.0)])
    assert plan_config(fp2, man, memory_gb=0.5)[0].data.spacing[2] == pytest.approx(np.percentile([2.5, 5, 5], 10))
    man_iso, fp_iso = iso
    cfg_iso, comments_iso = plan_config(fp_iso, man_iso, memory_gb=0.5)
    assert cfg_iso.data.spacing == pytest.approx((1.5, 1.5, 1.5)) and ("data", "slice_axis") not in comments_iso
    assert "not thick-slice" in comments_iso["data", "spacing"]
    assert cfg_iso.model.pooling is None and "every level halves every axis" in comments_iso["model", "pooling"]


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_fingerprint_counts_every_label_value_exactly(thick, dtype):
    """The label statistics count what np.bincount counts, the top uint8 value included; the
    fingerprint's voxel fractions are those counts."""
    import SimpleITK as sitk

    from volseg.planning.fingerprint import _label_counts

    a = np.random.default_rng(0).choice([0, 1, 3, 255], size=(9, 8, 7), p=[0.7, 0.2, 0.09, 0.01]).astype(dtype)
    want = {int(v): int(n) for v, n in enumerate(np.bincount(a.ravel())) if n}
    assert _label_counts(sitk.GetImageFromArray(a)) == want
    man, fp = thick
    total = {}
    for case in man.training:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))).ravel()
        for v, n in enumerate(np.bincount(arr)):
            total[v] = total.get(v, 0) + int(n)
    fractions = {c["value"]: c["voxel_fraction"] for c in fp["classes"]}
    assert fractions == pytest.approx({v: total.get(v, 0) / sum(total.values()) for v in fractions})


def test_rare_class_is_oversampled(iso):
    man, fp = iso
    cfg, comments = plan_config(fp, man, memory_gb=0.5)
    frac = {c["name"]: c["voxel_fraction"] for c in fp["classes"]}
    assert frac["lesion"] < frac["kidney"] < frac["liver"]
    ratios = dict(zip(["background", "liver", "kidney", "lesion"], cfg.data.class_ratios))
    assert ratios["liver"] == 1 and ratios["lesion"] > ratios["kidney"] > ratios["liver"]
    assert ratios["background"] == pytest.approx(np.mean(cfg.data.class_ratios[1:]), abs=0.01)  # background keeps its 1/K share
    assert "lesion" in comments["data", "class_ratios"]


def test_bigger_memory_budget_gives_a_bigger_patch(iso):
    man, fp = iso
    plans = [plan_config(fp, man, memory_gb=gb)[0] for gb in (0.01, 0.05, 1.0)]
    voxels = [int(np.prod(c.data.patch_size)) for c in plans]
    assert voxels[0] < voxels[1] < voxels[2], voxels
    for gb, c in zip((0.01, 0.05, 1.0), plans):  # each fits its budget, measured at the planned batch
        need = measure_step_memory(c.model, 1, 4, c.data.patch_size, c.train.batch_size)
        assert need <= gb * 2**30 and c.train.batch_size >= 2
    # the biggest covers the median case (60 voxels along z at 1.5 mm), so it cannot grow
    assert plans[2].data.patch_size[2] >= 40
    # the dry pass measures the network: more levels, features or batch need more memory
    small = ModelConfig(features=(8, 16))
    assert measure_step_memory(small, 1, 4, (32, 32, 32), 2) < measure_step_memory(small, 1, 4, (32, 32, 32), 3)
    assert measure_step_memory(small, 1, 4, (32, 32, 32), 2) < measure_step_memory(ModelConfig(features=(16, 32)), 1, 4, (32, 32, 32), 2)


def test_a_spacing_override_is_planned_at_not_pasted_over(iso, tmp_path):
    """``--set data.spacing`` (``volseg train`` without --config, ``volseg plan``): patch and
    depth are fitted to that spacing, so the patch covers the same field of view as the data,
    not the median-spacing patch's voxel count at 3x the millimetres."""
    from volseg.planning import plan_manifest

    man, fp = iso
    median = plan_config(fp, man, memory_gb=1.0)[0]
    coarse = plan_manifest(man, tmp_path / "planned.yaml", memory_gb=1.0, overrides=["data.spacing=[4.5,4.5,4.5]", "train.epochs=3"])
    assert coarse.data.spacing == (4.5, 4.5, 4.5) and coarse.train.epochs == 3
    assert coarse.data.patch_size == plan_config(fp, man, memory_gb=1.0, spacing=(4.5, 4.5, 4.5))[0].data.patch_size
    # the 48 x 48 x 40-voxel cases at 1.5 mm are about 18 x 18 x 14 at 4.5 mm: the patch shrinks with them
    assert median.data.patch_size[2] >= 40 and max(coarse.data.patch_size) <= 18
    written = (tmp_path / "planned.yaml").read_text(encoding="utf-8")
    assert "spacing: [4.5, 4.5, 4.5]  # mm, (x, y, z) in RAS order; set by the user" in written


def test_depth_lets_the_bottleneck_see_the_patch(iso):
    from volseg.nets import receptive_field

    man, fp = iso
    cfg, comments = plan_config(fp, man, memory_gb=1.0)
    bottleneck = [p // m for p, m in zip(cfg.data.patch_size, cfg.model.input_multiple)]
    assert min(bottleneck) >= 4
    # either the receptive field covers the patch or one more pooling would leave an axis < 4
    assert all(r >= p for r, p in zip(receptive_field(cfg.model), cfg.data.patch_size)) or min(bottleneck) < 8
    assert "receptive field" in comments["model", "features"]


def test_a_thin_training_slab_still_gets_a_deep_network():
    """A 10-slice training scan at an isotropic spacing: the short axis stops pooling at 4
    voxels while the in-plane axes go on, so the network is not limited to 2 levels (as when
    every axis pooled alike)."""
    from volseg.planning.planner import _pooling

    assert _pooling((112, 112, 10), (4.5, 4.5, 4.5), 16) == ((2, 2, 2), (2, 2, 1), (2, 2, 1), (2, 2, 1))
    assert _pooling((48, 40, 48), (1.0, 1.0, 1.0), 16) == ((2, 2, 2),) * 3  # isotropic data: as before
    # thick slices: z waits for the in-plane spacing (0.7 -> 1.4 -> 2.8 mm) to come within 2x of 5 mm
    assert _pooling((128, 128, 16), (0.7, 0.7, 5.0), 16) == ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))


def test_plan_command_writes_a_commented_config_that_loads(iso, tmp_path, capsys):
    man, _ = iso
    out = tmp_path / "planned.yaml"
    assert main(["plan", str(man.path), "--output", str(out), "--memory", "0.05", "--device", "cpu"]) == 0
    assert str(out) in capsys.readouterr().out
    cfg = load_config(out)
    planned = [ln for ln in out.read_text(encoding="utf-8").splitlines() if ln.startswith("  ")]
    assert planned and all("  # " in ln for ln in planned)  # every decision says why
    assert yaml.safe_load(out.read_text(encoding="utf-8"))["data"]["patch_size"] == list(cfg.data.patch_size)
    fp = json.loads((tmp_path / "planned.fingerprint.json").read_text(encoding="utf-8"))
    assert fp["cases"] == 3 and fp["channels"][0]["ct"] and len(fp["classes"]) == 4
    assert main(["plan", str(man.path), "--output", str(tmp_path / "bad.yaml"), "--memory", "-1"]) == 2


def test_train_without_config_plans_and_trains(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    sets = ["train.epochs=1", "train.steps_per_epoch=2", "train.val_every=1", "infer.overlap=0.25"]
    assert main(["-q", "train", str(tiny_dataset), "--output", str(run), "--device", "cpu"] + sum((["--set", s] for s in sets), [])) == 0
    planned = load_config(run / "planned_config.yaml")
    used = load_config(run / "config.yaml")
    assert used.data.patch_size == planned.data.patch_size and used.data.class_ratios == planned.data.class_ratios
    assert used.model.features == planned.model.features and used.train.epochs == 1  # the override on top of the plan
    assert json.loads((run / "fingerprint.json").read_text(encoding="utf-8"))["cases"] == 4
    rows = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    dice = [v for k, v in zip(header, last) if k.startswith("val_dice")]
    assert dice and all(v != "" for v in dice)  # validation ran


def test_render_plan_is_yaml_with_a_comment_per_key(iso):
    man, fp = iso
    cfg, comments = plan_config(fp, man, memory_gb=0.05)
    text = render_plan(cfg, comments, "test")
    assert yaml.safe_load(text)["model"]["features"] == list(cfg.model.features)
    assert text.count("  # ") == len(comments)


@pytest.mark.cuda
def test_cuda_plan_measures_on_the_gpu_and_fits_its_budget(iso):
    """On a GPU the dry pass is real (AMP, peak allocated memory); a tiny budget limits the patch
    and the planned step fits it."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    man, fp = iso
    small = plan_config(fp, man, memory_gb=0.05, device="cuda")[0]
    free = plan_config(fp, man, device="cuda")[0]
    assert small.model.features[0] == 32 and np.prod(small.data.patch_size) <= np.prod(free.data.patch_size)
    need = measure_step_memory(small.model, 1, 4, small.data.patch_size, small.train.batch_size, device="cuda")
    assert need <= 0.05 * 2**30


def test_thick_slice_plan_trains_validates_and_infers(tmp_path):
    """The path a user with 5 mm CT takes: `volseg train MANIFEST` without --config plans
    anisotropic pooling, trains through a validation, and `volseg infer` writes a mask in the
    scan's geometry. A `model.features` override gets the planned pooling fitted to its depth."""
    import SimpleITK as sitk

    from volseg.data.synth import make_dataset

    manifest = make_dataset(tmp_path / "data", cases=4, test_cases=1, shape=(40, 40, 16), spacing=(0.7, 0.7, 5.0), seed=4)
    run = tmp_path / "run"
    sets = ["train.epochs=1", "train.steps_per_epoch=2", "train.val_every=1", "data.samples_per_volume=1", "data.val_fraction=0.25"]
    assert main(["-q", "train", str(manifest), "--output", str(run), "--device", "cpu"] + [a for s in sets for a in ("--set", s)]) == 0
    cfg = load_config(run / "config.yaml")
    assert cfg.model.pooling and cfg.model.pooling[0] == (2, 2, 1)
    head, *rows = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 and float(dict(zip(head.split(","), rows[0].split(",")))["val_dice_mean"]) >= 0  # validated
    out = tmp_path / "pred"
    assert main(["-q", "infer", str(manifest), "--model", str(run), "--output", str(out)]) == 0
    case = load_manifest(manifest).test[0]
    ref, seg = sitk.ReadImage(str(case.images[0])), sitk.ReadImage(str(out / f"{case.name}_seg.nii.gz"))
    assert seg.GetSize() == ref.GetSize() and seg.GetSpacing() == pytest.approx(ref.GetSpacing())
    import torch

    from volseg.inference import Predictor
    from volseg.inference.export import export

    traced = torch.jit.load(str(export(run, "torchscript")))  # the anisotropic network exports too
    net = Predictor.from_run(run, device="cpu").model.eval()
    x = torch.randn(1, 1, *cfg.data.patch_size)
    with torch.no_grad():
        assert torch.allclose(traced(x), torch.softmax(net(x), 1), atol=1e-5)

    from volseg.planning import plan_manifest

    shallow = plan_manifest(load_manifest(manifest), tmp_path / "p.yaml", overrides=["model.features=[8,16]"])
    assert shallow.model.features == (8, 16) and shallow.model.pooling == ((2, 2, 1),)
    # a pooling override for the planned depth (3 levels here) is checked against the plan,
    # not against the default 4-level network
    assert len(cfg.model.features) == 3
    own = plan_manifest(load_manifest(manifest), tmp_path / "p.yaml", overrides=["model.pooling=[[2,2,1],[2,2,2]]"])
    assert own.model.pooling == ((2, 2, 1), (2, 2, 2)) and own.model.features == cfg.model.features
