"""The predictor: one object used by validation during training and by ``volseg infer``.

The windows (MONAI's placement and Gaussian importance map, so the result equals
``monai.inferers.sliding_window_inference`` on the whole volume) are computed **once each** and
accumulated into a rolling buffer one window deep along z (:func:`~volseg.inference.windows.rolling_windows`). As soon as
the windows of one z row are done, the slab below the next row is final: it is normalised and
handed on -- to the running argmax on the preprocessed grid (:meth:`Predictor.predict_index`,
validation), to a float16 array (:meth:`Predictor.probabilities`) or, in
:meth:`Predictor.predict`, straight to :class:`~volseg.preprocessing.ScanRestorer`, which
resamples it onto the scan's own grid with a running argmax. So nothing of size classes x
volume exists, whatever the number of classes; :func:`~volseg.inference.windows.estimate_memory` sizes the buffers.

Speed levers (``infer`` config). Exact: ``crop: windows`` (the default) skips windows that miss
the body box (CT: > -500 HU on the raw scan, MRI: nonzero; background outside the box), the
window batch (``batch_size``, shrunk by :func:`window_batch` for many classes), ``threads``,
``torch.inference_mode`` always. Approximate (measured in benchmarks/README.md): ``crop: box``
(tile the box only), ``window_scale`` > 1 and a lower ``overlap``. On CUDA the whole chain runs
on the GPU: :func:`~volseg.preprocessing.preprocess` (torch backend), the windows under AMP, the buffer
and the restore on the device when measured free memory allows, else on the CPU (logged); a
CUDA out-of-memory error retries the scan with CPU stitching.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ..config import ConfigError, InferConfig
from ..postprocessing import largest_component
from ..preprocessing import ScanRestorer, foreground_box, preprocess
from ..runtime import resolve_device
from .advice import warn_if_thin
from .bundle import ModelBundle, load_bundle
from .tta import WindowNet, mirror_flips
from .windows import Box, Slab, WindowSpec, _widen, rolling_windows, stitching_bytes, window_batch, window_size

log = logging.getLogger(__name__)

__all__ = ["Predictor"]


class Predictor:
    """Sliding-window predictor of a :class:`~volseg.inference.bundle.ModelBundle`."""

    def __init__(self, bundle: ModelBundle, infer: Optional[InferConfig] = None, device: Any = "auto", progress: bool = False):
        """``bundle``: the networks (one, or an ensemble trained on the same plan: each window's
        probabilities are averaged over them, and over the TTA mirrors, before blending, so the
        stitching buffers are those of one model whatever the number of members), their plan
        and trained config. ``infer``: the inference settings (default: the bundle's)."""
        import torch

        self.bundle = bundle
        self.device: Any = resolve_device(device) if isinstance(device, str) else device
        self.models = [m.to(self.device).eval() for m in bundle.networks]
        self.layout: Any = None  # the window layout the networks take (None: contiguous)
        if bundle.owned and self.device.type == "cpu" and bundle.plan.spatial_dims == 3:
            # oneDNN's convolutions and the group/instance norms (built as GroupNorm) run without
            # layout copies in channels_last_3d (faster in float32 and bfloat16, argmax equal to
            # float rounding: benchmarks/README.md, bench_network.py). Only for
            # networks the bundle owns (never the one training shares with its validation);
            # CUDA keeps the contiguous layout (not measured there).
            self.layout = torch.channels_last_3d
            self.models = [m.to(memory_format=self.layout) for m in self.models]
        self.model = self.models[0]
        self.plan = bundle.plan
        self.infer = infer if infer is not None else bundle.infer
        self.progress = progress
        valid = dict(zip(self.plan.label_values[1:], self.plan.label_names[1:]))
        if set(self.infer.largest_component) - set(valid):
            raise ConfigError(f"infer.largest_component={list(self.infer.largest_component)}: label values "
                              f"{sorted(set(self.infer.largest_component) - set(valid))} are not foreground labels of this model; valid: {valid}.")
        self.run_info: dict = dict(bundle.info)
        self.net = WindowNet(self.models, self.plan, self.device, self.infer.amp, mirror_flips(self.plan, self.infer.tta), self.layout)
        if self.infer.threads:
            torch.set_num_threads(self.infer.threads)
            log.info("torch threads: %d", self.infer.threads)

    @classmethod
    def from_run(cls, run_dir: Union[str, Path, Sequence[Union[str, Path]]], device: str = "auto", checkpoint: str = "best",
                 overrides: Optional[dict] = None, progress: bool = False) -> Predictor:
        """The predictor of run folder(s) ``run_dir``: :func:`~volseg.inference.bundle.load_bundle`
        (a run, a cross-validation parent, or several folders as one ensemble; ``overrides``:
        keys of the ``infer`` section) on ``device``."""
        return cls(load_bundle(run_dir, checkpoint, overrides), None, device, progress=progress)

    @property
    def trained(self):
        """The (first) run's config, or None when not known."""
        return self.bundle.trained

    # -- stitching ----------------------------------------------------------------------------
    def _buffer_device(self, shape: Sequence[int], roi: Sequence[int]):
        """Where the ring buffer and the restore live: the GPU when measured free memory holds
        the window engine's buffers (:func:`~volseg.inference.windows.stitching_bytes`) twice
        over (activations need room too), else the CPU."""
        import torch

        if self.device.type != "cuda":
            return self.device
        free, _ = torch.cuda.mem_get_info(self.device)
        need = sum(stitching_bytes(shape[:2], roi, self.plan.out_channels, self.infer.batch_size).values())
        fits = 2 * need < free
        log.info("stitching buffer %.2f GiB on %s (GPU free %.2f GiB)", need / 2**30, "GPU" if fits else "CPU", free / 2**30)
        return self.device if fits else torch.device("cpu")

    def slabs(self, image, box: Optional[Box] = None, buffer_device=None) -> Iterator[Slab]:
        """Preprocessed ``(C, X, Y, Z)`` -> :class:`~volseg.inference.windows.Slab` s covering z
        in order; background outside ``box`` (a body box). ``infer.crop``: ``windows`` skips the
        windows that miss the box (inside it the result is unchanged); ``box`` tiles only the box
        (widened to one window where needed), fewer windows but placed differently: approximate.
        Consume each slab before asking for the next."""
        import torch
        from monai.networks import eval_mode

        x = image.float() if torch.is_tensor(image) else torch.as_tensor(np.asarray(image), dtype=torch.float32)
        if x.ndim != 4:
            raise ValueError(f"expected a preprocessed (C, X, Y, Z) volume, got shape {tuple(x.shape)}")
        shape = tuple(x.shape[1:])
        tile = box if box is not None and self.infer.crop == "box" else None
        if tile is not None:
            tile = _widen(shape, tile, window_size(self.plan, self.infer.window_scale, [b - a for a, b in tile]))
            x = x[:, tile[0][0] : tile[0][1], tile[1][0] : tile[1][1], tile[2][0] : tile[2][1]]
        off = [a for a, _ in tile] if tile else [0, 0, 0]
        roi = window_size(self.plan, self.infer.window_scale, tuple(x.shape[1:]))
        buffer_device = buffer_device or self._buffer_device(x.shape[1:], roi)

        def make(z0, z1, parts, xy):
            return Slab(z0, z1, parts, xy, shape[:2], self.plan.sigmoid, buffer_device, box, order)

        order = tuple(self.plan.label_values.index(v) for v in self.plan.regions_class_order) if self.plan.has_regions else None

        # eval mode for this call only (validation calls it on a training network; the previous
        # mode is restored): no dropout, no batch-norm statistics updates, one output
        with eval_mode(*self.models), torch.inference_mode():
            if off[2] > 0:
                yield make(0, off[2], [], ((0, 1), (0, 1)))
            batch = window_batch(self.infer.batch_size, self.plan.out_channels, roi)
            if batch < self.infer.batch_size:
                log.info("window batch %d -> %d: %d classes x %s voxels per window", self.infer.batch_size, batch, self.plan.out_channels, list(roi))
            spec = WindowSpec(roi=roi, overlap=self.infer.overlap, blend=self.infer.blend, batch_size=batch,
                              out_channels=self.plan.out_channels, binary=self.plan.sigmoid)
            for z0, z1, parts, xy in rolling_windows(x, self.net, spec=spec, device=self.device, buffer_device=buffer_device,
                                                     keep=None if tile else box):
                yield make(z0 + off[2], z1 + off[2], parts, tuple((a + o, b + o) for (a, b), o in zip(xy, off)))
            if off[2] + x.shape[3] < shape[2]:
                yield make(off[2] + x.shape[3], shape[2], [], ((0, 1), (0, 1)))

    # -- public -------------------------------------------------------------------------------
    def probabilities(self, image, box: Optional[Box] = None) -> np.ndarray:
        """``image``: preprocessed ``(C, X, Y, Z)`` array or tensor -> ``(K, X, Y, Z)`` float16
        (2 bytes x classes x voxels: use :meth:`predict` or :meth:`predict_index` where only
        labels are needed)."""
        import torch

        shape = tuple(np.shape(image))[1:]
        out = np.empty((self.plan.out_channels, *shape), np.float16)
        for slab in self.slabs(image, box):
            for c in range(self.plan.out_channels):
                out[c, ..., slab.z0 : slab.z1] = slab.channel(c).to("cpu", torch.float16).numpy()
        return out

    def predict_index(self, image, box: Optional[Box] = None) -> np.ndarray:
        """Class indices ``(X, Y, Z)`` uint8 on the preprocessed grid (used by validation); a
        running argmax per slab, so no classes x volume array is made."""
        shape = tuple(np.shape(image))[1:]
        index = np.zeros(shape, np.uint8)
        for slab in self.slabs(image, box):
            index[..., slab.z0 : slab.z1] = slab.index().cpu().numpy()
        return self._postprocess(index)

    def _postprocess(self, index: np.ndarray) -> np.ndarray:
        values = list(self.plan.label_values)
        wanted = [values.index(v) for v in self.infer.largest_component if v in values]
        return largest_component(index, wanted)

    def prepare(self, images: Sequence, source: str = "") -> dict:
        """The network-free first step of :meth:`predict`: ``{"image": preprocessed (C, X, Y, Z)
        float32 on the predictor's device, "box": body box or None, "preprocess_s": s}``. Batch
        runs call it for the next scan in a background thread (:mod:`volseg.inference.batch`)."""
        t0 = time.perf_counter()
        # the whole chain on the GPU; on a CPU, SimpleITK's C++ is faster
        image = preprocess(images, self.plan, source=source, device=self.device if self.device.type == "cuda" else None)["image"]
        warn_if_thin(tuple(image.shape[1:]), self.plan, self.trained, source)
        return {"image": image, "box": self._crop(images, source), "preprocess_s": time.perf_counter() - t0}

    def predict(self, images: Sequence, source: str = "", probabilities: bool = False, prepared: Optional[dict] = None) -> dict:
        """SimpleITK image(s) (one per channel) -> ``{"labels": [z, y, x] label values on the
        input grid, "timing": s, "box": the body crop on the preprocessed grid or None}`` and,
        with ``probabilities=True``, ``"probabilities": (K, z, y, x)`` uint8 (x 1/255) on the
        input grid (K bytes per scan voxel). ``prepared``: :meth:`prepare`'s result for these
        images, when it was computed ahead. A CUDA out-of-memory error while stitching retries
        the scan with the buffers on the CPU."""
        import torch

        prep = prepared if prepared is not None else self.prepare(images, source)
        image, box = prep["image"], prep["box"]
        t1 = time.perf_counter()
        try:
            restorer, restore_s = self._stream(image, box, images[0], probabilities, None)
        except torch.cuda.OutOfMemoryError:
            log.warning("%s: CUDA out of memory while stitching; retrying with the buffer and restore on the CPU", source or "scan")
            torch.cuda.empty_cache()
            restorer, restore_s = self._stream(image, box, images[0], probabilities, torch.device("cpu"))
        labels = restorer.labels()
        t2 = time.perf_counter()
        if self.infer.largest_component:
            values = np.asarray(self.plan.label_values)
            index = np.searchsorted(values, labels).astype(np.uint8)
            labels = values.astype(labels.dtype)[self._postprocess(index)]
        t3 = time.perf_counter()
        out = {"labels": labels, "box": box,
               "timing": {"preprocess_s": prep["preprocess_s"], "network_s": t2 - t1 - restore_s, "restore_s": restore_s + t3 - t2}}
        if probabilities:
            out["probabilities"] = restorer.probabilities
        return out

    def _crop(self, images: Sequence, source: str) -> Optional[Box]:
        if self.infer.crop == "none":
            return None
        box = foreground_box(images, self.plan, self.infer.crop_margin)
        if box is None:
            log.warning("%s: no body voxels found (CT > -500 HU / nonzero); segmenting the whole scan", source or "scan")
        return box

    def _stream(self, image, box, reference, probabilities: bool, buffer_device):
        """Slabs -> :class:`~volseg.preprocessing.ScanRestorer`; returns it and the seconds spent restoring."""
        shape = tuple(np.shape(image))[1:]
        device = buffer_device or self._buffer_device(shape, window_size(self.plan, self.infer.window_scale, shape))  # an upper bound
        restorer = ScanRestorer(self.plan, reference, probabilities=probabilities, device=device)
        restore_s = 0.0
        for slab in self.slabs(image, box, device):
            t = time.perf_counter()
            restorer.add(slab.z0, slab.z1, slab.channel)
            restore_s += time.perf_counter() - t
        return restorer, restore_s
