"""Predict with an nnU-Net v2 model folder: nnU-Net's pipeline from its plans, volseg's batch
machinery around it (inputs, DICOM in and out, statistics, sidecars, torchrun sharding).

:class:`NnUNetPredictor` has the interface :mod:`volseg.inference.scan` uses
(``prepare``/``predict``, ``plan``, ``infer``, ``run_info``, ``device``), so every output format
and the batch runner work unchanged. What it does per scan, as ``nnUNetv2_predict``:
SimpleITK array order ``(z, y, x)`` and reversed spacing, ``transpose_forward``, crop to
non-zero, normalise, resample to the configuration's spacing (:mod:`.steps`), pad to the patch,
Gaussian-weighted windows (sigma 1/8, nnU-Net's step placement; ``infer.overlap`` = 1 - step,
default 0.5), mirroring TTA over the checkpoint's allowed axes (on unless ``infer.tta`` is
false), folds averaged as logits, logits resampled back, argmax (or regions painted in
``regions_class_order``), uncropped, transposed back, then the folder's learned postprocessing.

Where it is faster and lighter than nnU-Net (benchmarks/bench_nnunet.py measures it): on a CPU
the network runs channels-last, one window per forward as nnU-Net (on CUDA ``infer.batch_size``
windows per forward), the logits accumulate in float32 in one buffer for all folds (nnU-Net: float16 per
fold, then summed), no export worker processes are spawned, and the way back resamples one
class at a time into a running argmax. On CUDA the windows run under autocast, as nnU-Net's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from ...config import ConfigError, InferConfig, from_dict
from ...data.plan import ChannelNorm, PreprocessingPlan
from ...postprocessing import largest_component
from ...runtime import resolve_device
from . import steps
from .folder import NnUNetModel, load_nnunet

log = logging.getLogger(__name__)

__all__ = ["NnUNetPredictor"]

#: the ``infer`` keys that mean something for an nnU-Net model
NNUNET_INFER_KEYS = ("overlap", "batch_size", "tta", "threads", "amp", "largest_component")


def _plan(m: NnUNetModel) -> PreprocessingPlan:
    """The model's labels, channels and window as a volseg plan (for the sidecar, statistics,
    DICOM outputs and export metadata; preprocessing itself follows the nnU-Net plans)."""
    labels = m.labels
    values = sorted({int(v) for k, vs in labels.items() if k != "ignore" for v in (vs if isinstance(vs, (list, tuple)) else [vs])})
    by_value: Dict[int, str] = {}
    for k, v in labels.items():
        if not isinstance(v, (list, tuple)) or len(v) == 1:
            by_value.setdefault(int(v[0] if isinstance(v, (list, tuple)) else v), k)
    names = tuple(by_value.get(v, f"label_{v}") for v in values)
    props = m.plans.get("foreground_intensity_properties_per_channel", {})
    norms = []
    for c, scheme in enumerate(m.config.get("normalization_schemes", [])):
        p = props.get(str(c), {})
        if scheme == "CTNormalization":
            norms.append(ChannelNorm("ct", float(p.get("percentile_00_5", 0)), float(p.get("percentile_99_5", 0)), float(p.get("mean", 0)), float(p.get("std", 1))))
        else:
            norms.append(ChannelNorm("zscore" if scheme == "ZScoreNormalization" else "none"))
    spacing = list(m.config["spacing"])
    spacing_xyz = tuple(float(s) for s in reversed(spacing)) if len(spacing) == 3 else (float(spacing[1]), float(spacing[0]), 0.0)
    regions, region_names = (), ()
    if m.has_regions:
        fg = [(k, v) for k, v in labels.items() if k not in ("background", "ignore")]
        region_names = tuple(k for k, _ in fg)
        regions = tuple(tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v])) for _, v in fg)
    return PreprocessingPlan(spacing=spacing_xyz, orientation="native", channels=tuple(m.channels), norms=tuple(norms), label_values=tuple(values),
                             label_names=names, spatial_dims=len(m.config["patch_size"]), patch_size=tuple(int(p) for p in m.config["patch_size"]),
                             slice_axis=2, regions=regions, region_names=region_names,
                             regions_class_order=tuple(int(v) for v in m.dataset.get("regions_class_order", ())),
                             ignore_label=labels.get("ignore") if isinstance(labels.get("ignore"), int) else None)


class NnUNetPredictor:
    """Sliding-window predictor of an nnU-Net v2 model folder (see the module docstring)."""

    def __init__(self, model: NnUNetModel, overrides: Optional[dict] = None, device: Any = "auto", progress: bool = False):
        from ...nets.nnunet import build_nnunet_network

        overrides = dict(overrides or {})
        extra = sorted(set(overrides) - set(NNUNET_INFER_KEYS))
        if extra:
            raise ConfigError(f"infer settings {extra} do not apply to an nnU-Net model (it follows its plans); those that do: {list(NNUNET_INFER_KEYS)}.")
        self.infer: InferConfig = from_dict({"infer": {"tta": True, **overrides}}).infer
        self.source = model
        self.device: Any = resolve_device(device) if isinstance(device, str) else device
        self.plan = _plan(model)
        self.progress = progress
        arch = model.config["architecture"]
        heads = len(self.plan.regions) if self.plan.has_regions else len(self.plan.label_values)
        self.models = []
        for fold, weights in zip(model.folds, model.weights):
            try:
                net = build_nnunet_network(arch["network_class_name"], arch["arch_kwargs"], len(model.channels), heads)
            except ValueError as exc:
                raise ConfigError(f"{model.folder / 'plans.json'}: {exc}") from None
            try:
                net.load_state_dict(weights)
            except RuntimeError as exc:
                raise ConfigError(f"{model.folder}/fold_{fold}: the checkpoint does not match plans.json's {arch['network_class_name'].split('.')[-1]} "
                                  f"({str(exc).splitlines()[0][:160]}); was it trained with a custom network (trainer {model.trainer})?") from None
            self.models.append(net.to(self.device).eval())
        # channels-last on a CPU: oneDNN's convolutions run ~25% faster on it (a 64x192x160
        # 3d_fullres window: 1.00 s vs 1.32 s on 2 cores; outputs within 4e-6)
        self.memory_format = None
        if self.device.type == "cpu":
            import torch

            self.memory_format = torch.channels_last_3d if len(model.config["patch_size"]) == 3 else torch.channels_last
            self.models = [net.to(memory_format=self.memory_format) for net in self.models]
        self.model = self.models[0]
        self.mirror_axes = model.mirror_axes if self.infer.tta else None
        # windows per forward: infer.batch_size on CUDA; one on a CPU unless asked for, as
        # nnU-Net: there batching buys no speed and multiplies the activations' memory
        # (256x256x100, 3d_fullres patch 64x192x160: 30 s / 1.5 GiB at 1 vs 34 s / 3.1 GiB at 4)
        self.batch_size = int(overrides.get("batch_size", self.infer.batch_size if self.device.type == "cuda" else 1))
        self.run_info: dict = {"nnunet": str(model.folder.resolve()), "configuration": model.configuration_name, "folds": list(model.folds),
                               "trainer": model.trainer, "tta_axes": list(self.mirror_axes or []),
                               "postprocessing": [{"fn": f, "labels_or_regions": lr} for f, lr in model.postprocessing]}
        if self.infer.threads:
            import torch

            torch.set_num_threads(self.infer.threads)
        log.info("nnU-Net %s, folds %s, TTA axes %s", model.configuration_name, list(model.folds), self.mirror_axes)

    @classmethod
    def from_folder(cls, folder: Union[str, Path], folds: Optional[Sequence[Union[int, str]]] = None, checkpoint: Optional[str] = None,
                    overrides: Optional[dict] = None, device: Any = "auto", progress: bool = False) -> NnUNetPredictor:
        return cls(load_nnunet(folder, folds, checkpoint or "final"), overrides, device, progress)

    # -- preprocessing ------------------------------------------------------------------------
    def prepare(self, images: Sequence, source: str = "") -> dict:
        """SimpleITK channel images -> the preprocessed ``(C, *grid)`` float32 array and what
        the way back needs."""
        import SimpleITK as sitk

        t0 = time.perf_counter()
        m = self.source
        if len(images) != len(m.channels):
            raise ValueError(f"{source or 'scan'}: {len(images)} channel(s) given, the model takes {len(m.channels)} ({m.channels}).")
        data = np.stack([sitk.GetArrayFromImage(img).astype(np.float32) for img in images])
        spacing = [abs(float(s)) for s in images[0].GetSpacing()][::-1]
        fwd = list(m.plans.get("transpose_forward", [0, 1, 2]))
        data = data.transpose([0, *[i + 1 for i in fwd]])
        original = [spacing[i] for i in fwd]
        before_crop = data.shape[1:]
        data, mask, box = steps.crop_to_nonzero(data)
        data = np.ascontiguousarray(data, dtype=np.float32)
        cropped = data.shape[1:]
        target = list(m.config["spacing"])
        if len(target) < 3:
            target = [original[0], *target]
        shape = steps.new_shape(cropped, original, target)
        steps.normalize(data, mask, m.config["normalization_schemes"], m.config.get("use_mask_for_norm", [False] * len(data)),
                        m.plans.get("foreground_intensity_properties_per_channel", {}))
        kw = m.config.get("resampling_fn_data_kwargs", {})
        axis = steps.separate_z(original, target, kw.get("force_separate_z"))
        data = np.stack([steps.resample(ch, shape, axis, int(kw.get("order", 3)), int(kw.get("order_z", 0))).astype(np.float32, copy=False) for ch in data])
        return {"image": data, "box": None, "preprocess_s": time.perf_counter() - t0,
                "restore": {"before_crop": before_crop, "box": box, "cropped": cropped, "original": original, "target": target}}

    # -- windows ------------------------------------------------------------------------------
    def logits(self, data: np.ndarray):
        """Preprocessed ``(C, *grid)`` -> ``(K, *grid)`` float32 logits, averaged over folds
        and mirrors, Gaussian-blended over nnU-Net's windows."""
        import torch

        patch = [int(p) for p in self.source.config["patch_size"]]
        x = torch.from_numpy(np.ascontiguousarray(data))
        pads = steps.pad_to(x.shape, patch)
        if any(p != (0, 0) for p in pads):
            x = torch.nn.functional.pad(x, [v for p in reversed(pads) for v in p])
        two_d = len(patch) < x.ndim - 1
        starts = steps.window_starts(x.shape[2:] if two_d else x.shape[1:], patch, 1.0 - self.infer.overlap)
        grid = list(itertools.product(*starts))
        slicers = [(d, g) for d in range(x.shape[1]) for g in grid] if two_d else [(None, g) for g in grid]
        heads = len(self.plan.regions) if self.plan.has_regions else len(self.plan.label_values)
        acc = torch.zeros((heads, *x.shape[1:]), dtype=torch.float32)
        weight = torch.zeros(x.shape[1:], dtype=torch.float32)
        g = torch.from_numpy(steps.gaussian(patch))
        flips = [()] + [c for i in range(len(self.mirror_axes or ())) for c in itertools.combinations([a + 2 for a in self.mirror_axes], i + 1)]
        per_window = len(flips) * len(self.models)
        batch = self.batch_size
        cuda = self.device.type == "cuda"
        bar = _bar(len(slicers), self.progress)
        with torch.inference_mode(), torch.autocast("cuda", enabled=cuda and self.infer.amp) if cuda else contextlib.nullcontext():
            for i in range(0, len(slicers), batch):
                chunk = slicers[i : i + batch]
                region = [self._region(d, s, patch) for d, s in chunk]
                windows = torch.stack([x[(slice(None), *r)] for r in region]).to(self.device)
                if self.memory_format is not None:
                    windows = windows.contiguous(memory_format=self.memory_format)
                out = None
                for net in self.models:
                    for axes in flips:
                        y = net(torch.flip(windows, axes) if axes else windows)
                        y = torch.flip(y, axes) if axes else y
                        out = y.float() if out is None else out + y.float()
                out = (out / per_window).cpu() * g
                for r, o in zip(region, out):
                    acc[(slice(None), *r)] += o
                    weight[r] += g
                bar.update(len(chunk))
        bar.close()
        acc /= weight
        return acc[(slice(None), *[slice(lo, acc.shape[k + 1] - hi) for k, (lo, hi) in enumerate(pads[1:])])]

    @staticmethod
    def _region(d, start, patch):
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
        return sl if d is None else (d, *sl)

    # -- public -------------------------------------------------------------------------------
    def predict(self, images: Sequence, source: str = "", probabilities: bool = False, prepared: Optional[dict] = None) -> dict:
        """SimpleITK image(s) -> ``{"labels": [z, y, x] on the input grid, "box": None,
        "timing": s}`` (``probabilities`` are not offered for nnU-Net models)."""
        if probabilities:
            raise ConfigError("--probabilities is not available for nnU-Net models yet.")
        prep = prepared if prepared is not None else self.prepare(images, source)
        t1 = time.perf_counter()
        logits = self.logits(prep["image"])
        t2 = time.perf_counter()
        r, m = prep["restore"], self.source
        kw = m.config.get("resampling_fn_probabilities_kwargs", {})
        current = list(m.config["spacing"]) if len(m.config["spacing"]) == 3 else [r["original"][0], *m.config["spacing"]]
        axis = steps.separate_z(current, r["original"], kw.get("force_separate_z"))
        order = list(self.plan.regions_class_order) if self.plan.has_regions else None
        n_labels = max(self.plan.label_values) + 1
        dtype = np.uint8 if n_labels <= 255 else np.uint16
        cropped = steps.restore_labels(logits, r["cropped"], axis, int(kw.get("order", 1)), int(kw.get("order_z", 0)), order, dtype)
        labels = np.zeros(r["before_crop"], dtype)
        labels[tuple(slice(a, b) for a, b in r["box"])] = cropped
        labels = labels.transpose(list(m.plans.get("transpose_backward", [0, 1, 2])))
        labels = self._postprocess(labels)
        t3 = time.perf_counter()
        return {"labels": np.ascontiguousarray(labels), "box": None,
                "timing": {"preprocess_s": prep["preprocess_s"], "network_s": t2 - t1, "restore_s": t3 - t2}}

    def _postprocess(self, labels: np.ndarray) -> np.ndarray:
        """nnU-Net's learned largest-component removal (its ``postprocessing.json``), then
        ``infer.largest_component`` if asked for."""
        for _, target in self.source.postprocessing:
            # nnU-Net keeps the largest component of the union of the labels (or regions) named
            mask = np.isin(labels, list(_flat(target)))
            keep = largest_component(mask.astype(np.uint8), [1]).astype(bool)
            labels[mask & ~keep] = 0
        if self.infer.largest_component:
            values = list(self.plan.label_values)
            index = np.searchsorted(values, labels).astype(np.uint8)
            labels = np.asarray(values, labels.dtype)[largest_component(index, [values.index(v) for v in self.infer.largest_component])]
        return labels


def _flat(x):
    if isinstance(x, (list, tuple)):
        for item in x:
            yield from _flat(item)
    else:
        yield int(x)


def _bar(total: int, on: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="windows", unit="win", disable=not on, leave=False)
