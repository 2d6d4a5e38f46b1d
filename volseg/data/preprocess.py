"""Preprocessing: the plan (dataset fingerprint) and its exact replay and inverse.

Steps, identical at training and inference:
1. reorient to ``plan.orientation`` (SimpleITK ``DICOMOrient``: a pure axis permutation/flip, no
   interpolation; an oblique scan keeps its small obliquity in the direction matrix),
2. resample to ``plan.spacing`` (mm) on a grid covering the same physical extent (images:
   linear, after a Gaussian anti-alias when an axis is downsampled by more than 1.5x; labels:
   nearest),
3. normalise each channel: CT channels are clipped to the 0.5-99.5 percentiles of the training
   foreground HU and z-scored with the foreground mean/std (MONAI ``ScaleIntensityRange`` does
   both in one affine map); other modalities get a per-image z-score over nonzero voxels (MONAI
   ``NormalizeIntensity``), which removes arbitrary MRI intensity scales.

Arrays leave this module as ``(C, X, Y, Z)`` float32 (MONAI's channel-first, x-fastest order),
labels as ``(1, X, Y, Z)`` uint8 holding class *indices* (0..K-1), not label values.
:func:`restore_labels` inverts steps 1-2 for a stack of class probabilities.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..config import Config, ConfigError
from .io import ImageReadError, read_image
from .manifest import Case, Manifest, is_ct_modality

log = logging.getLogger(__name__)

__all__ = ["Plan", "make_plan", "load_case", "preprocess", "preprocess_case", "restore_labels", "restore_probabilities", "to_canonical", "resample"]


@dataclass(frozen=True)
class ChannelNorm:
    scheme: str  # "ct" | "zscore" | "none"
    lo: float = 0.0
    hi: float = 0.0
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class Plan:
    """Everything needed to replay preprocessing on a new scan; stored as ``plan.json``."""

    spacing: Tuple[float, float, float]  # target mm, canonical (x, y, z) axis order
    orientation: str
    channels: Tuple[str, ...]  # modality name per input channel
    norms: Tuple[ChannelNorm, ...]
    label_values: Tuple[int, ...]  # class index -> label value written in outputs; [0] = background
    label_names: Tuple[str, ...]
    spatial_dims: int
    patch_size: Tuple[int, ...]
    slice_axis: int

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @property
    def binary(self) -> bool:
        """A single foreground label: the network has one sigmoid output."""
        return self.num_classes == 2

    @property
    def out_channels(self) -> int:
        return 1 if self.binary else self.num_classes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        d["norms"] = tuple(ChannelNorm(**n) for n in d["norms"])
        for k in ("spacing", "channels", "label_values", "label_names", "patch_size"):
            d[k] = tuple(d[k])
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# geometry


def to_canonical(img: sitk.Image, orientation: str) -> sitk.Image:
    return sitk.DICOMOrient(img, orientation.upper())


def _target_grid(img: sitk.Image, spacing: Sequence[float]) -> Tuple[List[int], Tuple[float, ...], Tuple[float, ...]]:
    """(size, origin, spacing) of ``img`` resampled to ``spacing``: the image's own grid when
    the spacing already matches within 0.1%, else a grid of the same physical extent."""
    old_sp = np.array(img.GetSpacing())
    if np.allclose(old_sp, spacing, rtol=1e-3):
        return list(img.GetSize()), tuple(img.GetOrigin()), tuple(img.GetSpacing())
    new_sp = np.array(spacing, dtype=float)
    size = np.maximum(1, np.round(np.array(img.GetSize()) * old_sp / new_sp)).astype(int)
    # keep the grid's physical extent centred: move the first voxel centre by half the spacing change
    d = np.array(img.GetDirection()).reshape(3, 3)
    origin = np.array(img.GetOrigin()) + d @ ((new_sp - old_sp) / 2)
    return size.tolist(), tuple(origin.tolist()), tuple(float(v) for v in new_sp)


def resample(img: sitk.Image, spacing: Sequence[float], is_label: bool = False) -> sitk.Image:
    """Resample to ``spacing`` (mm, image axis order) on a grid of the same extent."""
    size, origin, spacing = _target_grid(img, spacing)
    if tuple(size) == img.GetSize() and spacing == img.GetSpacing():
        return img
    if not is_label:
        factor = np.array(spacing) / np.array(img.GetSpacing())
        if np.any(factor > 1.5):
            # anti-alias before downsampling: sigma (mm) ~ half the spacing increase, per axis
            sigma = np.maximum(np.array(spacing) - np.array(img.GetSpacing()), 0) / 2
            img = sitk.SmoothingRecursiveGaussian(img, [float(max(s, 1e-3)) for s in sigma])
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(img, size, sitk.Transform(), interp, origin, spacing, img.GetDirection(), 0, img.GetPixelID())


def _array(img: sitk.Image) -> np.ndarray:
    """SimpleITK ``[z, y, x]`` -> ``[x, y, z]``."""
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


# ---------------------------------------------------------------------------------------------
# plan


def load_case(case: Case, with_label: bool = True) -> Tuple[List[sitk.Image], Optional[sitk.Image]]:
    images = [read_image(p, sitk.sitkFloat32) for p in case.images]
    label = read_image(case.label) if (with_label and case.label is not None) else None
    return images, label


def make_plan(manifest: Manifest, cases: Sequence[Case], cfg: Config, max_samples: int = 200_000, seed: int = 0) -> Plan:
    """Fingerprint the training cases: median spacing (canonical axis order) and, for CT
    channels, foreground intensity percentiles, mean and std."""
    rng = np.random.default_rng(seed)
    spacings, shapes = [], []
    fg: List[List[np.ndarray]] = [[] for _ in manifest.modalities]
    labelled = 0  # cases with any foreground voxel
    for case in cases:
        images, label = load_case(case)
        canon = to_canonical(images[0], cfg.data.orientation)
        spacings.append(canon.GetSpacing())
        shapes.append(np.array(canon.GetSize()) * np.array(canon.GetSpacing()))  # extent, mm
        if label is not None:
            mask = sitk.GetArrayViewFromImage(label) > 0
            labelled += bool(mask.any())
            for c, img in enumerate(images):
                vals = sitk.GetArrayViewFromImage(img)[mask]
                if vals.size > max_samples // max(1, len(cases)):
                    vals = rng.choice(vals, max_samples // max(1, len(cases)), replace=False)
                fg[c].append(vals.astype(np.float32))
    spacing = tuple(float(s) for s in (cfg.data.spacing or np.median(np.array(spacings), axis=0)))
    patch = _fit_patch(cfg, np.median(np.array(shapes), axis=0) / np.array(spacing))
    norms = []
    for c, modality in enumerate(manifest.modalities):
        scheme = cfg.data.normalization
        if scheme == "auto":
            scheme = "ct" if is_ct_modality(modality) else "zscore"
        if scheme == "ct":
            vals = np.concatenate(fg[c]) if fg[c] else np.zeros(0, np.float32)
            if vals.size < 10:
                raise ConfigError(f"CT normalisation of channel {c} ({modality}) needs labelled foreground voxels; found {vals.size}.")
            lo, hi = np.percentile(vals, [0.5, 99.5])
            clipped = np.clip(vals, lo, hi)
            norms.append(ChannelNorm("ct", float(lo), float(hi), float(clipped.mean()), float(max(clipped.std(), 1e-6))))
        else:
            norms.append(ChannelNorm(scheme))
    if labelled == 0:
        log.warning("none of the %d training cases has a foreground voxel in its label map: the network can only learn "
                    "background; check the manifest's label files", len(cases))
    values = sorted(manifest.labels)
    return Plan(
        spacing=spacing,
        orientation=cfg.data.orientation.upper(),
        channels=tuple(manifest.modalities),
        norms=tuple(norms),
        label_values=tuple(values),
        label_names=tuple(manifest.labels[v] for v in values),
        spatial_dims=cfg.model.spatial_dims,
        patch_size=patch,
        slice_axis=cfg.data.slice_axis,
    )


def _fit_patch(cfg: Config, median_shape: np.ndarray) -> Tuple[int, ...]:
    """``data.patch_size`` is an upper bound: an axis longer than the median preprocessed case
    shrinks to that length rounded up to the network's input multiple, so no compute is spent
    on padding (e.g. 5 mm slices: few voxels along z)."""
    multiple = 2 ** (len(cfg.model.features) - 1)
    axes = [0, 1, 2]
    if cfg.model.spatial_dims == 2:
        axes.remove(cfg.data.slice_axis)
    fitted = []
    for p, ax in zip(cfg.data.patch_size, axes):
        need = int(np.ceil(median_shape[ax] / multiple) * multiple)
        fitted.append(int(min(p, max(multiple, need))))
    if tuple(fitted) != tuple(cfg.data.patch_size):
        log.info("patch size %s fitted to the median case shape %s: %s", list(cfg.data.patch_size), np.round(median_shape).astype(int).tolist(), fitted)
    return tuple(fitted)


# ---------------------------------------------------------------------------------------------
# replay


def _normalise(arr: np.ndarray, norm: ChannelNorm) -> np.ndarray:
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    if norm.scheme == "ct":
        t = ScaleIntensityRange(norm.lo, norm.hi, (norm.lo - norm.mean) / norm.std, (norm.hi - norm.mean) / norm.std, clip=True)
    elif norm.scheme == "zscore":
        t = NormalizeIntensity(nonzero=True)
    else:
        return arr.astype(np.float32)
    return np.asarray(t(arr), dtype=np.float32)


def preprocess(images: Sequence[sitk.Image], plan: Plan, label: Optional[sitk.Image] = None, source: str = "") -> Dict[str, np.ndarray]:
    """Replay the plan on one case. Returns ``{"image": (C,X,Y,Z) float32}`` and, with a label,
    ``"label": (1,X,Y,Z) uint8`` class indices."""
    if len(images) != len(plan.channels):
        raise ImageReadError(f"{source or 'input'}: {len(images)} channel(s) given, the model expects {len(plan.channels)} ({list(plan.channels)}).")
    chans = []
    for img, norm in zip(images, plan.norms):
        img = resample(to_canonical(sitk.Cast(img, sitk.sitkFloat32), plan.orientation), plan.spacing)
        chans.append(_normalise(_array(img), norm))
    out = {"image": np.stack(chans)}
    if label is not None:
        lab = _array(resample(to_canonical(label, plan.orientation), plan.spacing, is_label=True))
        lut = np.zeros(int(max(max(plan.label_values), lab.max())) + 1, np.uint8)
        for idx, value in enumerate(plan.label_values):
            lut[value] = idx
        out["label"] = lut[lab.astype(np.int64)][None]
    return out


def preprocess_case(case: Case, plan: Plan) -> Dict[str, np.ndarray]:
    images, label = load_case(case)
    return preprocess(images, plan, label, source=case.name)


def _restored_channels(probs: np.ndarray, plan: Plan, reference: sitk.Image):
    """Yield each class channel of ``probs`` (preprocessed grid) resampled (linear) onto the
    canonical-orientation version of ``reference``, as ``[z, y, x]`` float32; first the
    canonical image itself."""
    canon = to_canonical(reference, plan.orientation)
    pre_size, pre_origin, pre_spacing = _target_grid(canon, plan.spacing)
    if list(probs.shape[1:]) != list(pre_size):
        raise ValueError(f"probabilities of spatial shape {probs.shape[1:]} do not match the preprocessed grid {pre_size}.")
    yield canon
    for channel in probs:
        img = sitk.GetImageFromArray(np.ascontiguousarray(channel.astype(np.float32).transpose(2, 1, 0)))
        img.SetSpacing(pre_spacing)
        img.SetOrigin(pre_origin)
        img.SetDirection(canon.GetDirection())
        # extrapolate at the border: the resampled grid can end up to half a voxel short of the
        # original extent, whose outermost layer would otherwise come back as background
        out = sitk.Resample(img, canon, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, useNearestNeighborExtrapolator=True)
        yield sitk.GetArrayFromImage(out)


def _from_canonical(arr: np.ndarray, canon: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Undo the reorientation: ``[z, y, x]`` array on ``canon``'s grid -> on ``reference``'s."""
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(canon)
    code = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(reference.GetDirection())
    back = sitk.DICOMOrient(img, code)
    if back.GetSize() != reference.GetSize():  # pragma: no cover - DICOMOrient is a permutation
        raise RuntimeError(f"orientation inverse gave size {back.GetSize()}, expected {reference.GetSize()}")
    return sitk.GetArrayFromImage(back)


