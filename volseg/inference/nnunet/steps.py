"""nnU-Net v2's preprocessing and export steps, replayed from a model's plans with numpy/scipy.

Each step does what nnU-Net 2.8's default pipeline does (the agreement tests compare the masks
with ``nnUNetv2_predict``'s): crop to the non-zero box, per-channel normalisation, resampling
with scikit-image's ``resize`` semantics (``scipy.ndimage.zoom(grid_mode=True)``, edge mode,
clipped to the input range; the separate-z treatment of anisotropic axes: in-plane spline, then
nearest neighbour along the low-resolution axis), and back. Two departures, both for memory
and speed, neither changes a label except at float-rounding ties: the nearest-neighbour z step
gathers slices by index instead of building nnU-Net's float64 coordinate grid (3 x the volume),
and the logits are resampled one class at a time into a running argmax (or, for regions, a
running paint in ``regions_class_order``), so no classes x volume float64 array exists.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ANISO_THRESHOLD", "crop_to_nonzero", "normalize", "new_shape", "resample", "separate_z", "restore_labels", "pad_to", "window_starts", "gaussian"]

ANISO_THRESHOLD = 3.0  # nnU-Net's: a spacing 3x the finest makes its axis "low resolution"
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization", "RGBTo01Normalization")


def crop_to_nonzero(data: np.ndarray) -> Tuple[np.ndarray, np.ndarray, List[List[int]]]:
    """``(C, *shape)`` -> the crop to the bounding box of the (hole-filled) non-zero voxels of
    any channel, its mask (nnU-Net's ``seg >= 0``) and the half-open box."""
    from scipy.ndimage import binary_fill_holes

    mask = np.any(data != 0, axis=0)
    mask = binary_fill_holes(mask)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, mask.shape[axis]])
    sl = tuple(slice(a, b) for a, b in box)
    return data[(slice(None), *sl)], mask[sl], box


def normalize(data: np.ndarray, mask: np.ndarray, schemes: Sequence[str], use_mask: Sequence[bool], props: Dict[str, dict]) -> np.ndarray:
    """Each channel of float32 ``data`` by its plans scheme, in place (nnU-Net's
    ``default_normalization_schemes``, float32 arithmetic as there)."""
    eps = 1e-8
    for c, scheme in enumerate(schemes):
        img = data[c]
        if scheme == "CTNormalization":
            p = props[str(c)]
            np.clip(img, p["percentile_00_5"], p["percentile_99_5"], out=img)
            img -= p["mean"]
            img /= max(p["std"], eps)
        elif scheme == "ZScoreNormalization":
            if use_mask[c]:
                mean, std = img[mask].mean(), img[mask].std()
                img[mask] = (img[mask] - mean) / max(std, eps)
            else:
                mean, std = img.mean(), img.std()
                img -= mean
                img /= max(std, eps)
        elif scheme == "RescaleTo01Normalization":
            img -= img.min()
            img /= np.clip(img.max(), a_min=eps, a_max=None)
        elif scheme == "RGBTo01Normalization":
            img /= 255.0
        elif scheme != "NoNormalization":
            raise ValueError(f"normalization scheme {scheme!r} is not supported; supported: {list(NORMALIZATIONS)}")
    return data


def new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> Tuple[int, ...]:
    return tuple(int(round(s / t * n)) for s, t, n in zip(spacing, target, shape))


def _lowres_axis(spacing: Sequence[float]) -> np.ndarray:
    return np.where(max(spacing) / np.array(spacing) == 1)[0]


def separate_z(current: Sequence[float], new: Sequence[float], force: Optional[bool] = None) -> Optional[int]:
    """The axis resampled separately (nearest neighbour) or None: nnU-Net's
    ``determine_do_sep_z_and_axis``."""
    def aniso(sp):
        return max(sp) / min(sp) > ANISO_THRESHOLD

    if force is not None:
        axis = _lowres_axis(current) if force else None
    elif aniso(current):
        axis = _lowres_axis(current)
    elif aniso(new):
        axis = _lowres_axis(new)
    else:
        axis = None
    return int(axis[0]) if axis is not None and len(axis) == 1 else None


