"""``volseg infer`` on nnU-Net v2 model folders gives the masks ``nnUNetv2_predict`` gives.

nnU-Net itself (2.8.1, in its own cached virtualenv: tests/nnunet_reference.py) plans and
preprocesses three small synthetic datasets and trains on them for a few short epochs on the
CPU: a CT dataset (int16 HU, anisotropic spacing; ``3d_fullres`` with folds 0 and 1 and ``2d``
at nnU-Net's planned width), a z-scored MR dataset with a zero background (nnU-Net's non-zero
mask normalisation) and a region-based dataset (sigmoid heads painted in
``regions_class_order``). Then ``nnUNetv2_predict_from_modelfolder`` and ``volseg infer`` run on
held-out scans of other spacings, orientations (direction matrices nnU-Net never saw) and dtypes,
with and without TTA. The outputs must have the same size, spacing, origin, direction and pixel
type; every voxel where the masks differ must be a tie in nnU-Net's own probabilities (nnU-Net
accumulates its logits in float16, volseg in float32: the top two within 0.01), and every label
must agree to Dice >= 0.998 (0.999 is the target; on these small phantoms one tied voxel of a
901-voxel label is 0.9989).

Slow (the install, once per cache, then ~5 min of nnU-Net planning and training on 2 cores);
skipped, saying why, only where nnunetv2 cannot be installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import nnunet_reference as ref  # noqa: E402

pytestmark = pytest.mark.slow

sitk = pytest.importorskip("SimpleITK")

#: dataset -> (id, kind, regions, {configuration: folds}, {configuration: width})
DATASETS = {
    "ct": (981, "ct", False, {"3d_fullres": [0, 1], "2d": [0]}, {"3d_fullres": 0.25}),
    "mr": (982, "mr", False, {"3d_fullres": [0]}, {"3d_fullres": 0.25}),
    "regions": (983, "ct", True, {"3d_fullres": [0]}, {"3d_fullres": 0.25}),
}
FLIP = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # LPS-like, where training had the identity
OBLIQUE = tuple(np.round([[0.96592583, -0.25881905, 0], [0.25881905, 0.96592583, 0], [0, 0, 1]], 8).ravel())


def _held_out(folder: Path, kind: str) -> None:
    """Two scans the model never saw: other spacing and float32; other orientation, origin and
    (for MR) another intensity scale in uint16."""
    folder.mkdir(parents=True, exist_ok=True)
    img, _ = ref.phantom((16, 60, 50), kind, 101)
    ref.write(img, folder / "testA_0000.nii.gz", (0.8, 0.8, 3.0), np.float32, FLIP, (120.0, 90.0, -40.0))
    img, _ = ref.phantom((24, 50, 58), kind, 102)
    if kind == "mr":
        img = img * 3.0
    ref.write(img, folder / "testB_0000.nii.gz", (1.1, 1.0, 2.0), np.int16 if kind == "ct" else np.uint16, OBLIQUE, (-10.0, 5.0, 30.0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    python, why = ref.nnunet_python()
    if python is None:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("nnunet")
    out = {}
    for name, (did, kind, regions, folds, width) in DATASETS.items():
        ref.make_dataset(root, f"Dataset{did}_{name.upper()}", kind, regions=regions)
        _held_out(root / f"test_{name}", kind)
        for config, folder in ref.plan_and_train(python, root, did, list(folds), folds, width).items():
            out[(name, config)] = folder
    return python, root, out


CASES = [("ct", "3d_fullres", (0,), True), ("ct", "3d_fullres", (0, 1), False), ("ct", "3d_fullres", (0, 1), True),
         ("ct", "2d", (0,), True), ("ct", "2d", (0,), False), ("mr", "3d_fullres", (0,), True), ("mr", "3d_fullres", (0,), False),
         ("regions", "3d_fullres", (0,), True), ("regions", "3d_fullres", (0,), False)]


@pytest.mark.parametrize("dataset,config,folds,tta", CASES, ids=[f"{d}-{c}-folds{''.join(map(str, f))}-tta{int(t)}" for d, c, f, t in CASES])
def test_volseg_infer_agrees_with_nnunetv2_predict(models, dataset, config, folds, tta):
    from volseg.cli import main

    python, root, folders = models
    folder, scans = folders[(dataset, config)], root / f"test_{dataset}"
    tag = f"{dataset}_{config}_{''.join(map(str, folds))}_{int(tta)}"
    ref.predict(python, root, folder, scans, root / f"nnunet_{tag}", folds, tta, probabilities=True)
    argv = ["infer", str(scans), "--model", str(folder), "--output", str(root / f"volseg_{tag}"), "--folds", ",".join(map(str, folds)), "--device", "cpu"]
    assert main(argv + ([] if tta else ["--no-tta"])) == 0
    labels = [1, 2]
    for case in ("testA", "testB"):
        theirs = sitk.ReadImage(str(root / f"nnunet_{tag}" / f"{case}.nii.gz"))
        ours = sitk.ReadImage(str(root / f"volseg_{tag}" / f"{case}_seg.nii.gz"))
        assert ours.GetSize() == theirs.GetSize()
        assert np.allclose(ours.GetSpacing(), theirs.GetSpacing()) and np.allclose(ours.GetOrigin(), theirs.GetOrigin())
        assert np.allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-6)
        assert ours.GetPixelIDTypeAsString() == theirs.GetPixelIDTypeAsString()
        a, b = sitk.GetArrayFromImage(theirs), sitk.GetArrayFromImage(ours)
        assert (a > 0).sum() > 500, f"{tag} {case}: nnU-Net found (almost) no foreground; the test would prove nothing"
        differ = a != b
        if differ.any():
            p = np.load(root / f"nnunet_{tag}" / f"{case}.npz")["probabilities"][:, differ]
            # the margin of nnU-Net's own decision there: top two softmax probabilities, or a sigmoid's distance from 0.5
            margin = np.abs(p - 0.5).min(0) * 2 if dataset == "regions" else np.diff(np.sort(p, axis=0)[-2:], axis=0)[0]
            assert margin.max() < 0.01, f"{tag} {case}: {differ.sum()} voxel(s) differ, nnU-Net's margin there up to {margin.max():.4f}"
        for v in labels:
            n = (a == v).sum() + (b == v).sum()
            if n:
                dice = 2 * ((a == v) & (b == v)).sum() / n
                assert dice >= 0.998, f"{tag} {case} label {v}: Dice {dice:.5f} ({(a == v).sum()} vs {(b == v).sum()} voxels)"


@pytest.mark.parametrize("dataset,config", [("ct", "3d_fullres"), ("ct", "2d"), ("regions", "3d_fullres")])
def test_rebuilt_network_equals_dynamic_network_architectures(models, dataset, config, tmp_path):
    """volseg's rebuild of the planned network, loaded from the trained checkpoint, gives the
    outputs of the network nnU-Net builds from the same plans."""
    import torch

    from volseg.inference.nnunet import load_nnunet
    from volseg.nets.nnunet import build_nnunet_network

    python, _, folders = models
    m = load_nnunet(folders[(dataset, config)], folds=[0])
    arch = m.config["architecture"]
    heads = 2 if dataset == "regions" else 3
    net = build_nnunet_network(arch["network_class_name"], arch["arch_kwargs"], 1, heads)
    net.load_state_dict(m.weights[0])
    x = np.random.default_rng(0).normal(size=(2, 1, *m.config["patch_size"])).astype(np.float32)
    theirs = ref.reference_logits(python, folders[(dataset, config)], config, 0, x, tmp_path)
    with torch.no_grad():
        ours = net.eval()(torch.from_numpy(x)).numpy()
    assert ours.shape == theirs.shape == (2, heads, *m.config["patch_size"])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


RESAMPLINGS = [  # (shape, current spacing, new spacing, order, force_separate_z)
    ((12, 30, 26), (3.0, 0.8, 0.8), (2.0, 1.0, 1.0), 3, None),  # anisotropic: in-plane spline, nearest along z, upsampled
    ((20, 24, 22), (2.5, 0.7, 0.7), (4.0, 0.9, 0.9), 3, None),  # z downsampled
    ((16, 18, 20), (1.0, 1.0, 1.0), (0.7, 1.3, 1.1), 3, None),  # isotropic: one 3D spline
    ((14, 20, 18), (0.8, 3.2, 0.8), (1.0, 2.0, 1.0), 1, None),  # the low-resolution axis in the middle, first order (logits)
    ((10, 16, 16), (1.0, 1.0, 1.0), (2.0, 0.5, 0.5), 3, False),  # anisotropic target, separate z forced off
]


@pytest.mark.parametrize("shape,current,new,order,force", RESAMPLINGS)
def test_resampling_equals_nnunets(shape, current, new, order, force, tmp_path):
    """:func:`volseg.inference.nnunet.steps.resample` gives nnU-Net's
    ``resample_data_or_seg_to_shape`` bit for bit."""
    from volseg.inference.nnunet import steps

    python, why = ref.nnunet_python()
    if python is None:
        pytest.skip(why)
    data = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    target = steps.new_shape(shape, current, new)
    theirs = ref.reference_resample(python, data, target, current, new, order, force, tmp_path)
    ours = steps.resample(data[0], target, steps.separate_z(current, new, force), order)
    assert ours.shape == theirs.shape[1:] == tuple(target)
    np.testing.assert_array_equal(ours.astype(np.float32), theirs[0].astype(np.float32))
