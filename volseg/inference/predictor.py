"""The predictor: one object used by validation during training and by ``volseg infer``.

:meth:`Predictor.probabilities` runs sliding-window inference (MONAI ``SlidingWindowInferer``
with Gaussian blending in 3D, ``SliceInferer`` slice by slice in 2D mode) over a preprocessed
volume ``(C, X, Y, Z)`` and returns class probabilities ``(K, X, Y, Z)`` as float16 on the CPU.
On CUDA the windows run under AMP; the stitching buffer goes to the GPU only when measured free
memory holds it (logged). Large volumes are processed in overlapping slabs along the last axis,
so the float32 stitching buffer never covers more than one slab.
:meth:`Predictor.predict` takes SimpleITK images and returns label values on their own grid.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from ..config import Config, InferConfig
from ..data.preprocess import Plan, preprocess, restore_labels

log = logging.getLogger(__name__)

__all__ = ["Predictor", "resolve_device", "largest_component"]

# float32 stitching buffer budget per slab (bytes); beyond it the volume is split into slabs
SLAB_BYTES = 512 * 1024**2


def resolve_device(device: str = "auto"):
    import torch

    from ..config import check_choice

    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu or auto.")
    return torch.device(device)


def largest_component(index: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Keep only the largest connected component (26-connectivity in 3D) of each class index in
    ``classes``; removed voxels become background. (MONAI's KeepLargestConnectedComponent needs
    scikit-image on the CPU; scipy, already a dependency, does the labelling.)"""
    from scipy import ndimage

    out = index.copy()
    structure = np.ones((3,) * index.ndim, bool)
    for k in classes:
        comp, n = ndimage.label(index == k, structure=structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[(comp > 0) & (comp != sizes.argmax())] = 0
    return out


class Predictor:
    """Sliding-window predictor for a trained network and its preprocessing plan."""

    def __init__(self, model, plan: Plan, infer: InferConfig = InferConfig(), device: str = "auto", progress: bool = False):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.plan = plan
        self.infer = infer
        self.progress = progress
        self.run_info: dict = {}

    # -- construction from a run folder ---------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: Union[str, Path], device: str = "auto", checkpoint: str = "best", overrides: Optional[dict] = None, progress: bool = False) -> "Predictor":
        """Rebuild network, plan and inference settings from a run folder (nothing else needed).
        ``overrides``: keys of the ``infer`` section, e.g. ``{"overlap": 0.25, "tta": True}``.
        A missing ``best.pt`` falls back to ``last.pt`` with a logged warning, recorded in
        ``run_info["warnings"]``. The checkpoint is loaded with ``weights_only=True``: one that
        would run code, or a corrupt config, plan or checkpoint, is a ``RunFolderError`` naming
        the file."""
        from ..nets import build_network
        from ..training.run_folder import checkpoint_path, load_checkpoint, read_config, read_plan

        run = Path(run_dir)
        ckpt, notes = checkpoint_path(run, checkpoint)
        missing = [n for n in ("config.yaml", "plan.json") if not (run / n).is_file()]
        if not ckpt.is_file():
            missing.append(f"{checkpoint}.pt" + (" (and last.pt)" if checkpoint == "best" else ""))
        if missing:
            raise FileNotFoundError(f"{run} is not a complete volseg run folder: missing {missing}.")
        cfg: Config = read_config(run, {"infer": overrides} if overrides else None)
        plan = read_plan(run)
        state = load_checkpoint(ckpt)
        model = build_network(cfg.model, len(plan.channels), plan.out_channels)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            from ..training.run_folder import RunFolderError

            raise RunFolderError(f"{ckpt}: weights do not match {run / 'config.yaml'} ({str(exc).splitlines()[0][:160]}); "
                                 "restore the run folder's files together or retrain.") from None
        pred = cls(model, plan, cfg.infer, device, progress=progress)
        pred.run_info = {"run": str(run.resolve()), "checkpoint": ckpt.name, "epoch": state.get("epoch")}
        if notes:
            pred.run_info["warnings"] = notes
        return pred

    # -- core --------------------------------------------------------------------------------
    def _inferer(self, buffer_device):
        from monai.inferers import SliceInferer, SlidingWindowInferer

        kw = dict(
            roi_size=list(self.plan.patch_size),
            sw_batch_size=self.infer.batch_size,
            overlap=self.infer.overlap,
            mode=self.infer.blend,
            sw_device=self.device,
            device=buffer_device,
            progress=self.progress,
        )
        if self.plan.spatial_dims == 2:
            return SliceInferer(spatial_dim=self.plan.slice_axis, **kw)
        return SlidingWindowInferer(**kw)

    def _net(self, x):
        import torch

        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            logits = self.model(x)
        logits = logits.float()
        return torch.sigmoid(logits) if self.plan.binary else torch.softmax(logits, 1)

    def _flips(self) -> List[tuple]:
        """Mirroring TTA axes (tensor dims of a (B, C, *spatial) batch)."""
        if not self.infer.tta:
            return [()]
        axes = [2, 3, 4]
        if self.plan.spatial_dims == 2:
            axes.remove(2 + self.plan.slice_axis)
        return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def _buffer_device(self, nbytes: int):
        import torch

        if self.device.type != "cuda":
            return self.device
        free, _ = torch.cuda.mem_get_info(self.device)
        # leave room for the network's activations and a second buffer (the count map)
        fits = 2.5 * nbytes < free
        log.info("stitching buffer %.2f GiB on %s (GPU free %.2f GiB)", nbytes / 2**30, "GPU" if fits else "CPU", free / 2**30)
        return self.device if fits else torch.device("cpu")

    def probabilities(self, image) -> "np.ndarray":
        """``image``: preprocessed ``(C, X, Y, Z)`` array or tensor -> ``(K, X, Y, Z)`` float16."""
        import torch
        from monai.networks import eval_mode

        x = torch.as_tensor(np.asarray(image), dtype=torch.float32)
        if x.ndim != 4:
            raise ValueError(f"expected a preprocessed (C, X, Y, Z) volume, got shape {tuple(x.shape)}")
        k = self.plan.out_channels
        X, Y, Z = x.shape[1:]
        out = np.empty((k, X, Y, Z), np.float16)
        # slab depth along Z so that a float32 K-channel buffer, margins included, stays under
        # SLAB_BYTES (at least one window deep)
        roi_z = self.plan.patch_size[-1] if self.plan.spatial_dims == 3 else 1
        margin = roi_z // 2 if self.plan.spatial_dims == 3 else 0
        depth = max(roi_z, int(SLAB_BYTES // max(1, k * X * Y * 4)) - 2 * margin)
        if self.plan.spatial_dims == 2 and self.plan.slice_axis != 2:
            depth = Z  # 2D windows span Z: no slabs
        buffer_device = self._buffer_device(k * X * Y * min(Z, depth + 2 * margin) * 4)
        inferer = self._inferer(buffer_device)
        flips = self._flips()
        starts = list(range(0, Z, depth))
        # eval mode for this call only (validation calls it on a training network; the
        # previous mode is restored): no dropout, no batch-norm statistics updates, one output
        with eval_mode(self.model), torch.inference_mode():
            for z0 in starts:
                z1 = min(Z, z0 + depth)
                a, b = max(0, z0 - margin), min(Z, z1 + margin)
                slab = x[None, ..., a:b].to(self.device)
                acc = None
                for axes in flips:
                    inp = torch.flip(slab, axes) if axes else slab
                    p = inferer(inp, self._net)
                    p = torch.flip(p, axes) if axes else p
                    if acc is None:
                        acc = p
                    else:
                        acc += p
                    del p, inp
                if len(flips) > 1:
                    acc /= len(flips)
                out[..., z0:z1] = acc[0, ..., z0 - a : z1 - a].to("cpu", torch.float16).numpy()
                del acc, slab  # free this slab's buffers before the next one is allocated
        return out

    def predict_index(self, image) -> np.ndarray:
        """Class indices ``(X, Y, Z)`` uint8 on the preprocessed grid (used by validation)."""
        probs = self.probabilities(image)
        index = (probs[0] > 0.5).astype(np.uint8) if self.plan.binary else probs.argmax(0).astype(np.uint8)
        return self._postprocess(index)

    def _postprocess(self, index: np.ndarray) -> np.ndarray:
        values = list(self.plan.label_values)
        wanted = [values.index(v) for v in self.infer.largest_component if v in values]
        return largest_component(index, wanted)

    def predict(self, images: Sequence, source: str = "") -> dict:
        """SimpleITK image(s) (one per channel) -> ``{"labels": [z,y,x] label values on the
        input grid, "probabilities": (K, X, Y, Z) float16 on the preprocessed grid, "timing": s}``."""
        t0 = time.perf_counter()
        pre = preprocess(images, self.plan, source=source)
        t1 = time.perf_counter()
        probs = self.probabilities(pre["image"])
        t2 = time.perf_counter()
        labels = restore_labels(probs, self.plan, images[0])
        if self.infer.largest_component:
            values = np.asarray(self.plan.label_values)
            index = np.searchsorted(values, labels).astype(np.uint8)
            labels = values.astype(labels.dtype)[self._postprocess(index)]
        t3 = time.perf_counter()
        return {
            "labels": labels,
            "probabilities": probs,
            "timing": {"preprocess_s": t1 - t0, "network_s": t2 - t1, "restore_s": t3 - t2},
        }

