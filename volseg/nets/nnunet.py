"""nnU-Net v2's two standard networks, built from a ``plans.json`` ``architecture`` entry so that
nnU-Net checkpoints load into them as they are (same module tree, same state-dict keys).

Rebuilt here rather than taken from ``dynamic-network-architectures``: that package depends on
``timm`` and so on ``torchvision``, which pins an exact torch release and would override the
user's torch (the installs nnU-Net users complain about). The two networks are ~150 lines of
plain torch; ``tests/test_nnunet_agreement.py`` checks them against nnU-Net's own predictions.

Only ``PlainConvUNet`` and ``ResidualEncoderUNet`` (BasicBlockD blocks) with the ops nnU-Net's
planners write are built; anything else is a :class:`ValueError` naming it (the plans are data,
never imported by name).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

__all__ = ["NNUNET_NETWORKS", "build_nnunet_network"]

#: the ``network_class_name`` values built here
NNUNET_NETWORKS = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "plain",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "resenc",
}


def _ops() -> Dict[str, Any]:
    from torch import nn

    return {
        "torch.nn.modules.conv.Conv2d": nn.Conv2d, "torch.nn.modules.conv.Conv3d": nn.Conv3d,
        "torch.nn.Conv2d": nn.Conv2d, "torch.nn.Conv3d": nn.Conv3d,
        "torch.nn.modules.instancenorm.InstanceNorm2d": nn.InstanceNorm2d, "torch.nn.modules.instancenorm.InstanceNorm3d": nn.InstanceNorm3d,
        "torch.nn.InstanceNorm2d": nn.InstanceNorm2d, "torch.nn.InstanceNorm3d": nn.InstanceNorm3d,
        "torch.nn.modules.batchnorm.BatchNorm2d": nn.BatchNorm2d, "torch.nn.modules.batchnorm.BatchNorm3d": nn.BatchNorm3d,
        "torch.nn.BatchNorm2d": nn.BatchNorm2d, "torch.nn.BatchNorm3d": nn.BatchNorm3d,
        "torch.nn.modules.dropout.Dropout": nn.Dropout, "torch.nn.modules.dropout.Dropout2d": nn.Dropout2d,
        "torch.nn.modules.dropout.Dropout3d": nn.Dropout3d, "torch.nn.Dropout": nn.Dropout,
        "torch.nn.LeakyReLU": nn.LeakyReLU, "torch.nn.modules.activation.LeakyReLU": nn.LeakyReLU,
        "torch.nn.ReLU": nn.ReLU, "torch.nn.modules.activation.ReLU": nn.ReLU,
        "torch.nn.GELU": nn.GELU, "torch.nn.modules.activation.GELU": nn.GELU,
    }


def _op(name: Any, key: str):
    if name is None:
        return None
    ops = _ops()
    if name not in ops:
        raise ValueError(f"plans.json architecture {key}={name!r} is not supported; supported: {sorted(set(ops))}")
    return ops[name]


def _per_stage(value: Any, n: int) -> List[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def build_nnunet_network(class_name: str, arch_kwargs: Dict[str, Any], in_channels: int, out_channels: int):
    """The network of a ``plans.json`` configuration: ``class_name`` is its
    ``architecture.network_class_name``, ``arch_kwargs`` its ``arch_kwargs`` (op names as
    strings), without deep supervision (inference); returns a torch module whose
    ``state_dict`` keys are nnU-Net's."""
    if class_name not in NNUNET_NETWORKS:
        raise ValueError(f"plans.json network_class_name={class_name!r} is not supported; supported: {sorted(NNUNET_NETWORKS)}")
    kw = dict(arch_kwargs)
    known = {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage",
             "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin",
             "nonlin_kwargs", "deep_supervision", "block", "bottleneck_channels", "stem_channels", "nonlin_first"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"plans.json arch_kwargs {unknown} are not supported for {class_name.split('.')[-1]}; known: {sorted(known)}")
    if kw.get("block") not in (None, "dynamic_network_architectures.building_blocks.residual.BasicBlockD"):
        raise ValueError(f"plans.json arch_kwargs block={kw['block']!r} is not supported; supported: BasicBlockD")
    if kw.get("bottleneck_channels") is not None:
        raise ValueError("plans.json arch_kwargs bottleneck_channels is set (BottleneckD blocks): not supported")
    n = int(kw["n_stages"])
    spec = _Spec(
        conv=_op(kw["conv_op"], "conv_op"), norm=_op(kw.get("norm_op"), "norm_op"), norm_kw=dict(kw.get("norm_op_kwargs") or {}),
        drop=_op(kw.get("dropout_op"), "dropout_op"), drop_kw=dict(kw.get("dropout_op_kwargs") or {}),
        act=_op(kw.get("nonlin"), "nonlin"), act_kw=dict(kw.get("nonlin_kwargs") or {}), bias=bool(kw.get("conv_bias", False)),
        nonlin_first=bool(kw.get("nonlin_first", False)),
    )
    features = _per_stage(kw["features_per_stage"], n)
    kernels = _per_stage(kw["kernel_sizes"], n)
    strides = _per_stage(kw["strides"], n)
    decoder_convs = _per_stage(kw["n_conv_per_stage_decoder"], n - 1)
    if NNUNET_NETWORKS[class_name] == "plain":
        encoder = _PlainEncoder(spec, in_channels, features, kernels, strides, _per_stage(kw["n_conv_per_stage"], n))
    else:
        encoder = _ResidualEncoder(spec, in_channels, features, kernels, strides, _per_stage(kw["n_blocks_per_stage"], n), kw.get("stem_channels"))
    return _UNet(encoder, _Decoder(encoder, spec, out_channels, decoder_convs))


