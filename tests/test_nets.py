"""Tests for volseg.nets: every registered variant in 2D and 3D on odd-shaped inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from volseg import config as vcfg
from volseg.config import ConfigError, ModelConfig, load_config
from volseg.nets import NETWORKS, build_network, count_parameters, receptive_field, summarize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = (4, 8, 16, 32)
SHAPES = {2: (2, 1, 33, 35), 3: (1, 1, 33, 34, 35)}


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"features": TINY, "norm": "instance", **kw})


def seed(dims: int) -> ModelConfig:
    return load_config(CONFIGS / f"unet{dims}d_seed.yaml").model


def test_registry_matches_config_variants():
    assert set(NETWORKS) == set(vcfg.VARIANTS)


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("variant", sorted(NETWORKS))
def test_forward_backward_odd_shape(variant, dims, deep):
    torch.manual_seed(0)
    model = build_network(tiny(variant=variant, spatial_dims=dims, deep_supervision=deep), out_channels=3)
    assert (model.out_channels, model.spatial_dims) == (3, dims)
    x = torch.randn(SHAPES[dims])
    out = model.train()(x)
    if deep:
        assert isinstance(out, list) and len(out) == len(TINY) - 1  # main + one aux per lower level
        for level, aux in enumerate(out):
            scale = 1 if variant == "nested" else 2 ** level
            assert aux.shape == (x.shape[0], 3, *(math.ceil(s / scale) for s in x.shape[2:]))
    else:
        assert isinstance(out, torch.Tensor)
        out = [out]
    assert out[0].shape == (x.shape[0], 3, *x.shape[2:])
    sum(o.square().mean() for o in out).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == out[0].shape


@pytest.mark.parametrize("variant", sorted(NETWORKS))
@pytest.mark.parametrize("norm,act", [("none", "relu"), ("batch", "leakyrelu"), ("instance", "prelu"), ("group", "relu")])
def test_norms_and_acts_build(variant, norm, act):
    model = build_network(tiny(variant=variant, spatial_dims=2, norm=norm, act=act, groups=4, dropout=0.1))
    assert model(torch.randn(2, 1, 17, 19)).shape == (2, 1, 17, 19)


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_is_instance_norm_and_loads_old_checkpoints(dims):
    """``norm: instance`` builds GroupNorm with one channel per group (it computes in
    channels_last_3d on a CPU): per sample and channel, the same output as InstanceNorm (affine)
    in float32, in both layouts, and a state dict saved from InstanceNorm modules loads."""
    from torch import nn

    from volseg.nets.blocks import norm_act

    cfg = tiny(spatial_dims=dims)
    norm = norm_act(cfg, 6, act=False)[0]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels == 6
    old = (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(6, affine=True)
    torch.manual_seed(0)
    with torch.no_grad():
        old.weight.uniform_(0.5, 1.5)
        old.bias.uniform_(-1, 1)
    norm.load_state_dict(old.state_dict())  # same names and shapes: checkpoints of older runs load
    x = torch.randn(2, 6, *(9,) * dims) * 3 + 2
    assert torch.allclose(norm(x), old(x), atol=1e-5)
    if dims == 3:
        cl = x.contiguous(memory_format=torch.channels_last_3d)
        assert torch.allclose(norm(cl), old(x), atol=1e-5)


def test_channel_arguments_override_config():
    model = build_network(tiny(spatial_dims=2, in_channels=2, out_channels=4), in_channels=3)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 4, 16, 16)
    assert build_network(tiny(spatial_dims=2)).out_channels == 1


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ConfigError, match="residual"):
        ModelConfig(variant="resnet")
    cfg = tiny()
    object.__setattr__(cfg, "variant", "resnet")  # bypass config validation to reach the builder
    with pytest.raises(ValueError) as info:
        build_network(cfg)
    assert all(name in str(info.value) for name in NETWORKS)


def unet_parameters(cfg: ModelConfig, cin: int, cout: int) -> int:
    """Parameters of the plain U-Net from layer formulas: conv k^d*cin*cout (+ cout bias without
    norm), affine norm 2*c, transposed conv 2^d*cin*cout + cout, head cin*cout + cout."""
    d, f, normed = cfg.spatial_dims, cfg.features, cfg.norm != "none"

    def conv(k, a, b, bias=not normed):
        return k**d * a * b + (b if bias else 0) + (2 * b if normed else 0)

    n = sum(conv(3, cin if i == 0 else f[i - 1], c) + conv(3, c, c) for i, c in enumerate(f))
    n += sum(2**d * f[i + 1] * f[i] + f[i] + conv(3, 2 * f[i], f[i]) + conv(3, f[i], f[i]) for i in range(len(f) - 1))
    return n + f[0] * cout + cout


@pytest.mark.parametrize("dims", [2, 3])
def test_seed_parameter_count(dims):
    cfg = seed(dims)
    assert (cfg.variant, cfg.norm, cfg.features) == ("unet", "none", (64, 128, 256, 512, 1024))
    with torch.device("meta"):  # no allocation: the 3D seed has ~90M parameters
        model = build_network(cfg)
    assert count_parameters(model) == unet_parameters(cfg, 1, 1)
    if dims == 2:
        assert count_parameters(model) == 31_030_593


def test_parameter_formula_with_norm():
    cfg = tiny(spatial_dims=3, norm="batch")
    assert count_parameters(build_network(cfg, 2, 3)) == unet_parameters(cfg, 2, 3)


def test_seed_summary_and_geometry():
    cfg = seed(2)
    text = summarize(cfg)
    assert "parameters: 31,030,593" in text.splitlines()
    assert cfg.input_multiple == (16, 16) == (2 ** (len(cfg.features) - 1),) * 2
    assert "required input multiple: 16 x 16" in text
    assert f"receptive field: {receptive_field(cfg)[0]} x {receptive_field(cfg)[1]} voxels" in text


@pytest.mark.parametrize("variant", sorted(NETWORKS))
def test_anisotropic_pooling_keeps_an_axis(variant):
    """``model.pooling`` 1 on an axis: that axis keeps its size at that level (thick slices);
    the output still has the input's shape and deep supervision's outputs the levels' scales."""
    torch.manual_seed(0)
    cfg = tiny(variant=variant, deep_supervision=True, pooling=((2, 2, 1), (2, 2, 1), (2, 2, 2)))
    assert cfg.input_multiple == (8, 8, 2)
    model = build_network(cfg, out_channels=2).train()
    seen = []
    model.encoders[-1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[2:])))
    x = torch.randn(1, 1, 33, 34, 5)
    out = model(x)
    assert seen == [(5, 5, 3)]  # padded to 40 x 40 x 6, pooled by 8 x 8 x 2
    scales = [(1, 1, 1)] * 3 if variant == "nested" else [(1, 1, 1), (2, 2, 1), (4, 4, 1)]
    assert [tuple(o.shape[2:]) for o in out] == [tuple(math.ceil(s / f) for s, f in zip(x.shape[2:], sc)) for sc in scales]
    sum(o.square().mean() for o in out).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_default_pooling_is_two_everywhere_and_loads_old_checkpoints():
    """``pooling: None`` builds the same network as pooling 2 on every axis: same parameter
    names and shapes (checkpoints from before the key load) and the same output."""
    torch.manual_seed(0)
    old = build_network(tiny()).eval()
    new = build_network(tiny(pooling=((2, 2, 2),) * 3)).eval()
    new.load_state_dict(old.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(old(x), new(x))
    with pytest.raises(ConfigError, match=r"model.pooling=\[\[2, 2, 2\]\] must have 3 entries"):
        tiny(pooling=((2, 2, 2),))
    with pytest.raises(ConfigError, match=r"factors \[3\]; allowed: 1 .* or 2"):
        tiny(pooling=((2, 2, 3), (2, 2, 2), (2, 2, 2)))


@pytest.mark.parametrize("variant, pooling", [("unet", None), ("nested", None), ("unet", ((2, 1), (2, 2), (2, 1), (2, 2)))])
def test_receptive_field_matches_gradient_probe(variant, pooling):
    """Probe a 5-level net (the seed's depth) with tiny widths: the input extent along the
    second axis with non-zero gradient for an output pixel, maximised over the 16 alignments to
    the pooling grid; with anisotropic pooling that axis is pooled at two levels only."""
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, spatial_dims=2, features=(2,) * 5, norm="none", act="leakyrelu", pooling=pooling)
    model = build_network(cfg).double()
    # max-pool routes gradient to one pixel and hides paths
    model.pools = torch.nn.ModuleList(torch.nn.AvgPool2d(s, stride=s) for s in cfg.strides)
    x = torch.randn(1, 1, 16, 512, dtype=torch.float64, requires_grad=True)
    y = model(x)
    extents = []
    for col in range(240, 256):
        (g,) = torch.autograd.grad(y[0, 0, 8, col], x, retain_graph=True)
        hit = g[0, 0].abs().sum(0).nonzero().flatten()
        extents.append(int(hit.max() - hit.min()) + 1)
    assert max(extents) == receptive_field(cfg)[1]
    if pooling:
        assert receptive_field(cfg)[1] < receptive_field(cfg)[0] == receptive_field(seed(2))[0]
        return
    assert max(extents) == receptive_field(seed(2))[1]
    # textbook centred sum 1 + sum((k - 1) * jump) over the deepest path's convs and pools (= 200);
    # the worst alignment to the up-convolution grid may add a little.
    centred = 1 + sum(2 * 2 * 2**i for i in range(5)) + sum(2**i for i in range(4)) + sum(2 * 2 * 2**i for i in range(4))
    assert centred <= receptive_field(cfg)[1] <= centred + 2**4
