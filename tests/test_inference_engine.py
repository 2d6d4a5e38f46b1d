"""The inference engine: rolling-buffer stitching, streaming restore, crop, memory sizing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from volseg.config import InferConfig
from volseg.data.plan import ChannelNorm, PreprocessingPlan
from volseg.inference import ModelBundle, Predictor
from volseg.inference.windows import WindowSpec, rolling_windows
from volseg.preprocessing.geometry import canonical_geometry, canonical_view, resample_linear, to_canonical
from volseg.preprocessing.pipeline import preprocess
from volseg.preprocessing.restore import ScanRestorer


def _plan(k=5, dims=3, patch=(16, 16, 8), slice_axis=2, spacing=(1.5, 1.5, 2.0), norm=ChannelNorm("ct", -1000, 1000, 0, 500)):
    return PreprocessingPlan(spacing=spacing, orientation="RAS", channels=("CT",), norms=(norm,), label_values=tuple(range(k)),
                label_names=tuple(f"c{i}" for i in range(k)), spatial_dims=dims, patch_size=patch, slice_axis=slice_axis)


def _net(dims, k, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(1, 6, 3, padding=1), torch.nn.Tanh(), conv(6, k, 3, padding=1)).eval()


@pytest.mark.parametrize("dims, slice_axis, shape", [(3, 2, (21, 18, 37)), (3, 2, (11, 30, 6)), (2, 2, (21, 18, 9)), (2, 0, (7, 19, 23))])
def test_rolling_engine_equals_monai_whole_volume(dims, slice_axis, shape):
    """Each window once, one window deep: same probabilities as MONAI's whole-volume
    sliding_window_inference / SliceInferer, for a volume needing many z rows (and, for
    (11, 30, 6), padding because it is smaller than the window)."""
    from monai.inferers import SliceInferer, sliding_window_inference

    k = 4
    patch = (16, 16, 8) if dims == 3 else (12, 10)
    plan = _plan(k, dims, patch, slice_axis)
    # float32 windows: the 2D reference calls the network itself, outside the predictor's autocast
    pred = Predictor(ModelBundle.of(_net(dims, k), plan), InferConfig(overlap=0.5, batch_size=3, crop="none", amp=False), "cpu")
    x = torch.randn(1, *shape)
    ours = pred.probabilities(x.numpy()).astype(np.float32)
    with torch.no_grad():
        if dims == 3:
            ref = sliding_window_inference(x[None], patch, 3, pred.net, 0.5, "gaussian", padding_mode="replicate")[0].numpy()
        else:
            inf = SliceInferer(roi_size=patch, sw_batch_size=3, spatial_dim=slice_axis, overlap=0.5, mode="gaussian", padding_mode="replicate")
            ref = inf(x[None], lambda t: torch.softmax(pred.model(t), 1))[0].numpy()
    assert ours.shape == ref.shape == (k, *shape)
    assert np.abs(ours - ref).max() < 2e-3  # float16 storage
    assert np.allclose(ours.sum(0), 1, atol=2e-3)
    # the argmax streamed per slab is the argmax of the whole
    assert np.mean(pred.predict_index(x.numpy()) == ref.argmax(0)) > 0.999


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6])
def test_rolling_engine_equals_monai_at_other_overlaps(overlap):
    from monai.inferers import sliding_window_inference

    pred = Predictor(ModelBundle.of(_net(3, 4), _plan(4, 3, (16, 16, 8))), InferConfig(overlap=overlap, batch_size=3, crop="none"), "cpu")
    x = torch.randn(1, 23, 19, 37)
    ours = pred.probabilities(x.numpy()).astype(np.float32)
    with torch.no_grad():
        ref = sliding_window_inference(x[None], (16, 16, 8), 3, pred.net, overlap, "gaussian", padding_mode="replicate")[0].numpy()
    assert np.abs(ours - ref).max() < 2e-3


def test_amp_runs_the_windows_in_bfloat16_on_a_cpu_with_native_bf16(monkeypatch):
    """``infer.amp`` (default on): the network's convolutions run in the dtype that
    ``amp_dtype`` gives for the device, bfloat16 on a CPU with AMX/AVX512-BF16 and float32 on
    one without; ``amp=false`` is float32 anywhere. Probabilities stay float32 and close."""
    from volseg import runtime

    seen = []
    net = _net(3, 4)
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    plan, x = _plan(4, 3, (16, 16, 8)), torch.randn(1, 20, 18, 12).numpy()

    def run(amp: bool):
        seen.clear()
        p = Predictor(ModelBundle.of(net, plan), InferConfig(crop="none", amp=amp), "cpu").probabilities(x)
        return set(seen), p

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.amp_dtype(torch.device("cpu")) == torch.bfloat16
    dtypes, p16 = run(True)
    assert dtypes == {torch.bfloat16}
    dtypes, p32 = run(False)
    assert dtypes == {torch.float32}
    assert 0 < np.abs(p16.astype(np.float32) - p32.astype(np.float32)).max() < 0.05
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):  # no native bf16: float32
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert runtime.amp_dtype(torch.device("cpu")) is None and run(True)[0] == {torch.float32}


def test_each_window_is_computed_once():
    plan = _plan(3, 3, (16, 16, 8))
    calls = []
    net = _net(3, 3)
    pred = Predictor(ModelBundle.of(net, plan), InferConfig(overlap=0.5, batch_size=1, crop="none"), "cpu")
    x = torch.randn(1, 16, 16, 40)
    spec = WindowSpec(roi=(16, 16, 8), overlap=0.5, blend="gaussian", batch_size=1, out_channels=3)
    list(rolling_windows(x, lambda w: calls.append(1) or pred.net(w), spec=spec, device="cpu", buffer_device="cpu"))
    assert len(calls) == 9  # z starts 0, 4, ..., 32: (40 - 8) / 4 + 1


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_window_softmax_is_in_place_and_equals_torch(layout):
    """The window stage's peak is its (B, K, *roi) arrays: the softmax reuses the logits' array."""
    from volseg.inference.tta import _softmax_

    x = (torch.randn(3, 7, 6, 5, 4) * 20).contiguous(memory_format=layout)
    ref = torch.softmax(x, 1)
    ptr = x.data_ptr()
    out = _softmax_(x)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, ref)


def test_resample_linear_matches_simpleitk():
    """The torch resampler (CPU here, the same code on CUDA) equals SimpleITK's linear
    resampling on axis-aligned grids, interior and edges (nearest extrapolation)."""
    rng = np.random.default_rng(0)
    arr = rng.random((13, 17, 19)).astype(np.float32)  # [z, y, x]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 1.1, 2.5))
    img.SetOrigin((4.0, -3.0, 7.0))
    out_grid = sitk.Image([23, 11, 29], sitk.sitkFloat32)
    out_grid.SetSpacing((0.7, 1.7, 1.1))
    out_grid.SetOrigin((4.3, -2.5, 6.4))
    ref = sitk.GetArrayFromImage(sitk.Resample(img, out_grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, useNearestNeighborExtrapolator=True))
    from volseg.preprocessing.geometry import Grid, grid_coordinates

    g = lambda im: Grid(im.GetSize(), im.GetOrigin(), im.GetSpacing(), im.GetDirection())  # noqa: E731
    coords = grid_coordinates(g(img), g(out_grid))
    got = resample_linear(torch.from_numpy(arr.transpose(2, 1, 0).copy()), coords).numpy().transpose(2, 1, 0)
    assert got.shape == ref.shape
    # inside the source grid (up to half a voxel beyond the edge centres) both interpolate
    # linearly; beyond it SimpleITK's nearest extrapolator also rounds the in-range axes
    inside = [(u >= -0.5) & (u <= n - 0.5) for u, n in zip(coords, img.GetSize())]
    mask = inside[2][:, None, None] & inside[1][None, :, None] & inside[0][None, None, :]
    assert mask.sum() > 0.7 * mask.size and (~mask).sum() > 0
    assert np.abs(got - ref)[mask].max() < 1e-5
    assert got.min() >= arr.min() and got.max() <= arr.max()


def test_canonical_geometry_matches_dicomorient():
    rng = np.random.default_rng(1)
    for d in [(-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 0, 1, 1, 0, 0, 0, 1, 0), (0.94, -0.34, 0, 0.34, 0.94, 0, 0, 0, 1), (0, -1, 0, 0, 0, 1, -1, 0, 0)]:
        u, _, vt = np.linalg.svd(np.array(d, float).reshape(3, 3))
        arr = rng.random((7, 5, 6)).astype(np.float32)
        img = sitk.GetImageFromArray(arr)
        img.SetDirection(tuple((u @ vt).ravel()))
        img.SetSpacing((0.7, 1.1, 2.0))
        img.SetOrigin((3.0, -4.0, 5.0))
        canon = to_canonical(img, "RAS")
        grid, perm, sign = canonical_geometry(img, "RAS")
        assert grid.size == canon.GetSize() and np.allclose(grid.origin, canon.GetOrigin()) and np.allclose(grid.direction, canon.GetDirection())
        assert np.array_equal(canonical_view(arr, perm, sign), sitk.GetArrayFromImage(canon).transpose(2, 1, 0))


def _ct(shape_zyx=(30, 64, 72), spacing=(0.8, 0.8, 2.5), seed=0):
    """A CT-like scan: air (-1000 HU) around an off-centre box of tissue; LPS-stored."""
    rng = np.random.default_rng(seed)
    arr = np.full(shape_zyx, -1000, np.int16)
    arr[4:26, 10:40, 20:60] = rng.integers(-100, 200, (22, 30, 40))
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -20.0, 30.0))
    return img


def test_streamed_restore_equals_whole_volume_restore():
    """Slab by slab (with odd slab sizes) gives the same labels and probabilities as one slab."""
    plan = _plan(4, spacing=(1.5, 1.5, 2.0))
    img = _ct()
    shape = preprocess([img], plan)["image"].shape[1:]
    logits = torch.randn(4, *shape) * 3
    logits[3] -= 10  # a class that never wins: skipped when only labels are restored
    probs = torch.softmax(logits, 0)
    whole = ScanRestorer(plan, img, probabilities=True)
    whole.add(0, shape[2], lambda c: probs[c])
    streamed = ScanRestorer(plan, img, probabilities=True)
    for z0, z1 in [(0, 1), (1, 5), (5, 6), (6, shape[2])]:
        streamed.add(z0, z1, lambda c, z0=z0, z1=z1: probs[c, ..., z0:z1])
    assert np.array_equal(whole.labels(), streamed.labels())
    labels_only = ScanRestorer(plan, img)
    for z0, z1 in [(0, 3), (3, shape[2])]:
        labels_only.add(z0, z1, lambda c, z0=z0, z1=z1: probs[c, ..., z0:z1])
    assert np.array_equal(labels_only.labels(), whole.labels())
    assert np.abs(whole.probabilities.astype(int) - streamed.probabilities.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="does not continue"):
        streamed.add(3, 4, lambda c: probs[c, ..., 3:4])


def test_crop_keeps_background_outside_and_labels_inside():
    from volseg.preprocessing.crop import foreground_box

    plan = _plan(3, patch=(16, 16, 8))
    img = _ct()
    box = foreground_box([img], plan, margin_mm=0.0)
    pre = preprocess([img], plan)["image"]
    (x0, x1), (y0, y1), (z0, z1) = box
    assert 0 < x0 and x1 < pre.shape[1] and 0 < y0 and y1 < pre.shape[2] and 0 < z0 and z1 < pre.shape[3]
    # the box holds every preprocessed voxel above -500 HU (norm: HU / 500), give or take one
    # voxel of interpolation; (the grid's last slice lies beyond the scan, filled with 0 HU by
    # resample's default value, hence [..., :-1])
    body = np.zeros(pre.shape[1:], bool)
    body[..., :-1] = pre[0, ..., :-1] > -1.0
    assert body[max(x0 - 1, 0) : x1 + 1, max(y0 - 1, 0) : y1 + 1, max(z0 - 1, 0) : z1 + 1].sum() == body.sum() > 0
    assert (x1 - x0) * (y1 - y0) * (z1 - z0) < 0.5 * body.size
    # windows that miss the box are skipped: inside it the probabilities are those of the whole
    # volume (every window covering a voxel in the box is kept); outside it, background
    pred = Predictor(ModelBundle.of(_net(3, 3), plan), InferConfig(crop="windows", crop_margin=0.0, overlap=0.5), "cpu")
    whole = pred.probabilities(pre).astype(np.float32)
    cropped = pred.probabilities(pre, box).astype(np.float32)
    inside = (slice(None), slice(x0, x1), slice(y0, y1), slice(z0, z1))
    assert np.abs(cropped[inside] - whole[inside]).max() < 1e-3
    outside = np.ones(pre.shape[1:], bool)
    outside[inside[1:]] = False
    assert (cropped[0][outside] == 1).all() and (cropped[1:, outside] == 0).all()
    assert not np.allclose(whole[0][outside], 1)  # the network does see something in the air
    calls = []
    net = pred.net
    pred.net = lambda w: calls.append(len(w)) or net(w)
    pred.probabilities(pre, box)
    n_box = sum(calls)
    calls.clear()
    pred.probabilities(pre)
    assert n_box <= sum(calls)  # as many or fewer windows: only those that miss the box are skipped
    tiled = Predictor(ModelBundle.of(pred.model, plan), InferConfig(crop="box", crop_margin=0.0), "cpu")
    calls.clear()
    tiled.net = lambda w: calls.append(len(w)) or net(w)
    approx = tiled.probabilities(pre, box).astype(np.float32)
    assert sum(calls) < n_box  # the box alone is tiled: fewer windows
    assert (approx[0][outside] == 1).all() and np.abs(approx[inside] - whole[inside]).mean() < 0.05
    # through predict(): the same box from the raw scan, label maps on the scan grid
    out = pred.predict([img])
    assert out["box"] == box
    full = Predictor(ModelBundle.of(_net(3, 3), plan), InferConfig(crop="none"), "cpu").predict([img])["labels"]
    tissue = sitk.GetArrayViewFromImage(img) > -500
    lab = out["labels"]
    assert lab.shape == full.shape and lab.dtype == np.uint8
    assert (lab[:2] == 0).all() and (lab[:, :5] == 0).all()  # air slices and rows: background
    assert np.mean(lab[tissue] == full[tissue]) > 0.99  # tissue at the box edge can differ by interpolation
    assert Predictor(ModelBundle.of(_net(3, 3), plan), InferConfig(crop="windows"), "cpu").predict([sitk.Image(img) * 0 - 1000])["box"] is None


@pytest.mark.slow
def test_memory_is_bounded_by_plan_memory_not_classes_times_volume(tmp_path):
    """Peak RSS of predict() with 48 classes on a mid-size scan, measured in a subprocess, stays
    near plan_memory's bound, far below the classes x volume float16 array of a non-streaming
    engine (which this engine used to make)."""
    code = r"""
