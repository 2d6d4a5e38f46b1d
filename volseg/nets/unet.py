"""One builder for the U-Net family: ``unet``, ``residual``, ``attention``, ``dense``, ``nested``.

Nodes follow the UNet++ notation ``X[i, j]``: level ``i`` (resolution ``1 / 2**i`` per axis, or
finer along axes that ``cfg.pooling`` keeps at some levels; channels ``features[i]``), column
``j``. The encoder is ``X[i, 0]``. A decoder node is
``X[i, j] = block(cat(skips, up(X[i+1, j-1])))`` where ``up`` is a transposed conv
``features[i+1] -> features[i]`` whose kernel and stride undo pooling ``i`` (2 per axis unless
``cfg.pooling`` keeps an axis at 1). Variants only swap parts of this one graph:

* ``unet``/``residual``/``dense``: block type (:mod:`volseg.nets.blocks`); decoder nodes are the
  diagonal ``i + j = L - 1`` with skip ``X[i, 0]``.
* ``attention``: as ``unet``, with the skip gated by :class:`~volseg.nets.blocks.AttentionGate`.
* ``nested`` (UNet++): every node with ``i + j <= L - 1``; skips are ``X[i, 0..j-1]``.

Input ``(B, in_channels, *spatial)``, output logits ``(B, out_channels, *spatial)`` (no
activation; loss and inference apply sigmoid for one channel, softmax otherwise).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from volseg.config import ModelConfig, check_choice
from volseg.nets.blocks import AttentionGate, ConvBlock, DenseBlock, ResidualBlock

__all__ = ["UNetFamily", "NETWORKS", "build_network", "receptive_field",
           "count_parameters", "summarize"]

Output = Union[torch.Tensor, List[torch.Tensor]]


class UNetFamily(nn.Module):
    """U-Net family member for ``(B, in_channels, *spatial)`` input, 2D or 3D.

    Any spatial size works: the input is padded at the end of each axis (replicate) up to a
    multiple of ``cfg.input_multiple`` (``2 ** (L - 1)`` per axis unless ``cfg.pooling`` keeps an
    axis) and the output is cropped back, so the main output always has the input's spatial shape.

    Returns logits ``(B, out_channels, *spatial)``. With ``cfg.deep_supervision`` and in training
    mode it returns a ``list`` ``[main, aux1, aux2, ...]`` instead (eval mode: only ``main``):

    * diagonal variants: aux ``k`` is a 1x1 head on decoder level ``k`` with spatial size
      ``ceil(s / f)``, ``f`` the product of the first ``k`` poolings' factors along the axis
      (``2**k`` by default; not upsampled; cropped from the padded grid);
    * ``nested``: aux heads on ``X[0, L-2], ..., X[0, 1]``, all full resolution.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, out_channels: int, *,
                 block: Callable[..., nn.Module] = ConvBlock, attention: bool = False, nested: bool = False):
        super().__init__()
        f, d, L = cfg.features, cfg.spatial_dims, len(cfg.features)
        self.spatial_dims, self.out_channels, self.multiple = d, out_channels, cfg.input_multiple
        self.deep_supervision = cfg.deep_supervision
        strides, self.scales = cfg.strides, cfg.scales
        self.encoders = nn.ModuleList(block(cfg, in_channels if i == 0 else f[i - 1], f[i]) for i in range(L))
        self.pools = nn.ModuleList(Pool[Pool.MAX, d](s, stride=s) for s in strides)
        # (node, skip columns) in computation order; every node's inputs exist before it.
        self.graph: List[Tuple[Tuple[int, int], Tuple[int, ...]]] = [
            ((i, j), tuple(range(j)) if nested else (0,))
            for j in range(1, L) for i in range(L - j) if nested or i + j == L - 1]
        self.ups, self.nodes, self.gates = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for (i, j), cols in self.graph:
            key = f"{i}_{j}"
            self.ups[key] = Conv[Conv.CONVTRANS, d](f[i + 1], f[i], strides[i], stride=strides[i])
            self.nodes[key] = block(cfg, (len(cols) + 1) * f[i], f[i])
            if attention:
                self.gates[key] = AttentionGate(cfg, f[i], f[i])
        self.head_nodes = [(0, L - 1)]  # main output first, then auxiliary outputs
        if cfg.deep_supervision:
            self.head_nodes += [(0, j) for j in range(L - 2, 0, -1)] if nested else [(i, L - 1 - i) for i in range(1, L - 1)]
        self.heads = nn.ModuleList(Conv[Conv.CONV, d](f[i], out_channels, 1) for i, _ in self.head_nodes)

    def forward(self, x: torch.Tensor) -> Output:
        size = x.shape[2:]
        pad = [-s % m for s, m in zip(size, self.multiple)]
        if any(pad):
            x = F.pad(x, [p for q in reversed(pad) for p in (0, q)], mode="replicate")
        X: Dict[Tuple[int, int], torch.Tensor] = {}
        for i, enc in enumerate(self.encoders):
            x = X[i, 0] = enc(x if i == 0 else self.pools[i - 1](x))
        for (i, j), cols in self.graph:
            key = f"{i}_{j}"
            up = self.ups[key](X[i + 1, j - 1])
            skips = [self.gates[key](X[i, c], up) if self.gates else X[i, c] for c in cols]
            X[i, j] = self.nodes[key](torch.cat([*skips, up], 1))
        n = len(self.heads) if self.training else 1
        outs = []
        for (i, j), head in zip(self.head_nodes[:n], self.heads):
            crop = tuple(slice(0, math.ceil(s / f)) for s, f in zip(size, self.scales[i]))
            outs.append(head(X[i, j])[(..., *crop)])
        return outs if self.deep_supervision and self.training else outs[0]


