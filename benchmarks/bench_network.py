"""The network stage alone: one U-Net forward pass over a batch of windows, per precision and
memory-format lever, against float32 (the baseline, measured in the same run).

Rows: ``fp32`` (contiguous float32, what MONAI's recipe runs on a CPU), ``bf16`` (bfloat16
autocast: volseg's ``infer.amp`` on a CPU with native bf16), ``fp32_cl`` / ``bf16_cl`` (the same
in ``channels_last_3d``), ``bf16_clin`` (contiguous weights, ``channels_last_3d`` input windows:
what a predictor can do without converting a model it shares with training); a ``_inorm``
suffix (``fp32_inorm``, ``bf16_cl_inorm``, ...) runs the same network and weights with
``torch.nn.InstanceNorm3d`` modules, as volseg built instance norm before 2026-12-01 (it now
builds the same arithmetic as ``GroupNorm`` with one channel per group). The rows
alternate ``--repeat`` times after one warm-up call each; the median is reported with the ratio
fp32 / row and the agreement of the argmax with fp32's. The network is untrained (random weights, zero biases): times are what this measures;
the agreement of a trained network is in ``bench_inference.py``'s ``amp`` row. Not measured:
stitching, preprocessing, restore (``bench_inference.py``), ``torch.compile``, GPUs.

    python benchmarks/bench_network.py                       # 32..320 U-Net, 2 windows of 128 x 128 x 64
    python benchmarks/bench_network.py --rows fp32 bf16 --features 16 32 64 128 --roi 64 64 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional, Sequence

ROWS = ("fp32", "bf16", "fp32_cl", "bf16_cl", "bf16_clin", "fp32_inorm", "bf16_inorm", "fp32_cl_inorm", "bf16_cl_inorm")


def instance_norm_modules(net):
    """A copy of ``net`` whose one-channel-per-group GroupNorms are InstanceNorm3d (same weights)."""
    import copy

    from torch import nn

    net = copy.deepcopy(net)
    for mod in list(net.modules()):
        for name, child in mod.named_children():
            if isinstance(child, nn.GroupNorm) and child.num_groups == child.num_channels:
                inorm = nn.InstanceNorm3d(child.num_channels, eps=child.eps, affine=True)
                inorm.load_state_dict(child.state_dict())
                setattr(mod, name, inorm)
    return net


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256, 320], help="U-Net features (default: gpu_fullres's)")
    p.add_argument("--roi", type=int, nargs=3, default=(128, 128, 64), help="window, voxels (default 128 128 64)")
    p.add_argument("--batch", type=int, default=2, help="windows per call (default 2)")
    p.add_argument("--classes", type=int, default=14, help="output classes (default 14)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=3, help="alternated timed calls per row (default 3)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import copy

    import torch

    from volseg.config import ModelConfig
    from volseg.nets import build_network
    from volseg.runtime import amp_dtype

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = amp_dtype(torch.device("cpu")) == torch.bfloat16
    if not bf16 and any(r.startswith("bf16") for r in args.rows):
        print("this CPU has no native bf16 (amp_dtype gives float32): the bf16 rows emulate it", flush=True)
    torch.manual_seed(0)
    net = build_network(ModelConfig(features=tuple(args.features), norm="instance"), 1, args.classes).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    x = torch.randn(args.batch, 1, *args.roi)
    cl, contiguous = torch.channels_last_3d, torch.contiguous_format
    parts = {r: set(r.split("_")) for r in args.rows}  # "bf16_cl_inorm" -> {"bf16", "cl", "inorm"}
    nets = {r: (instance_norm_modules(net) if "inorm" in parts[r] else copy.deepcopy(net)).to(memory_format=cl if "cl" in parts[r] else contiguous)
            for r in args.rows}
    inputs = {r: x.contiguous(memory_format=cl if {"cl", "clin"} & parts[r] else contiguous) for r in args.rows}

    def call(row: str):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=row.startswith("bf16")):
            return nets[row](inputs[row]).float().argmax(1)

    times = {r: [] for r in args.rows}
    labels = {r: call(r) for r in args.rows}  # warm-up
    for _ in range(args.repeat):
        for row in args.rows:
            t = time.perf_counter()
            call(row)
            times[row].append(time.perf_counter() - t)
    base = statistics.median(times["fp32"]) if "fp32" in times else None
    print(f"U-Net {args.features}, {args.batch} x {list(args.roi)} windows, {args.classes} classes, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, native bf16: {bf16}")
    print("| row | median s | fp32/row | argmax = fp32's | all runs (s) |\n|---|---:|---:|---:|---|")
    for row in args.rows:
        med = statistics.median(times[row])
        ratio = f"{base / med:.2f}x" if base else "-"
        agree = f"{(labels[row] == labels['fp32']).float().mean().item():.4f}" if "fp32" in labels else "-"
        print(f"| {row} | {med:.2f} | {ratio} | {agree} | {', '.join(f'{t:.2f}' for t in times[row])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