import json, resource, sys, numpy as np, SimpleITK as sitk, torch
from volseg.config import InferConfig
from volseg.data.plan import ChannelNorm, PreprocessingPlan
from volseg.inference import ModelBundle, Predictor
from volseg.inference.windows import estimate_memory
torch.set_num_threads(1)
def _water_with_air(shape):  # a CT in HU: water and one voxel of air (all zeros is not HU)
    a = np.zeros(shape, np.int16); a.flat[0] = -1000; return a
k = 48
plan = PreprocessingPlan(spacing=(1.0, 1.0, 1.0), orientation="RAS", channels=("CT",), norms=(ChannelNorm("ct", -1000, 1000, 0, 500),),
            label_values=tuple(range(k)), label_names=tuple(map(str, range(k))), spatial_dims=3, patch_size=(32, 32, 8), slice_axis=2)
img = sitk.GetImageFromArray(_water_with_air((160, 160, 160)))
net = torch.nn.Conv3d(1, k, 1)
pred = Predictor(ModelBundle.of(net, plan), InferConfig(crop="none", overlap=0.0, batch_size=2), "cpu")
pred.predict([sitk.GetImageFromArray(_water_with_air((20, 40, 40)))])  # warm-up: lazy imports, allocator
import gc; gc.collect()
def hwm():  # peak RSS since the last reset, bytes
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
try:  # reset the peak so that only predict() is measured, not imports and the warm-up before it
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
pred.predict([img])
peak = hwm()
bound = estimate_memory((160, 160, 160), (1, 1, 1), (1, 1, 1), k, (32, 32, 8), overlap=0.0, batch_size=2)["total"]
growth = peak - before
print(json.dumps({"growth": growth, "bound": bound, "dense": k * 160 * 160 * 160 * 2}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(r)
    assert r["bound"] < 0.5 * r["dense"]
    # RSS growth includes allocator slack and first-use allocations: measured 105-125 MiB against a
    # bound of 87 MiB. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked pytest parent
    # across exec (293 MiB "growth" inside the full suite). A non-streaming engine needs the
    # dense array alone (375 MiB), so half of it stays the line that tells the two apart
    assert r["growth"] < r["bound"] + 100 * 2**20 and r["growth"] < 0.5 * r["dense"], r


@pytest.mark.parametrize("spacing, norm", [((1.6, 1.6, 2.5), ChannelNorm("ct", -1000, 1000, 0, 500)), ((1.0, 1.3, 2.0), ChannelNorm("zscore"))])
def test_torch_preprocessing_matches_simpleitk(spacing, norm):
    """The GPU path's preprocessing, run here on the CPU: the same volume as SimpleITK's,
    exactly without anti-aliasing and within 1% of the intensity spread with it (recursive vs
    exact Gaussian); compared inside the grid."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    arr = (ndimage.gaussian_filter(rng.normal(size=(24, 50, 44)), 2) * 3000).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.8, 2.5))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    img.SetOrigin((5.0, 6.0, 7.0))
    plan = _plan(3, spacing=spacing, norm=norm)
    ref = preprocess([img], plan)["image"]
    got = preprocess([img], plan, device="cpu")["image"].numpy()
    assert got.shape == ref.shape
    tol = 0.01 * ref.std() if max(np.array(spacing) / (0.8, 0.8, 2.5)) > 1.5 else 1e-5
    assert np.abs(got - ref)[:, 1:-1, 1:-1, 1:-1].max() < tol


def test_cuda_out_of_memory_retries_on_the_cpu(monkeypatch, caplog):
    plan = _plan(3)
    pred = Predictor(ModelBundle.of(_net(3, 3), plan), InferConfig(crop="none"), "cpu")
    real = Predictor._stream
    seen = []

    def flaky(self, image, box, reference, probabilities, buffer_device):
        seen.append(buffer_device)
        if buffer_device is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, image, box, reference, probabilities, buffer_device)

    monkeypatch.setattr(Predictor, "_stream", flaky)
    out = pred.predict([_ct()])
    assert seen == [None, torch.device("cpu")] and out["labels"].shape == (30, 64, 72)
    assert "retrying" in caplog.text


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("stitch_on", ["gpu", "cpu"])
def test_cuda_chain_matches_cpu(stitch_on, monkeypatch):
    """The whole chain on the GPU (torch preprocessing, AMP windows, stitching and restore on
    the device) or with CPU stitching (the low-memory fallback) gives the CPU's labels."""
    plan = _plan(4, patch=(32, 32, 16), spacing=(1.0, 1.0, 2.5))  # no anti-aliasing: the same volume on both
    img = _ct((40, 96, 88))
    cpu = Predictor(ModelBundle.of(_net(3, 4), plan), InferConfig(), "cpu").predict([img], probabilities=True)
    gpu = Predictor(ModelBundle.of(_net(3, 4), plan), InferConfig(), "cuda")
    if stitch_on == "cpu":
        monkeypatch.setattr(gpu, "_buffer_device", lambda *a: torch.device("cpu"))
    out = gpu.predict([img], probabilities=True)
    assert out["box"] == cpu["box"]
    assert np.mean(out["labels"] == cpu["labels"]) > 0.98  # AMP and the exact Gaussian differ a little
    assert np.abs(out["probabilities"].astype(int) - cpu["probabilities"].astype(int)).mean() < 3


@pytest.mark.cuda
@cuda
def test_cuda_rolling_engine_equals_monai():
    from monai.inferers import sliding_window_inference

    plan = _plan(3, patch=(16, 16, 8))
    pred = Predictor(ModelBundle.of(_net(3, 3), plan), InferConfig(crop="none"), "cuda")
    x = torch.randn(1, 30, 20, 41)
    ours = pred.probabilities(x.numpy()).astype(np.float32)
    with torch.no_grad():
        ref = sliding_window_inference(x[None].cuda(), (16, 16, 8), 4, pred.net, 0.5, "gaussian")[0].cpu().numpy()
    assert np.abs(ours - ref).max() < 5e-3