NETWORKS: Dict[str, Callable[..., nn.Module]] = {
    "unet": UNetFamily,
    "residual": partial(UNetFamily, block=ResidualBlock),
    "attention": partial(UNetFamily, attention=True),
    "dense": partial(UNetFamily, block=DenseBlock),
    "nested": partial(UNetFamily, nested=True),
}
"""Variant name -> constructor ``(cfg, in_channels, out_channels) -> nn.Module``."""


def build_network(cfg: ModelConfig, in_channels: Optional[int] = None, out_channels: Optional[int] = None) -> nn.Module:
    """Build ``cfg.variant``. Explicit channel arguments override ``cfg``; if both are missing, 1.

    Raises :class:`~volseg.config.ConfigError` (a ``ValueError``) naming the valid variants.
    """
    check_choice("model.variant", cfg.variant, list(NETWORKS))
    return NETWORKS[cfg.variant](cfg, _pick(in_channels, cfg.in_channels), _pick(out_channels, cfg.out_channels))


def _pick(explicit: Optional[int], configured: Optional[int]) -> int:
    return explicit if explicit is not None else configured if configured is not None else 1


def _deepest_path(strides: Sequence[int]) -> List[Tuple[str, int, int]]:
    """Layers ``(kind, kernel, stride)`` along one axis from input to output through the
    bottleneck, for that axis's pooling factors. Every block (double conv, residual, dense) has
    two chained 3-wide convs; 1x1 convs and gates add nothing."""
    block = [("conv", 3, 1)] * 2
    down = [layer for s in strides for layer in (*block, ("pool", s, s))]
    up = [layer for s in reversed(strides) for layer in (("up", s, s), *block)]
    return down + block + up


def receptive_field(cfg: ModelConfig) -> Tuple[int, ...]:
    """Receptive field in voxels of one output voxel per spatial axis, for the worst grid
    alignment, along the input -> bottleneck -> output path (the widest; same for all variants)."""
    fields = []
    for axis in range(cfg.spatial_dims):
        r = 1  # extent needed at the output of the current layer, walking backwards
        for kind, k, s in reversed(_deepest_path([st[axis] for st in cfg.strides])):
            if kind == "up":  # output p reads inputs q with q*s <= p < q*s + k
                r = max((a + r - 1) // s - math.ceil((a - k + 1) / s) + 1 for a in range(s))
            else:
                r = (r - 1) * s + k
        fields.append(r)
    return tuple(fields)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def summarize(cfg: ModelConfig, in_channels: Optional[int] = None, out_channels: Optional[int] = None) -> str:
    """Multi-line text summary; builds the network on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = build_network(cfg, in_channels, out_channels)
    return "\n".join([
        f"variant: {cfg.variant}",
        f"spatial dims: {cfg.spatial_dims}",
        f"in/out channels: {_pick(in_channels, cfg.in_channels)} -> {model.out_channels}",
        f"channels per level: {', '.join(map(str, cfg.features))}",
        f"deep supervision: {cfg.deep_supervision}",
        f"pooling per level: {' '.join('x'.join(map(str, st)) for st in cfg.strides)}",
        f"receptive field: {' x '.join(map(str, receptive_field(cfg)))} voxels",
        f"required input multiple: {' x '.join(map(str, cfg.input_multiple))}",
        f"parameters: {count_parameters(model):,}",
    ])
