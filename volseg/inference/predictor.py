"""The predictor: one object used by validation during training and by ``volseg infer``.

The windows (MONAI's placement and Gaussian importance map, so the result equals
``monai.inferers.sliding_window_inference`` on the whole volume) are computed **once each** and
accumulated into a rolling buffer one window deep along z (:func:`rolling_windows`). As soon as
the windows of one z row are done, the slab below the next row is final: it is normalised and
handed on -- to the running argmax on the preprocessed grid (:meth:`Predictor.predict_index`,
validation), to a float16 array (:meth:`Predictor.probabilities`) or, in
:meth:`Predictor.predict`, straight to :class:`~volseg.data.preprocess.ScanRestorer`, which
resamples it onto the scan's own grid with a running argmax. So nothing of size classes x
volume exists, whatever the number of classes; :func:`plan_memory` sizes the buffers.

Speed levers (``infer`` config). Exact: ``crop: windows`` (the default) skips windows that miss
the body box (CT: > -500 HU on the raw scan, MRI: nonzero; background outside the box), the
window batch (``batch_size``, shrunk by :func:`window_batch` for many classes), ``threads``,
``torch.inference_mode`` always. Approximate (measured in benchmarks/README.md): ``crop: box``
(tile the box only), ``window_scale`` > 1 and a lower ``overlap``. On CUDA the whole chain runs
on the GPU: :func:`~volseg.data.preprocess.preprocess_torch`, the windows under AMP, the buffer
and the restore on the device when measured free memory allows, else on the CPU (logged); a
CUDA out-of-memory error retries the scan with CPU stitching.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import Config, ConfigError, InferConfig
from ..data.preprocess import Plan, ScanRestorer, foreground_box, preprocess, preprocess_torch

log = logging.getLogger(__name__)

__all__ = ["Predictor", "resolve_device", "largest_component", "rolling_windows", "plan_memory", "window_size"]

Box = Tuple[Tuple[int, int], ...]  # half-open (start, stop) per axis of the preprocessed grid

# bytes of one batch of window probabilities (B, K, *roi) float32 beyond which the batch shrinks:
# with 100+ classes one 96^3 window alone holds 0.4 GB (and the logits as much again)
WINDOW_BATCH_BYTES = 512 * 1024**2


def window_batch(batch_size: int, out_channels: int, roi: Sequence[int]) -> int:
    """Windows per network call: ``batch_size``, fewer where the batch's float32 probabilities
    would exceed :data:`WINDOW_BATCH_BYTES` (at least one)."""
    return max(1, min(batch_size, int(WINDOW_BATCH_BYTES // (out_channels * float(np.prod(roi)) * 4))))


def resolve_device(device: str = "auto"):
    import torch

    from ..config import check_choice

    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu or auto.")
    return torch.device(device)


def amp_dtype(device):
    """The autocast dtype of mixed precision on ``device``, or None for float32.

    CUDA: float16 (as nnU-Net and MONAI's AMP recipes). CPU: bfloat16 where the processor has
    native bf16 arithmetic (AMX or AVX512-BF16: oneDNN's bf16 convolutions are then about 2x as
    fast as float32 for the U-Nets here, benchmarks/README.md), else None: emulated bf16 would
    be slower than float32. Training and inference both take their precision from here."""
    import torch

    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        cpu = torch.cpu
        native = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        if any(f is not None and f() for f in native):  # private probes: absent (False) on some torch builds
            return torch.bfloat16
    return None


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


def window_size(plan: Plan, scale: float = 1.0, shape: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """The 3D inference window (voxels): the training patch times ``scale``, rounded to a
    multiple of 8 and, for ``scale > 1``, no larger than ``shape`` (the volume) where the patch
    fits in it, because a window larger than the volume is padded with repeated edge voxels,
    which are no real context. In 2D slice mode a 1 is inserted at ``plan.slice_axis``."""
    axes = [a for a in range(3) if plan.spatial_dims == 3 or a != plan.slice_axis]
    roi = []
    for p, a in zip(plan.patch_size, axes):
        r = int(p) if scale == 1 else max(8, int(round(p * scale / 8)) * 8)
        if shape is not None and scale > 1:
            r = max(int(p), min(r, int(shape[a]) // 8 * 8))
        roi.append(r)
    if plan.spatial_dims == 2:
        roi.insert(plan.slice_axis, 1)
    return tuple(roi)


# ---------------------------------------------------------------------------------------------
# the rolling window engine


def _softmax_(x):
    """Softmax over the class axis of float32 logits ``x``, in place. ``torch.softmax`` returns a
    second (B, K, *roi) array beside its input, which is the peak of the window stage: with 14
    classes and 4 windows of 96^3, 198 MB more (2026-12-01: peak RSS 2.58-2.73 GiB on a 512 x 512
    x 300 CT with it; see benchmarks/README.md)."""
    x -= x.amax(1, keepdim=True)
    x.exp_()
    x /= x.sum(1, keepdim=True)
    return x


def _ring(a: int, b: int, depth: int) -> List[Tuple[int, slice]]:
    """Global z range ``[a, b)`` (b - a <= depth) as (global start, ring slice) pieces."""
    out = []
    while a < b:
        r = a % depth
        n = min(b - a, depth - r)
        out.append((a, slice(r, r + n)))
        a += n
    return out


def _windows(size: Sequence[int], roi: Sequence[int], overlap: float) -> np.ndarray:
    """Window start corners ``(N, 3)``, placed exactly as MONAI's sliding_window_inference does
    (its own functions), sorted by z."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(list(size), list(roi), 3, (overlap,) * 3)
    starts = np.array([[s[0] for s in w] for w in dense_patch_slices(list(size), list(roi), interval, return_slice=False)])
    return starts[np.argsort(starts[:, 2], kind="stable")]


def _kept_windows(size: Sequence[int], roi: Sequence[int], overlap: float, keep: Optional[Box]) -> np.ndarray:
    """MONAI's windows over ``size`` (padded volume), minus those that miss the box ``keep``."""
    starts = _windows(size, roi, overlap)
    if keep is not None:
        hit = np.ones(len(starts), bool)
        for a, (lo, hi) in enumerate(keep):
            hit &= (starts[:, a] < hi) & (starts[:, a] + roi[a] > lo)
        starts = starts[hit]
    return starts


def rolling_windows(x, net, roi: Sequence[int], overlap: float, blend: str, batch_size: int, out_channels: int, device, buffer_device,
                    keep: Optional[Box] = None, binary: bool = False) -> Iterator[Tuple[int, int, list, Box]]:
    """Sliding-window inference over ``x`` ``(C, X, Y, Z)`` that yields the result slab by slab.

    Yields ``(z0, z1, parts, xy)``: ``parts`` are views ``(K, x1 - x0, y1 - y0, d)`` of the
    normalised probabilities on the ``xy = ((x0, x1), (y0, y1))`` range that together cover
    ``[z0, z1)`` in order (no parts: all background); they are overwritten once the generator
    resumes, so copy what must be kept. Equals ``sliding_window_inference(x[None], roi,
    batch_size, net, overlap, blend, padding_mode="replicate")`` (window placement, padding of a
    volume smaller than ``roi``, importance map, weighted mean) up to float rounding, but each window is computed
    once and the float32 buffer is ``(K, x, y, roi_z)`` plus its weight sum: MONAI's
    ``buffer_steps`` also computes each window once but still allocates the whole
    ``(K, X, Y, Z)`` float32 output, which is what breaks memory at 100+ classes.

    ``keep``: a box (voxel ranges of ``x``); windows that miss it are skipped. Every voxel
    inside the box keeps all its windows, so the result there is unchanged; voxels no window
    covers are background (class 0 probability 1; a binary plan's foreground 0).
    """
    import torch
    import torch.nn.functional as F
    from monai.data.utils import compute_importance_map

    size = list(x.shape[1:])
    before = [max(r - n, 0) // 2 for r, n in zip(roi, size)]
    pad = [max(r - n, 0) for r, n in zip(roi, size)]
    if any(pad):
        # edge voxels repeated, not zeros (MONAI's default): after normalisation 0 is a tissue
        # (CT: the foreground's mean HU), so a scan thinner than the window (a 20-slice series)
        # would sit between two slabs of it that no training patch showed; training pads alike
        # (data.transforms.cached_transforms)
        x = F.pad(x, [v for i in (2, 1, 0) for v in (before[i], pad[i] - before[i])], mode="replicate")
    keep_p = None if keep is None else [(a + b, c + b) for (a, c), b in zip(keep, before)]
    starts = _kept_windows(x.shape[1:], roi, overlap, keep_p)
    Z, depth = x.shape[3], roi[2]
    if not len(starts):
        yield 0, size[2], [], ((0, size[0]), (0, size[1]))
        return
    # the ring covers the kept windows' x/y extent only
    lo = [int(starts[:, a].min()) for a in (0, 1)]
    hi = [int(starts[:, a].max()) + roi[a] for a in (0, 1)]
    weight = compute_importance_map(tuple(roi), mode=blend, device=device)
    weight_buf = weight.to(buffer_device)
    acc = torch.zeros((out_channels, hi[0] - lo[0], hi[1] - lo[1], depth), device=buffer_device)
    wsum = torch.zeros((hi[0] - lo[0], hi[1] - lo[1], depth), device=buffer_device)
    # what lies in the original volume: padded [lo, hi) ∩ [before, before + size)
    inner = [(max(lo[a], before[a]), min(hi[a], before[a] + size[a])) for a in (0, 1)]
    xy = tuple((a - before[i], b - before[i]) for i, (a, b) in enumerate(inner))
    view = (slice(None),) + tuple(slice(a - lo[i], b - lo[i]) for i, (a, b) in enumerate(inner))

    def clip(a, b):  # padded z range -> original, or None
        a, b = max(a, before[2]), min(b, before[2] + size[2])
        return (a - before[2], b - before[2]) if a < b else None

    rows = sorted(set(starts[:, 2].tolist()))
    if rows[0] > 0 and clip(0, rows[0]):
        yield (*clip(0, rows[0]), [], xy)
    for j, z in enumerate(rows):
        row = starts[starts[:, 2] == z]
        for b in range(0, len(row), batch_size):
            chunk = row[b : b + batch_size]
            win = torch.stack([x[:, sx : sx + roi[0], sy : sy + roi[1], z : z + depth] for sx, sy, _ in chunk]).to(device)
            probs = net(win).mul_(weight).to(buffer_device)
            for (sx, sy, _), p in zip(chunk, probs):
                at = (slice(sx - lo[0], sx - lo[0] + roi[0]), slice(sy - lo[1], sy - lo[1] + roi[1]))
                for g, r in _ring(z, z + depth, depth):
                    src = slice(g - z, g - z + r.stop - r.start)
                    acc[(slice(None),) + at + (r,)] += p[..., src]
                    wsum[at + (r,)] += weight_buf[..., src]
            del win, probs
        nxt = rows[j + 1] if j + 1 < len(rows) else Z
        yield from _emit(acc, wsum, z, min(nxt, z + depth), depth, before[2], before[2] + size[2], view, xy, binary)
        if nxt > z + depth and clip(z + depth, nxt):  # skipped rows: nothing computed there
            yield (*clip(z + depth, nxt), [], xy)


def _emit(acc, wsum, a: int, b: int, depth: int, zoff: int, zmax: int, view, xy, binary: bool):
    """Normalise the ring slices of padded z range ``[a, b)``, yield the part inside the volume
    (padded ``[zoff, zmax)``) as original z, then clear them for the next windows. Voxels
    without a window become background."""
    pieces = _ring(a, b, depth)
    for _, r in pieces:
        empty = wsum[..., r] == 0
        acc[..., r] /= wsum[..., r].clamp_min(1e-20)
        if not binary and bool(empty.any()):
            acc[0, ..., r][empty] = 1.0
    lo, hi = max(a, zoff), min(b, zmax)
    if lo < hi:
        parts = []
        for g, r in pieces:
            s, e = max(g, lo), min(g + r.stop - r.start, hi)
            if s < e:
                parts.append(acc[view + (slice(r.start + s - g, r.start + e - g),)])
        yield lo - zoff, hi - zoff, parts, xy
    for _, r in pieces:
        acc[..., r] = 0
        wsum[..., r] = 0


@dataclass
class Slab:
    """Probabilities of preprocessed slices ``[z0, z1)``: ``parts`` (see :func:`rolling_windows`)
    cover the x/y ranges ``xy``; outside them, outside the body box ``keep`` (when given) and
    everywhere when ``parts`` is empty, the voxel is background (class 0 probability 1; a
    binary plan's foreground 0)."""

    z0: int
    z1: int
    parts: list
    xy: Box
    shape: Tuple[int, int]
    binary: bool
    device: object = "cpu"
    keep: Optional[Box] = None

    def channel(self, c: int):
        """Class ``c`` as a float32 tensor ``(X, Y, z1 - z0)`` on the whole preprocessed x/y grid."""
        import torch

        bg = float(c == 0 and not self.binary)
        device = self.parts[0].device if self.parts else self.device
        inner = torch.cat([p[c] for p in self.parts], -1) if self.parts else None
        (x0, x1), (y0, y1) = self.xy
        if inner is not None and self.keep is None and (x0, x1, y0, y1) == (0, self.shape[0], 0, self.shape[1]):
            return inner
        out = torch.full((*self.shape, self.z1 - self.z0), bg, device=device)
        if inner is not None:
            out[x0:x1, y0:y1] = inner
        if self.keep is not None:
            (a0, a1), (b0, b1), (c0, c1) = self.keep
            for sl in ((slice(None, a0),), (slice(a1, None),), (slice(None), slice(None, b0)), (slice(None), slice(b1, None)),
                       (Ellipsis, slice(None, max(0, c0 - self.z0))), (Ellipsis, slice(max(0, c1 - self.z0), None))):
                out[sl] = bg
        return out

    def index(self):
        """Class indices ``(X, Y, z1 - z0)`` uint8 (argmax; a binary plan: probability > 0.5)."""
        import torch

        if self.binary:
            return (self.channel(0) > 0.5).to(torch.uint8)
        best = self.channel(0).clone()
        index = torch.zeros(best.shape, dtype=torch.uint8, device=best.device)
        for c in range(1, len(self.parts[0]) if self.parts else 1):
            p = self.channel(c)
            index.masked_fill_(p > best, c)
            torch.maximum(best, p, out=best)
        return index


def plan_memory(scan_shape: Sequence[int], scan_spacing: Sequence[float], plan_spacing: Sequence[float], out_channels: int, roi: Sequence[int],
                overlap: float = 0.5, batch_size: int = 4, in_channels: int = 1, crop: Sequence[float] = (1.0, 1.0, 1.0), probabilities: bool = False) -> Dict[str, float]:
    """Bytes of the main buffers of one :meth:`Predictor.predict` call, by part, and their
    ``total``: a lower bound (network activations, the reader's and SimpleITK's copies and
    library temporaries come on top). ``scan_shape``/spacings in canonical (x, y, z) order;
    ``crop``: the fraction of each preprocessed axis inside the body box. An ensemble changes
    none of these (its members' window probabilities are summed into one batch tensor); it
    adds its networks' weights and activations of one member at a time.

    * ``scan``: the scan as float32 (preprocessing casts it) and the label map (1 byte/voxel)
    * ``image``: the preprocessed ``(C, X, Y, Z)`` float32 volume
    * ``ring``: the stitching buffer ``(K, x, y, roi_z)`` float32 and its weight sum: one
      window deep along z, whatever the volume's depth
    * ``windows``: one batch of window logits and probabilities ``(B, K, *roi)`` float32, B from
      :func:`window_batch`
    * ``restore``: one class of one slab on the scan grid (source, interpolated, running max,
      float32) and the slab's last slice of every class
    * ``probabilities``: ``(K, z, y, x)`` uint8 on the scan grid, only when asked for
    """
    scan = float(np.prod(scan_shape))
    pre = [max(1, int(round(n * s / t))) for n, s, t in zip(scan_shape, scan_spacing, plan_spacing)]
    box = [max(1, int(round(n * f))) for n, f in zip(pre, crop)]
    k = out_channels
    step = max(1, int(roi[2] * (1 - overlap)))
    slab_scan = float(scan_shape[0] * scan_shape[1]) * (step * plan_spacing[2] / scan_spacing[2] + 2)
    parts = {
        "scan": scan * 5,
        "image": in_channels * float(np.prod(pre)) * 4,
        "ring": (k + 1) * float(box[0] * box[1]) * roi[2] * 4,
        "windows": 2 * window_batch(batch_size, k, roi) * k * float(np.prod(roi)) * 4,
        "restore": 3 * slab_scan * 4 + k * float(pre[0] * pre[1]) * 4,
        "probabilities": k * scan if probabilities else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def _widen(shape: Sequence[int], box: Box, roi: Sequence[int]) -> Box:
    """``box`` widened (within the volume) to at least one window per axis: a window larger
    than the volume it tiles is padded with repeated edge voxels, which are no real context."""
    out = []
    for n, r, (a, b) in zip(shape, roi, box):
        a = max(0, a - (max(0, min(r, n) - (b - a)) + 1) // 2)
        out.append((a, min(n, max(b, a + min(r, n)))))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# run folders -> networks (one, or an ensemble)


def _load_member(run: Path, checkpoint: str, overrides: Optional[dict]):
    """(config, plan, network with weights, info) of one run folder."""
    from ..nets import build_network
    from ..training.run_folder import RunFolderError, checkpoint_path, load_checkpoint, read_config, read_plan

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
        raise RunFolderError(f"{ckpt}: weights do not match {run / 'config.yaml'} ({str(exc).splitlines()[0][:160]}); "
                             "restore the run folder's files together or retrain.") from None
    info = {"run": str(run.resolve()), "checkpoint": ckpt.name, "epoch": state.get("epoch")}
    if notes:
        info["warnings"] = notes
    return cfg, plan, model, info


def _shared_plan(runs: Sequence[Path], plans: Sequence[Plan]) -> Plan:
    """The plan all ``runs`` share; an ensemble whose members would preprocess a scan
    differently (or predict other classes) cannot average their probabilities."""
    from dataclasses import asdict

    from ..training.run_folder import RunFolderError

    first = asdict(plans[0])
    for run, plan in zip(runs[1:], plans[1:]):
        other = asdict(plan)
        diff = {k: (first[k], other[k]) for k in first if first[k] != other[k]}
        if diff:
            text = "; ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise RunFolderError(f"cannot ensemble {runs[0]} and {run}: their plan.json files differ ({text}); ensemble members "
                                 "must share spacing, orientation, normalisation, labels and patch (train them with "
                                 "volseg train --folds, which plans once for all folds).")
    return plans[0]


def _postprocessing(run_dir, infer: InferConfig, overrides: Optional[dict]) -> Tuple[InferConfig, dict]:
    """The ``infer`` settings with the ``largest_component`` labels to use, and why. An explicit
    choice (an override, or a non-empty config value) wins over the rule learned from the
    cross-validation predictions, because the person asked for it; a learned rule belongs to
    the folder it was learned for (a run or a parent), so several folders given by hand get
    none."""
    import dataclasses

    from ..evaluation.cv import read_postprocessing

    if overrides and "largest_component" in overrides:
        chosen = {"largest_component": list(infer.largest_component), "source": "override"}
    elif infer.largest_component:
        chosen = {"largest_component": list(infer.largest_component), "source": "config infer.largest_component"}
    else:
        single = not isinstance(run_dir, (list, tuple)) or len(run_dir) == 1
        folder = Path(run_dir if not isinstance(run_dir, (list, tuple)) else run_dir[0])
        learned = read_postprocessing(folder) if single else None
        if learned is None:
            chosen = {"largest_component": [], "source": "none learned" if single else "none (several folders given)"}
        else:
            chosen = {"largest_component": list(learned), "source": str(folder / "postprocessing.json")}
            infer = dataclasses.replace(infer, largest_component=tuple(learned))
    log.info("postprocessing: largest component of labels %s (%s)", chosen["largest_component"], chosen["source"])
    return infer, chosen


# ---------------------------------------------------------------------------------------------
# the predictor


class Predictor:
    """Sliding-window predictor for a trained network and its preprocessing plan."""

    def __init__(self, model, plan: Plan, infer: InferConfig = InferConfig(), device: str = "auto", progress: bool = False):
        """``model``: a network, or a sequence of networks trained on the same ``plan`` (an
        ensemble, e.g. the folds of a cross-validation): each window's probabilities are
        averaged over them (and over the TTA mirrors) before blending, so the stitching buffers
        are those of one model whatever the number of members."""
        import torch

        self.device = resolve_device(device) if isinstance(device, str) else device
        self.models = [m.to(self.device).eval() for m in (model if isinstance(model, (list, tuple)) else [model])]
        if not self.models:
            raise ValueError("Predictor needs at least one network.")
        self.model = self.models[0]
        self.plan = plan
        self.infer = infer
        self.progress = progress
        valid = dict(zip(plan.label_values[1:], plan.label_names[1:]))
        if set(infer.largest_component) - set(valid):
            raise ConfigError(f"infer.largest_component={list(infer.largest_component)}: label values {sorted(set(infer.largest_component) - set(valid))} are not foreground labels of this model; valid: {valid}.")
        self.run_info: dict = {}
        if infer.threads:
            torch.set_num_threads(infer.threads)
            log.info("torch threads: %d", infer.threads)

    # -- construction from a run folder ---------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: Union[str, Path, Sequence[Union[str, Path]]], device: str = "auto", checkpoint: str = "best",
                 overrides: Optional[dict] = None, progress: bool = False) -> "Predictor":
        """Rebuild network, plan and inference settings from a run folder (nothing else needed).

        ``run_dir``: a run folder, a cross-validation parent written by ``volseg train --folds``
        (its folds form an ensemble), or a sequence of such folders (all their networks form one
        ensemble). An ensemble's members must share the preprocessing plan (spacing,
        orientation, normalisation, labels, patch), else a ``RunFolderError`` names the
        differences; inference settings are the first member's.
        ``overrides``: keys of the ``infer`` section, e.g. ``{"overlap": 0.25, "tta": True}``.
        ``infer.largest_component``: an explicit override wins, then a non-empty value in the
        (first) run's config, then the learned ``postprocessing.json`` of a single run or a
        parent (:mod:`volseg.evaluation.cv`); the choice is logged and kept in
        ``run_info["postprocessing"]``.
        A missing ``best.pt`` falls back to ``last.pt`` with a logged warning, recorded in
        ``run_info["warnings"]``. Checkpoints are loaded with ``weights_only=True``: one that
        would run code, or a corrupt config, plan or checkpoint, is a ``RunFolderError`` naming
        the file."""
        from ..training.folds import expand_runs

        runs = expand_runs(run_dir)
        members = [_load_member(run, checkpoint, overrides) for run in runs]
        plan = _shared_plan(runs, [m[1] for m in members])
        infer, chosen = _postprocessing(run_dir, members[0][0].infer, overrides)
        pred = cls([m[2] for m in members], plan, infer, device, progress=progress)
        pred._own_layout()
        pred.trained = members[0][0]
        infos = [m[3] for m in members]
        pred.run_info = dict(infos[0]) if len(infos) == 1 else {"ensemble": infos}
        notes = [n for i in infos for n in i.pop("warnings", [])]
        if notes:
            pred.run_info["warnings"] = notes
        pred.run_info["postprocessing"] = chosen
        if len(runs) > 1:
            log.info("ensemble of %d models: %s", len(runs), ", ".join(str(r) for r in runs))
        return pred

    def _own_layout(self) -> None:
        """``channels_last_3d`` for networks this predictor owns (loaded by :meth:`from_run`,
        not the model that training shares with its validation) on a CPU, 3D: oneDNN's
        convolutions and the group/instance norms (built as ``GroupNorm``,
        :func:`volseg.nets.blocks.norm_act`) then run without layout copies: the forward pass
        of the default and the 32..320 instance-norm U-Nets measured 1.3-1.65x as fast in
        float32 and 3.3x in bfloat16 (against contiguous float32; benchmarks/README.md,
        ``bench_network.py``), argmax equal to the contiguous network's to float rounding.
        Batch-norm networks: not measured. CUDA keeps the contiguous layout (not measured on a
        GPU)."""
        import torch

        if self.device.type == "cpu" and self.plan.spatial_dims == 3:
            self.models = [m.to(memory_format=torch.channels_last_3d) for m in self.models]
            self.model = self.models[0]
            self._layout = torch.channels_last_3d

    _layout = None  # the window layout the networks take (None: contiguous)

    # -- the network on a batch of windows ----------------------------------------------------------
    def _forward(self, model, x):
        """(B, C, *roi) -> (B, K, *roi) logits; in 2D slice mode the unit window axis is
        squeezed for the 2D network (as MONAI's SliceInferer does)."""
        if self.plan.spatial_dims == 2:
            return model(x.squeeze(2 + self.plan.slice_axis)).unsqueeze(2 + self.plan.slice_axis)
        return model(x)

    def _net(self, x):
        """Window batch -> probabilities (float32), averaged over the ensemble's members and,
        with TTA, the mirrored copies (each window is mirrored on its own, as nnU-Net does, so
        the rolling order holds). Blending is linear, so averaging per window equals averaging
        each member's stitched probabilities, without a volume per member."""
        import torch

        flips = self._flips()
        dtype = amp_dtype(self.device) if self.infer.amp else None
        if self._layout is not None:
            x = x.contiguous(memory_format=self._layout)
        acc = None
        for model in self.models:
            for axes in flips:
                with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                    logits = self._forward(model, torch.flip(x, axes) if axes else x)
                p = logits.float()  # the same tensor when the network ran in float32
                del logits
                p = p.sigmoid_() if self.plan.binary else _softmax_(p)
                p = torch.flip(p, axes) if axes else p
                acc = p if acc is None else acc.add_(p)
        n = len(flips) * len(self.models)
        return acc / n if n > 1 else acc

    def _flips(self) -> List[tuple]:
        """Mirroring TTA axes (tensor dims of a (B, C, *spatial) batch): those training mirrored
        (:func:`~volseg.data.transforms.mirror_axes`: not left-right for lateral labels)."""
        import itertools

        from ..data.transforms import mirror_axes

        if not self.infer.tta:
            return [()]
        axes = [2 + a for a in mirror_axes(self.plan)]
        return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    # -- stitching ----------------------------------------------------------------------------
    def _buffer_device(self, shape: Sequence[int], roi: Sequence[int]):
        """Where the ring buffer and the restore live: the GPU when measured free memory holds
        the buffers of :func:`plan_memory` twice over (activations need room too), else the CPU."""
        import torch

        if self.device.type != "cuda":
            return self.device
        free, _ = torch.cuda.mem_get_info(self.device)
        k = self.plan.out_channels
        need = (k + 1) * shape[0] * shape[1] * roi[2] * 4 + 2 * window_batch(self.infer.batch_size, k, roi) * k * float(np.prod(roi)) * 4
        fits = 2 * need < free
        log.info("stitching buffer %.2f GiB on %s (GPU free %.2f GiB)", need / 2**30, "GPU" if fits else "CPU", free / 2**30)
        return self.device if fits else torch.device("cpu")

    def slabs(self, image, box: Optional[Box] = None, buffer_device=None) -> Iterator[Slab]:
        """Preprocessed ``(C, X, Y, Z)`` -> :class:`Slab` s covering z in order; background
        outside ``box`` (a body box). ``infer.crop``: ``windows`` skips the windows that miss the
        box (inside it the result is unchanged); ``box`` tiles only the box (widened to one
        window where needed), fewer windows but placed differently: approximate. Consume each
        slab before asking for the next."""
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
        make = lambda z0, z1, parts, xy: Slab(z0, z1, parts, xy, shape[:2], self.plan.binary, buffer_device, box)  # noqa: E731
        # eval mode for this call only (validation calls it on a training network; the previous
        # mode is restored): no dropout, no batch-norm statistics updates, one output
        with eval_mode(*self.models), torch.inference_mode():
            if off[2] > 0:
                yield make(0, off[2], [], ((0, 1), (0, 1)))
            batch = window_batch(self.infer.batch_size, self.plan.out_channels, roi)
            if batch < self.infer.batch_size:
                log.info("window batch %d -> %d: %d classes x %s voxels per window", self.infer.batch_size, batch, self.plan.out_channels, list(roi))
            for z0, z1, parts, xy in rolling_windows(x, self._net, roi, self.infer.overlap, self.infer.blend, batch,
                                                     self.plan.out_channels, self.device, buffer_device, None if tile else box, self.plan.binary):
                yield make(z0 + off[2], z1 + off[2], parts, tuple((a + o, b + o) for (a, b), o in zip(xy, off)))
            if off[2] + x.shape[3] < shape[2]:
                yield make(off[2] + x.shape[3], shape[2], [], ((0, 1), (0, 1)))

    # -- public -------------------------------------------------------------------------------
    def probabilities(self, image, box: Optional[Box] = None) -> "np.ndarray":
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
        if self.device.type == "cuda":  # the whole chain on the GPU (on a CPU, SimpleITK's C++ is faster)
            image = preprocess_torch(images, self.plan, self.device, source=source)
        else:
            image = preprocess(images, self.plan, source=source)["image"]
        self._warn_if_thin(tuple(image.shape[1:]), source)
        return {"image": image, "box": self._crop(images, source), "preprocess_s": time.perf_counter() - t0}

    #: the (first) run's config (:meth:`from_run`; None: not known), for advice on thin scans
    trained: Optional[Config] = None

    def _warn_if_thin(self, shape: Sequence[int], source: str) -> None:
        """Warn when the preprocessed scan is less than half the training window along an axis
        (a 20-slice series, a limited field of view) and the network normalises each window by
        its own statistics (instance or group norm): the window is padded with repeated edge
        voxels, and those statistics are then a thin slab's, not a training patch's. Measured
        (benchmarks/README.md, "Normalisation layer"): organ models with mean Dice 0.84-0.91 on
        their training scan gave 0.22-0.37 on 14- and 20-slice slabs of it with instance norm
        (0.64 when trained with ``augment.slab_prob=0.3``), 0.69-0.90 with batch norm, whose
        statistics are fixed at training, but which found nothing on a scan of another contrast
        phase ("Batch norm on the aorta split"). A batch-norm (or norm-free) network is only logged."""
        roi = window_size(self.plan)
        thin = [a for a in range(3) if roi[a] > 1 and shape[a] < roi[a] / 2]
        if not thin:
            return
        sp = self.plan.spacing
        what = ", ".join(f"{shape[a]} voxels ({shape[a] * sp[a]:.0f} mm) along {'xyz'[a]} ({self.plan.orientation[a]}) against a training window of {roi[a]} "
                         f"voxels ({roi[a] * sp[a]:.0f} mm)" for a in thin)
        norm = self.trained.model.norm if self.trained else None
        slab_prob = self.trained.augment.slab_prob if self.trained else None
        if norm in ("batch", "none"):
            log.info("%s is thin: %s; padded with repeated edge voxels (model.norm=%s: no per-window statistics for the padding to change).",
                     source or "scan", what, norm)
            return
        advice = ["retrain with --set model.norm=batch (fixed statistics: 0.69-0.90 on thin slabs where instance norm gave "
                  "0.22-0.37; for thin scans like the training sources' only: on another contrast phase it found nothing in 6 of 6 runs)"]
        if self.plan.slice_axis not in thin:  # the slab augmentation thins data.slice_axis only
            advice.append(f"training patches thin along {'xyz'[thin[0]]} are not simulated by any augmentation")
        elif slab_prob:
            advice.append(f"this run trained with augment.slab_prob={slab_prob:g}")
        else:
            advice.append("or with --set augment.slab_prob=0.3 (0.64)")
        log.warning("%s is thin: %s. The rest of the window is repeated edge voxels, and this network normalises each window by its own "
                    "statistics (model.norm=%s), so expect lower accuracy than on whole scans; %s.", source or "scan", what,
                    norm or "unknown", "; ".join(advice))

    def predict(self, images: Sequence, source: str = "", probabilities: bool = False, prepared: Optional[dict] = None) -> dict:
        """SimpleITK image(s) (one per channel) -> ``{"labels": [z, y, x] label values on the
        input grid, "timing": s, "box": the body crop on the preprocessed grid or None}`` and,
        with ``probabilities=True``, ``"probabilities": (K, z, y, x)`` uint8 (x 1/255) on the
        input grid (K bytes per scan voxel). ``prepared``: :meth:`prepare`'s result for these
        images, when it was computed ahead."""
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
        """Slabs -> :class:`ScanRestorer`; returns it and the seconds spent restoring."""
        shape = tuple(np.shape(image))[1:]
        device = buffer_device or self._buffer_device(shape, window_size(self.plan, self.infer.window_scale, shape))  # an upper bound
        restorer = ScanRestorer(self.plan, reference, probabilities=probabilities, device=device)
        restore_s = 0.0
        for slab in self.slabs(image, box, device):
            t = time.perf_counter()
            restorer.add(slab.z0, slab.z1, slab.channel)
            restore_s += time.perf_counter() - t
        return restorer, restore_s