def _resize(img: np.ndarray, shape: Sequence[int], order: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """scikit-image ``resize(img, shape, order, mode='edge', anti_aliasing=False)`` (clip=True)
    of a float64 array."""
    from scipy import ndimage as ndi

    factors = np.divide(img.shape, shape)
    res = ndi.zoom(img, [1 / f for f in factors], order=order, mode="nearest", grid_mode=True, output=out if out is not None else None)
    res = out if out is not None else res
    if order > 0:
        np.clip(res, img.min(), img.max(), out=res)
    return res


def _nearest_index(old: int, new: int) -> np.ndarray:
    # scipy map_coordinates(order=0, mode='nearest') at nnU-Net's coordinates: floor(c + 0.5)
    c = old / new * (np.arange(new) + 0.5) - 0.5
    return np.clip(np.floor(c + 0.5).astype(np.int64), 0, old - 1)


def resample(img: np.ndarray, shape: Sequence[int], axis: Optional[int], order: int, order_z: int = 0) -> np.ndarray:
    """One channel to ``shape`` as nnU-Net's ``resample_data_or_seg`` (not a segmentation);
    float64 out (the caller casts). ``axis``: :func:`separate_z`'s answer."""
    shape = tuple(int(s) for s in shape)
    if tuple(img.shape) == shape:
        return img
    img = img.astype(float, copy=False)
    if axis is None:
        return _resize(img, shape, order)
    inplane = [s for i, s in enumerate(shape) if i != axis]
    tmp_shape = list(shape)
    tmp_shape[axis] = img.shape[axis]
    here = np.zeros(tmp_shape)
    for k in range(img.shape[axis]):
        sl = [slice(None)] * 3
        sl[axis] = k
        here[tuple(sl)] = _resize(img[tuple(sl)], inplane, order)
    if img.shape[axis] == shape[axis]:
        return here
    if order_z != 0:
        raise ValueError(f"resampling order_z={order_z} for data is not supported (nnU-Net's plans use 0)")
    return np.take(here, _nearest_index(img.shape[axis], shape[axis]), axis=axis)


def restore_labels(logits, shape: Sequence[int], axis: Optional[int], order: int, order_z: int, regions_order: Optional[Sequence[int]],
                   label_dtype=np.uint8) -> np.ndarray:
    """Per-class logits ``(K, *grid)`` -> labels on ``shape``: each class resampled as
    :func:`resample`, into a running argmax (softmax models; the argmax of logits is nnU-Net's
    segmentation) or, for a region model, painted where its sigmoid > 0.5 in
    ``regions_order``. One class at a time: memory is a few volumes, not classes x volume."""
    n = logits.shape[0]
    if regions_order is not None:
        labels = np.zeros(shape, label_dtype)
        for i, value in enumerate(regions_order):
            x = np.asarray(resample(_channel(logits, i), shape, axis, order, order_z), dtype=np.float32)
            labels[x > 0] = value  # sigmoid(x) > 0.5  <=>  x > 0
        return labels
    best = np.asarray(resample(_channel(logits, 0), shape, axis, order, order_z), dtype=np.float32)
    labels = np.zeros(shape, label_dtype)
    for c in range(1, n):
        x = np.asarray(resample(_channel(logits, c), shape, axis, order, order_z), dtype=np.float32)
        better = x > best
        labels[better] = c
        np.maximum(best, x, out=best)
    return labels


def _channel(logits, c: int) -> np.ndarray:
    x = logits[c]
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def pad_to(shape: Sequence[int], patch: Sequence[int]) -> List[Tuple[int, int]]:
    """(low, high) padding of the last ``len(patch)`` axes of ``shape`` up to ``patch``, centred
    with the extra voxel above (acvl_utils' ``pad_nd_image``)."""
    lead = len(shape) - len(patch)
    pads = [(0, 0)] * lead
    for s, p in zip(shape[lead:], patch):
        d = max(p - s, 0)
        pads.append((d // 2, d // 2 + d % 2))
    return pads


def window_starts(size: Sequence[int], patch: Sequence[int], step: float) -> List[List[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``: evenly spread starts, at most
    ``step x patch`` apart, the first at 0 and the last flush with the end."""
    out = []
    for i, k in zip(size, patch):
        n = int(np.ceil((i - k) / (k * step))) + 1
        span = (i - k) / (n - 1) if n > 1 else 0.0
        out.append([int(np.round(span * j)) for j in range(n)])
    return out


def gaussian(patch: Sequence[int], sigma_scale: float = 1.0 / 8, scale: float = 10.0) -> np.ndarray:
    """nnU-Net's ``compute_gaussian`` importance map (float32 here; nnU-Net's is float16), no zeros."""
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    g /= np.max(g) / scale
    g = g.astype(np.float32)
    g[g == 0] = g[g > 0].min()
    return g
