"""Building blocks of the U-Net family, dimension-agnostic through MONAI's layer factories.

Every block maps ``(B, C_in, *spatial)`` to ``(B, C_out, *spatial)`` (same spatial size: 3-wide
kernels with padding 1), where ``*spatial`` has ``cfg.spatial_dims`` (2 or 3) entries. Blocks
take the whole :class:`~volseg.config.ModelConfig` so norm, activation and dropout are chosen
in one place (:func:`norm_act`).

Bias rule: a convolution has a bias only when ``cfg.norm == "none"``; with a norm the bias
would be cancelled by the norm's mean subtraction (and duplicated by its affine shift).
"""

from __future__ import annotations

import math
from typing import List

import torch
from monai.networks.layers.factories import Act, Conv, Dropout, Norm
from torch import nn

from volseg.config import ModelConfig

__all__ = ["conv", "activation", "norm_act", "ConvBlock", "ResidualBlock", "DenseBlock", "AttentionGate"]


def conv(cfg: ModelConfig, cin: int, cout: int, kernel: int = 3, bias: bool | None = None) -> nn.Module:
    """'Same'-padded convolution; ``bias=None`` applies the module's bias rule."""
    bias = cfg.norm == "none" if bias is None else bias
    return Conv[Conv.CONV, cfg.spatial_dims](cin, cout, kernel, padding=kernel // 2, bias=bias)


def activation(cfg: ModelConfig) -> nn.Module:
    """``relu``, ``leakyrelu`` (slope 0.01) or ``prelu`` (one shared slope)."""
    if cfg.act == "leakyrelu":
        return Act[Act.LEAKYRELU](negative_slope=0.01)
    return Act[Act.PRELU]() if cfg.act == "prelu" else Act[Act.RELU]()


def norm_act(cfg: ModelConfig, channels: int, act: bool = True) -> List[nn.Module]:
    """``[norm]`` then (if ``act``) activation for ``channels`` feature maps.

    Group norm uses ``gcd(cfg.groups, channels)`` groups so that internal layers whose width is
    not a multiple of ``cfg.groups`` (dense growth, attention bottleneck) still build.
    """
    d, layers = cfg.spatial_dims, []
    if cfg.norm == "batch":
        layers.append(Norm[Norm.BATCH, d](channels))
    elif cfg.norm == "instance":
        # instance norm built as group norm with one channel per group: the same arithmetic and
        # parameter names (weight, bias; old checkpoints load), but PyTorch's CPU group norm works
        # in channels_last_3d, where InstanceNorm3d copies to contiguous and back around each
        # call (the speed-up with channels-last inference windows: benchmarks/README.md)
        layers.append(Norm[Norm.GROUP, d](channels, channels))
    elif cfg.norm == "group":
        layers.append(Norm[Norm.GROUP, d](math.gcd(cfg.groups, channels), channels))
    return layers + [activation(cfg)] if act else layers


def _dropout(cfg: ModelConfig) -> List[nn.Module]:
    return [Dropout[Dropout.DROPOUT, cfg.spatial_dims](cfg.dropout)] if cfg.dropout > 0 else []


class ConvBlock(nn.Sequential):
    """Classic U-Net stage: (conv 3 -> [norm] -> act) x 2, then dropout if ``cfg.dropout > 0``."""

    def __init__(self, cfg: ModelConfig, cin: int, cout: int):
        super().__init__(conv(cfg, cin, cout), *norm_act(cfg, cout),
                         conv(cfg, cout, cout), *norm_act(cfg, cout), *_dropout(cfg))


class ResidualBlock(nn.Module):
    """Res-UNet stage: ``act(F(x) + P(x))`` with ``F`` = conv-[norm]-act-conv-[norm] and ``P`` the
    identity, or a 1x1 conv (+ norm) projection when the channel count changes."""

    def __init__(self, cfg: ModelConfig, cin: int, cout: int):
        super().__init__()
        *post, self.act = norm_act(cfg, cout)
        self.body = nn.Sequential(conv(cfg, cin, cout), *norm_act(cfg, cout), conv(cfg, cout, cout), *post)
        self.skip = nn.Identity() if cin == cout else nn.Sequential(conv(cfg, cin, cout, 1), *norm_act(cfg, cout, act=False))
        self.drop = nn.Sequential(*_dropout(cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.body(x) + self.skip(x)))


class DenseBlock(nn.Module):
    """Dense-UNet stage: ``layers`` densely connected conv-[norm]-act layers (each sees the block
    input and all earlier outputs, growth ``max(cout // 2, 1)``), then a 1x1 transition conv
    (-[norm]-act) to ``cout`` channels."""

    def __init__(self, cfg: ModelConfig, cin: int, cout: int, layers: int = 2):
        super().__init__()
        g = max(cout // 2, 1)
        self.layers = nn.ModuleList(nn.Sequential(conv(cfg, cin + k * g, g), *norm_act(cfg, g)) for k in range(layers))
        self.transition = nn.Sequential(conv(cfg, cin + layers * g, cout, 1), *norm_act(cfg, cout), *_dropout(cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.transition(x)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018): ``x * sigmoid(psi(act(W_x x + W_g g)))``.

    ``x`` is the encoder skip ``(B, cx, *spatial)``; ``g`` the gating signal ``(B, cg, *spatial)``,
    i.e. the coarser decoder level after its up-convolution (as in MONAI's ``AttentionUnet``), so
    both are on the same grid and the coefficients need no resampling.
    """

    def __init__(self, cfg: ModelConfig, cx: int, cg: int):
        super().__init__()
        ci = max(cx // 2, 1)
        self.wx = nn.Sequential(conv(cfg, cx, ci, 1), *norm_act(cfg, ci, act=False))
        self.wg = nn.Sequential(conv(cfg, cg, ci, 1), *norm_act(cfg, ci, act=False))
        self.psi = nn.Sequential(activation(cfg), conv(cfg, ci, 1, 1, bias=True), nn.Sigmoid())

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.psi(self.wx(x) + self.wg(g))
