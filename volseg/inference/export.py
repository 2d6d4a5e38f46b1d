"""Export a trained network for deployment without volseg (TorchScript or ONNX).

The exported graph maps a window ``(B, C, *patch_size)`` of a *preprocessed* volume to class
probabilities ``(B, K, *patch_size)`` (sigmoid for one output channel or one per region, else
softmax; a region model's JSON gives ``regions_class_order`` to paint the regions back). A JSON
file beside it records the preprocessing the graph expects (the run's ``plan.json``: spacing,
orientation, per-channel normalisation, label values and names) and the window shape, so another
runtime can replay preprocessing and sliding-window stitching.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

from ..config import ConfigError, check_choice
from ..data.io import atomic_write, refuse_unsafe_outputs, write_text
from .nnunet import NnUNetPredictor, is_nnunet_folder
from .predictor import Predictor

log = logging.getLogger(__name__)

__all__ = ["export"]


def _wrapped(pred):
    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self, net, binary: bool):
            super().__init__()
            self.net, self.binary = net, binary

        def forward(self, x):
            logits = self.net(x)
            return torch.sigmoid(logits) if self.binary else torch.softmax(logits, 1)

    return Probabilities(pred.model, _sigmoid(pred)).eval()


def _sigmoid(pred) -> bool:
    # an nnU-Net model has one softmax head per label even for one foreground label; sigmoid only for regions
    return pred.plan.has_regions if isinstance(pred, NnUNetPredictor) else pred.plan.sigmoid


def export(run_dir: Union[str, Path], fmt: str = "torchscript", output: Optional[Union[str, Path]] = None, fold: Optional[str] = None) -> Path:
    """Write the network of ``run_dir`` as TorchScript (``.pt``) or ONNX (``.onnx``) plus a
    ``.json`` preprocessing description; return the model file's path. ``run_dir`` may be an
    nnU-Net v2 model folder: ``fold`` picks its fold (needed when it has several); the JSON then
    records nnU-Net's plans configuration, intensity properties, transposes and labels."""
    import torch

    check_choice("format", fmt, ("torchscript", "onnx"))
    nnunet = is_nnunet_folder(run_dir)
    if nnunet:
        pred = NnUNetPredictor.from_folder(run_dir, folds=[fold] if fold is not None else None, overrides={"tta": False}, device="cpu")
        if len(pred.models) > 1:
            raise ConfigError(f"{run_dir} has {len(pred.models)} folds {list(pred.source.folds)}; export one with --fold K.")
        base = Path(run_dir) / f"fold_{pred.source.folds[0]}"
    else:
        if fold is not None:
            raise ConfigError(f"--fold is for nnU-Net model folders; export a volseg fold by its folder (e.g. {run_dir}/fold_{fold}).")
        base = Path(run_dir)
    out = Path(output) if output else base / ("model.ts.pt" if fmt == "torchscript" else "model.onnx")
    meta_path = out.with_name(out.name.split(".")[0] + ".json")
    run_files = [p for p in Path(run_dir).rglob("*") if p.is_file() and not p.name.startswith("model.")]  # the run is the input
    refuse_unsafe_outputs([out, meta_path], run_files)
    if not nnunet:
        pred = Predictor.from_run(run_dir, device="cpu")
        if len(pred.models) > 1:  # a cross-validation folder: one file would hold only fold 0
            raise ConfigError(f"{run_dir} is an ensemble of {len(pred.models)} runs; export one of its fold folders (e.g. {run_dir}/fold_0).")
    net = _wrapped(pred)
    example = torch.randn(1, len(pred.plan.channels), *pred.plan.patch_size)
    with atomic_write(out) as tmp:
        # traced at the fixed window shape: the shape-dependent padding branches are constants
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if fmt == "torchscript":
                torch.jit.save(torch.jit.trace(net, example), str(tmp))
            else:
                torch.onnx.export(
                    net, (example,), str(tmp), input_names=["image"], output_names=["probabilities"],
                    dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}}, opset_version=17, dynamo=False,
                )
    meta = {
        "format": fmt,
        "input": {"name": "image", "shape": ["batch", len(pred.plan.channels), *pred.plan.patch_size], "dtype": "float32",
                  "axes": "(B, C, X, Y, Z) of the preprocessed volume" if pred.plan.spatial_dims == 3 else "(B, C, H, W) slices"},
        "output": {"name": "probabilities", "activation": "sigmoid" if _sigmoid(pred) else "softmax",
                   "channels": _channels(pred), "names": list(pred.plan.region_names if pred.plan.has_regions else pred.plan.label_names) if nnunet else list(pred.plan.output_names),
                   # region mode: threshold each region at 0.5 and paint it with its value, in this order
                   "regions_class_order": list(pred.plan.regions_class_order) or None},
        "preprocessing": _nnunet_record(pred) if nnunet else asdict(pred.plan),
        "model": pred.run_info,
    }
    if nnunet:
        meta["input"]["axes"] = "(B, C, *patch) of the preprocessed volume in nnU-Net's axis order: SimpleITK's (z, y, x) after transpose_forward"
    write_text(meta_path, json.dumps(meta, indent=2))
    log.info("exported %s to %s", fmt, out)
    return out


def _channels(pred) -> int:
    if isinstance(pred, NnUNetPredictor):
        return len(pred.plan.regions) if pred.plan.has_regions else len(pred.plan.label_values)
    return pred.plan.out_channels


def _nnunet_record(pred) -> dict:
    """What another runtime needs to replay nnU-Net's preprocessing and export for this network."""
    m = pred.source
    return {"nnunet_configuration": m.configuration_name, "configuration": m.config, "transpose_forward": m.plans.get("transpose_forward"),
            "transpose_backward": m.plans.get("transpose_backward"),
            "foreground_intensity_properties_per_channel": m.plans.get("foreground_intensity_properties_per_channel"),
            "channel_names": m.dataset.get("channel_names"), "labels": m.labels, "regions_class_order": m.dataset.get("regions_class_order"),
            "inference_allowed_mirroring_axes": list(m.mirror_axes) if m.mirror_axes is not None else None}