def restore_labels(probs: np.ndarray, plan: Plan, reference: sitk.Image) -> np.ndarray:
    """Map class probabilities on the preprocessed grid back onto ``reference``'s own grid.

    ``probs``: ``(K, X, Y, Z)`` (K = ``plan.out_channels``; float16 is fine) for the
    preprocessed version of ``reference``. Each class channel is resampled (linear) onto the
    original grid and a running maximum/argmax is kept, so memory peaks at a few
    single-channel volumes rather than ``K x volume x float32``. Returns ``[z, y, x]`` label
    *values* on ``reference``'s voxel grid (uint8 when they fit).
    """
    channels = _restored_channels(probs, plan, reference)
    canon = next(channels)
    if plan.binary:
        index = (next(channels) > 0.5).astype(np.uint8)
    else:
        best = next(channels).copy()
        index = np.zeros(best.shape, np.uint8)
        for k, p in enumerate(channels, start=1):
            index[p > best] = k
            np.maximum(best, p, out=best)
        del best
    values = np.asarray(plan.label_values)
    labels = values.astype(np.uint8 if values.max() <= 255 else np.uint16)[index]
    return _from_canonical(labels, canon, reference)


def restore_probabilities(probs: np.ndarray, plan: Plan, reference: sitk.Image) -> np.ndarray:
    """``(K, X, Y, Z)`` probabilities -> ``(K, z, y, x)`` uint8 (probability x 255) on
    ``reference``'s grid. 8 bits keep 0.004 precision at half the size of float16, which NIfTI
    cannot store anyway."""
    channels = _restored_channels(probs, plan, reference)
    canon = next(channels)
    return np.stack([_from_canonical(np.round(np.clip(p, 0, 1) * 255).astype(np.uint8), canon, reference) for p in channels])
