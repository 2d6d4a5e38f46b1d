"""The window engine: MONAI's window placement and Gaussian importance map, each window computed
once and accumulated into a rolling buffer one window deep along z, emitted slab by slab.

:func:`rolling_windows` equals ``monai.inferers.sliding_window_inference`` on the whole volume;
:func:`estimate_memory` sizes its buffers (the benchmarks and the predictor's GPU/CPU choice use
it); :class:`Slab` is what it hands on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..data.plan import PreprocessingPlan

__all__ = ["Box", "Slab", "WindowSpec", "RingBuffer", "WINDOW_BATCH_BYTES", "window_batch", "window_size", "rolling_windows", "stitching_bytes", "estimate_memory"]

Box = Tuple[Tuple[int, int], ...]  # half-open (start, stop) per axis of the preprocessed grid


# bytes of one batch of window probabilities (B, K, *roi) float32 beyond which the batch shrinks:
# with 100+ classes one 96^3 window alone holds 0.4 GB (and the logits as much again)
WINDOW_BATCH_BYTES = 512 * 1024**2


def window_batch(batch_size: int, out_channels: int, roi: Sequence[int]) -> int:
    """Windows per network call: ``batch_size``, fewer where the batch's float32 probabilities
    would exceed :data:`WINDOW_BATCH_BYTES` (at least one)."""
    return max(1, min(batch_size, int(WINDOW_BATCH_BYTES // (out_channels * float(np.prod(roi)) * 4))))


def window_size(plan: PreprocessingPlan, scale: float = 1.0, shape: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
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
    x, y, z = roi
    return x, y, z


def _scan_interval(size: Sequence[int], roi: Sequence[int], overlap: float) -> Tuple[int, ...]:
    """MONAI's step between window starts (``sliding_window_inference``): the whole window where
    it spans the axis, else ``int(roi * (1 - overlap))``, at least 1. Owned here (ten lines)
    rather than importing MONAI's private ``_get_scan_interval``; tests/test_inference_engine.py
    checks the result against ``sliding_window_inference`` itself."""
    return tuple(int(r) if r == n else max(int(r * (1 - overlap)), 1) for n, r in zip(size, roi))


def _windows(size: Sequence[int], roi: Sequence[int], overlap: float) -> np.ndarray:
    """Window start corners ``(N, 3)``, placed exactly as MONAI's sliding_window_inference does
    (its own functions), sorted by z."""
    from monai.data.utils import dense_patch_slices

    interval = _scan_interval(size, roi, overlap)
    starts = np.array([[s[0] for s in w] for w in dense_patch_slices(list(size), list(roi), interval, return_slice=False)])  # type: ignore[index]
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


@dataclass(frozen=True)
class WindowSpec:
    """How the windows are laid and blended: ``roi`` (voxels, x y z), ``overlap`` in [0, 1),
    ``blend`` (MONAI's importance map: ``gaussian`` or ``constant``), ``batch_size`` windows
    per network call, ``out_channels`` K, ``binary``: one sigmoid channel (its background is 0,
    not a class 0 of probability 1)."""

    roi: Tuple[int, int, int]
    overlap: float = 0.5
    blend: str = "gaussian"
    batch_size: int = 4
    out_channels: int = 1
    binary: bool = False


class RingBuffer:
    """Weighted sums of window probabilities ``(K, x, y, depth)`` float32 and their weight sum
    ``(x, y, depth)``, over the x/y range ``[lo, hi)`` of the padded volume and a ring of
    ``depth`` (the window's z size) along z: padded slice g lives at ring slice ``g % depth``.
    Windows are :meth:`add` ed in z order; once no later window reaches below z, the slices
    there are final and :meth:`emit` normalises them and hands out views; :meth:`clear` frees
    them for the next windows."""

    def __init__(self, spec: WindowSpec, lo: Sequence[int], hi: Sequence[int], weight, device):
        import torch

        self.spec, self.lo, self.depth = spec, list(lo), spec.roi[2]
        self.weight = weight.to(device)
        shape = (hi[0] - lo[0], hi[1] - lo[1], self.depth)
        self.acc = torch.zeros((spec.out_channels, *shape), device=device)
        self.wsum = torch.zeros(shape, device=device)

    def pieces(self, a: int, b: int) -> List[Tuple[int, slice]]:
        """Padded z range ``[a, b)`` (at most ``depth`` long) as (first slice, ring slice) pieces."""
        out = []
        while a < b:
            r = a % self.depth
            n = min(b - a, self.depth - r)
            out.append((a, slice(r, r + n)))
            a += n
        return out

    def add(self, start: Sequence[int], probs) -> None:
        """A window at padded corner ``start`` (x, y, z): ``probs`` ``(K, *roi)``, already
        multiplied by the importance map."""
        sx, sy, z = (int(v) for v in start)
        at = (slice(sx - self.lo[0], sx - self.lo[0] + self.spec.roi[0]), slice(sy - self.lo[1], sy - self.lo[1] + self.spec.roi[1]))
        for g, r in self.pieces(z, z + self.depth):
            src = slice(g - z, g - z + r.stop - r.start)
            self.acc[(slice(None),) + at + (r,)] += probs[..., src]
            self.wsum[at + (r,)] += self.weight[..., src]

    def emit(self, a: int, b: int, lo: int, hi: int, view: tuple) -> list:
        """Normalise padded slices ``[a, b)`` and return views (through ``view``, the x/y part
        inside the volume) of their part in ``[lo, hi)``; voxels no window covered become
        background."""
        pieces = self.pieces(a, b)
        for _, r in pieces:
            empty = self.wsum[..., r] == 0
            self.acc[..., r] /= self.wsum[..., r].clamp_min(1e-20)
            if not self.spec.binary and bool(empty.any()):
                self.acc[0, ..., r][empty] = 1.0
        parts = []
        for g, r in pieces:
            s, e = max(g, lo), min(g + r.stop - r.start, hi)
            if s < e:
                parts.append(self.acc[view + (slice(r.start + s - g, r.start + e - g),)])
        return parts

    def clear(self, a: int, b: int) -> None:
        for _, r in self.pieces(a, b):
            self.acc[..., r] = 0
            self.wsum[..., r] = 0


def _pad(x, roi: Sequence[int]):
    """``x`` padded to at least one window per axis, with repeated edge voxels, not zeros
    (MONAI's default): after normalisation 0 is a tissue (CT: the foreground's mean HU), so a
    scan thinner than the window (a 20-slice series) would sit between two slabs of it that no
    training patch showed; training pads alike (data.transforms.cached_transforms). Returns the
    padded volume and the padding before each axis."""
    import torch.nn.functional as F

    size = list(x.shape[1:])
    before = [max(r - n, 0) // 2 for r, n in zip(roi, size)]
    pad = [max(r - n, 0) for r, n in zip(roi, size)]
    if any(pad):
        x = F.pad(x, [v for i in (2, 1, 0) for v in (before[i], pad[i] - before[i])], mode="replicate")
    return x, before


def rolling_windows(x, net, *, spec: WindowSpec, device, buffer_device, keep: Optional[Box] = None) -> Iterator[Tuple[int, int, list, Box]]:
    """Sliding-window inference over ``x`` ``(C, X, Y, Z)`` that yields the result slab by slab.

    Yields ``(z0, z1, parts, xy)``: ``parts`` are views ``(K, x1 - x0, y1 - y0, d)`` of the
    normalised probabilities on the ``xy = ((x0, x1), (y0, y1))`` range that together cover
    ``[z0, z1)`` in order (no parts: all background); they are overwritten once the generator
    resumes, so copy what must be kept. Equals ``sliding_window_inference(x[None], roi,
    batch_size, net, overlap, blend, padding_mode="replicate")`` (window placement, padding of a
    volume smaller than ``roi``, importance map, weighted mean) up to float rounding, but each
    window is computed once and the float32 buffer is a :class:`RingBuffer` ``(K, x, y, roi_z)``
    plus its weight sum: MONAI's ``buffer_steps`` also computes each window once but still
    allocates the whole ``(K, X, Y, Z)`` float32 output, which is what breaks memory at 100+
    classes.

    ``net``: ``(B, C, *roi)`` windows -> ``(B, K, *roi)`` probabilities on ``device``; the
    buffer lives on ``buffer_device``. ``keep``: a box (voxel ranges of ``x``); windows that
    miss it are skipped. Every voxel inside the box keeps all its windows, so the result there
    is unchanged; voxels no window covers are background (class 0 probability 1; a binary
    plan's foreground 0).
    """
    import torch
    from monai.data.utils import compute_importance_map

    roi, size = spec.roi, list(x.shape[1:])
    x, before = _pad(x, roi)
    starts = _kept_windows(x.shape[1:], roi, spec.overlap, None if keep is None else tuple((a + b, c + b) for (a, c), b in zip(keep, before)))
    if not len(starts):
        yield 0, size[2], [], ((0, size[0]), (0, size[1]))
        return
    # the ring covers the kept windows' x/y extent only; the slabs, what of it lies in the volume
    lo = [int(starts[:, a].min()) for a in (0, 1)]
    hi = [int(starts[:, a].max()) + roi[a] for a in (0, 1)]
    inner = [(max(lo[a], before[a]), min(hi[a], before[a] + size[a])) for a in (0, 1)]
    xy = tuple((a - before[i], b - before[i]) for i, (a, b) in enumerate(inner))
    view = (slice(None),) + tuple(slice(a - lo[i], b - lo[i]) for i, (a, b) in enumerate(inner))
    weight = compute_importance_map(tuple(roi), mode=spec.blend, device=device)
    ring = RingBuffer(spec, lo, hi, weight, buffer_device)
    z_in = (before[2], before[2] + size[2])  # the volume's slices on the padded z axis

    def background(a: int, b: int):  # padded slices no window reaches, inside the volume
        a, b = max(a, z_in[0]), min(b, z_in[1])
        return [(a - z_in[0], b - z_in[0], [], xy)] if a < b else []

    rows = sorted(set(starts[:, 2].tolist()))
    yield from background(0, rows[0])
    for j, z in enumerate(rows):
        row = starts[starts[:, 2] == z]
        for b in range(0, len(row), spec.batch_size):
            chunk = row[b : b + spec.batch_size]
            win = torch.stack([x[:, sx : sx + roi[0], sy : sy + roi[1], z : z + roi[2]] for sx, sy, _ in chunk]).to(device)
            probs = net(win).mul_(weight).to(buffer_device)
            for start, p in zip(chunk, probs):
                ring.add(start, p)
            del win, probs
        # below the next row's start no later window reaches: those slices are final
        nxt = rows[j + 1] if j + 1 < len(rows) else x.shape[3]
        done = min(nxt, z + roi[2])
        a, b = max(z, z_in[0]), min(done, z_in[1])
        parts = ring.emit(z, done, a, b, view)
        if a < b:
            yield a - z_in[0], b - z_in[0], parts, xy
        ring.clear(z, done)
        yield from background(z + roi[2], nxt)  # skipped rows: nothing computed there


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
    binary: bool  # independent sigmoid outputs (a binary or region plan): background 0 on every channel
    device: object = "cpu"
    keep: Optional[Box] = None
    #: region mode: ``regions_class_order`` as class indices; :meth:`index` paints the regions
    regions_order: Optional[Tuple[int, ...]] = None

    def channel(self, c: int):
        """Class ``c`` as a float32 tensor ``(X, Y, z1 - z0)`` on the whole preprocessed x/y grid."""
        import torch

        bg = float(c == 0 and not self.binary)
        device: Any = self.parts[0].device if self.parts else self.device
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
        """Class indices ``(X, Y, z1 - z0)`` uint8 (argmax; a binary plan: probability > 0.5; a
        region plan: the regions over 0.5 painted in ``regions_order``)."""
        import torch

        if self.regions_order is not None:
            from ..data.regions import regions_to_labels

            probs = torch.stack([self.channel(c) for c in range(len(self.regions_order))])
            return regions_to_labels(probs, self.regions_order).to(torch.uint8)
        if self.binary:
            return (self.channel(0) > 0.5).to(torch.uint8)
        best = self.channel(0).clone()
        index = torch.zeros(best.shape, dtype=torch.uint8, device=best.device)
        for c in range(1, len(self.parts[0]) if self.parts else 1):
            p = self.channel(c)
            index.masked_fill_(p > best, c)
            torch.maximum(best, p, out=best)
        return index


def stitching_bytes(xy: Sequence[int], roi: Sequence[int], out_channels: int, batch_size: int) -> Dict[str, float]:
    """Bytes of the window engine's buffers over an ``xy`` (voxels) extent: ``ring``, the
    ``(K, x, y, roi_z)`` float32 accumulator and its weight sum, and ``windows``, one batch of
    window logits and probabilities ``(B, K, *roi)`` float32 (B from :func:`window_batch`)."""
    k = out_channels
    return {"ring": (k + 1) * float(xy[0] * xy[1]) * roi[2] * 4,
            "windows": 2 * window_batch(batch_size, k, roi) * k * float(np.prod(roi)) * 4}


def estimate_memory(scan_shape: Sequence[int], scan_spacing: Sequence[float], plan_spacing: Sequence[float], out_channels: int, roi: Sequence[int],
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
        **stitching_bytes(box[:2], roi, k, batch_size),
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