class _Spec:
    """The ops and their arguments, as nnU-Net's blocks take them."""

    def __init__(self, conv, norm, norm_kw, drop, drop_kw, act, act_kw, bias: bool, nonlin_first: bool):
        self.conv, self.norm, self.norm_kw, self.drop, self.drop_kw = conv, norm, norm_kw, drop, drop_kw
        self.act, self.act_kw, self.bias, self.nonlin_first = act, act_kw, bias, nonlin_first
        self.dims = 3 if "3d" in conv.__name__ else 2


def _vec(value: Any, dims: int) -> List[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * dims


def _modules():
    """The module classes, made on first use so that importing volseg does not import torch."""
    import torch
    from torch import nn

    class ConvDropoutNormReLU(nn.Module):
        # the conv (and norm, nonlin) are registered twice, as attributes and inside
        # all_modules, exactly as nnU-Net does: its state dicts hold both key sets
        def __init__(self, spec: _Spec, cin: int, cout: int, kernel, stride, bias=None, norm=True, act=True, drop=True):
            super().__init__()
            kernel, stride = _vec(kernel, spec.dims), _vec(stride, spec.dims)
            ops = []
            self.conv = spec.conv(cin, cout, kernel, stride, padding=[(k - 1) // 2 for k in kernel], dilation=1, bias=spec.bias if bias is None else bias)
            ops.append(self.conv)
            if drop and spec.drop is not None:
                self.dropout = spec.drop(**spec.drop_kw)
                ops.append(self.dropout)
            if norm and spec.norm is not None:
                self.norm = spec.norm(cout, **spec.norm_kw)
                ops.append(self.norm)
            if act and spec.act is not None:
                self.nonlin = spec.act(**spec.act_kw)
                ops.append(self.nonlin)
            if spec.nonlin_first and norm and act and spec.norm is not None and spec.act is not None:
                ops[-1], ops[-2] = ops[-2], ops[-1]
            self.all_modules = nn.Sequential(*ops)

        def forward(self, x):
            return self.all_modules(x)

    class StackedConvBlocks(nn.Module):
        def __init__(self, spec: _Spec, n: int, cin: int, cout: int, kernel, stride):
            super().__init__()
            self.convs = nn.Sequential(ConvDropoutNormReLU(spec, cin, cout, kernel, stride),
                                       *[ConvDropoutNormReLU(spec, cout, cout, kernel, 1) for _ in range(1, n)])

        def forward(self, x):
            return self.convs(x)

    class BasicBlockD(nn.Module):
        def __init__(self, spec: _Spec, cin: int, cout: int, kernel, stride):
            super().__init__()
            stride = _vec(stride, spec.dims)
            self.conv1 = ConvDropoutNormReLU(spec, cin, cout, kernel, stride)
            self.conv2 = ConvDropoutNormReLU(spec, cout, cout, kernel, 1, act=False, drop=False)
            self.nonlin2 = spec.act(**spec.act_kw) if spec.act is not None else nn.Identity()
            ops: List[Any] = []
            if any(s != 1 for s in stride):
                pool = nn.AvgPool3d if spec.dims == 3 else nn.AvgPool2d
                ops.append(pool(stride, stride))
            if cin != cout:
                ops.append(ConvDropoutNormReLU(spec, cin, cout, 1, 1, bias=False, act=False, drop=False))
            self.skip = nn.Sequential(*ops) if ops else nn.Identity()

        def forward(self, x):
            out = self.conv2(self.conv1(x))
            out += self.skip(x)
            return self.nonlin2(out)

    class StackedResidualBlocks(nn.Module):
        def __init__(self, spec: _Spec, n: int, cin: int, cout: int, kernel, stride):
            super().__init__()
            self.blocks = nn.Sequential(BasicBlockD(spec, cin, cout, kernel, stride), *[BasicBlockD(spec, cout, cout, kernel, 1) for _ in range(1, n)])

        def forward(self, x):
            return self.blocks(x)

    return torch, nn, StackedConvBlocks, StackedResidualBlocks


class _Lazy:
    """Module classes made once, on first use."""

    cache: Dict[str, Any] = {}

    @classmethod
    def get(cls):
        if not cls.cache:
            torch, nn, stacked, residual = _modules()
            cls.cache.update(torch=torch, nn=nn, stacked=stacked, residual=residual)
        return cls.cache


def _PlainEncoder(spec: _Spec, cin: int, features: Sequence[int], kernels, strides, n_convs: Sequence[int]):
    m = _Lazy.get()
    nn = m["nn"]
    enc = nn.Module()
    stages = []
    for f, k, s, n in zip(features, kernels, strides, n_convs):
        stages.append(nn.Sequential(m["stacked"](spec, n, cin, f, k, s)))
        cin = f
    enc.stages = nn.Sequential(*stages)
    enc.stem = None
    _describe(enc, spec, features, kernels, strides)
    return enc


def _ResidualEncoder(spec: _Spec, cin: int, features: Sequence[int], kernels, strides, n_blocks: Sequence[int], stem_channels):
    m = _Lazy.get()
    nn = m["nn"]
    enc = nn.Module()
    stem = int(stem_channels) if stem_channels else features[0]
    enc.stem = m["stacked"](spec, 1, cin, stem, kernels[0], 1)
    cin = stem
    stages = []
    for f, k, s, n in zip(features, kernels, strides, n_blocks):
        stages.append(m["residual"](spec, n, cin, f, k, s))
        cin = f
    enc.stages = nn.Sequential(*stages)
    _describe(enc, spec, features, kernels, strides)
    return enc


def _describe(enc, spec: _Spec, features, kernels, strides) -> None:
    enc.output_channels = list(features)
    enc.kernel_sizes = list(kernels)
    enc.strides = [_vec(s, spec.dims) for s in strides]


def _Decoder(encoder, spec: _Spec, num_classes: int, n_convs: Sequence[int]):
    m = _Lazy.get()
    nn = m["nn"]
    dec = nn.Module()
    dec.encoder = encoder  # registered under the decoder too, as nnU-Net does (its keys are in the checkpoints)
    transp = nn.ConvTranspose3d if spec.dims == 3 else nn.ConvTranspose2d
    stages, transpconvs, seg_layers = [], [], []
    chans = encoder.output_channels
    for s in range(1, len(chans)):
        below, skip, stride = chans[-s], chans[-(s + 1)], encoder.strides[-s]
        transpconvs.append(transp(below, skip, stride, stride, bias=spec.bias))
        stages.append(m["stacked"](spec, n_convs[s - 1], 2 * skip, skip, encoder.kernel_sizes[-(s + 1)], 1))
        seg_layers.append(spec.conv(skip, num_classes, 1, 1, 0, bias=True))
    dec.stages = nn.ModuleList(stages)
    dec.transpconvs = nn.ModuleList(transpconvs)
    dec.seg_layers = nn.ModuleList(seg_layers)
    return dec


def _UNet(encoder, decoder):
    m = _Lazy.get()
    torch, nn = m["torch"], m["nn"]

    class NnUNetNetwork(nn.Module):
        """encoder -> decoder, the full-resolution head only (inference)."""

        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.decoder = decoder

        def forward(self, x):
            if self.encoder.stem is not None:
                x = self.encoder.stem(x)
            skips = []
            for stage in self.encoder.stages:
                x = stage(x)
                skips.append(x)
            low = skips[-1]
            dec = self.decoder
            for s in range(len(dec.stages)):
                low = dec.stages[s](torch.cat((dec.transpconvs[s](low), skips[-(s + 2)]), 1))
            return dec.seg_layers[-1](low)

    return NnUNetNetwork()
