"""Preprocessing: the plan (dataset fingerprint) and its exact replay and inverse.

Steps, identical at training and inference:
1. reorient to ``plan.orientation`` (SimpleITK ``DICOMOrient``: a pure axis permutation/flip, no
   interpolation; an oblique scan keeps its small obliquity in the direction matrix),
2. resample to ``plan.spacing`` (mm) on a grid covering the same physical extent (images:
   linear, after a Gaussian anti-alias when an axis is downsampled by more than 1.5x; labels:
   nearest),
3. normalise each channel: CT channels (after :func:`hu_offset`: a scan stored as HU + 1024 is
   shifted back, an 8-bit export refused) are clipped to the 0.5-99.5 percentiles of the training
   foreground HU, widened to at least the soft-tissue window -160..240 HU (:func:`ct_window`),
   and z-scored with the foreground mean/std (MONAI ``ScaleIntensityRange`` does
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
from .io import ImageReadError, read_channels, read_label, same_geometry
from .manifest import Case, Manifest, is_ct_modality

log = logging.getLogger(__name__)

__all__ = ["Plan", "SOFT_TISSUE_HU", "channel_scheme", "ct_window", "hu_offset", "make_plan", "load_case", "preprocess", "preprocess_case", "restore_labels", "to_canonical", "resample"]


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
        sigma = _antialias_sigma(img.GetSpacing(), spacing)
        for axis in np.flatnonzero(sigma):
            # one axis at a time: ITK's recursive Gaussian needs >= 4 voxels along every axis it
            # smooths, and a single-slice axis (2D mode) is never downsampled in-plane
            if img.GetSize()[axis] >= 4:
                img = sitk.RecursiveGaussian(img, float(sigma[axis]), False, sitk.RecursiveGaussianImageFilter.ZeroOrder, int(axis))
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    # the new grid can reach up to half a voxel beyond the scan: take the edge voxel there, not 0
    # (0 HU is water, not air), as the torch resampler does
    return sitk.Resample(img, size, sitk.Transform(), interp, origin, spacing, img.GetDirection(), 0, img.GetPixelID(), useNearestNeighborExtrapolator=True)


def _antialias_sigma(old: Sequence[float], new: Sequence[float]) -> np.ndarray:
    """Gaussian sigma (mm, per axis) to smooth with before resampling from spacing ``old`` to
    ``new``: about half the spacing increase on axes downsampled by more than 1.5x, 0 elsewhere.
    The SimpleITK and the torch (GPU) paths both use it, so they smooth alike."""
    old, new = np.asarray(old, float), np.asarray(new, float)
    return np.where(new / old > 1.5, (new - old) / 2, 0.0)


def _array(img: sitk.Image) -> np.ndarray:
    """SimpleITK ``[z, y, x]`` -> ``[x, y, z]``."""
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


# ---------------------------------------------------------------------------------------------
# plan


def load_case(case: Case, with_label: bool = True) -> Tuple[List[sitk.Image], Optional[sitk.Image]]:
    """(channel images as float32, label map or None). A 4D file gives one channel per entry of
    its 4th axis, so ``case.images`` may hold fewer paths than there are channels."""
    images = [img for p in case.images for img in read_channels(p, sitk.sitkFloat32)]
    label = read_label(case.label) if (with_label and case.label is not None) else None
    return images, label


#: the narrowest CT clip window (HU): the soft-tissue window (width 400, level 40)
SOFT_TISSUE_HU = (-160.0, 240.0)


def ct_window(p00_5: float, p99_5: float) -> Tuple[float, float]:
    """Clip window (lo, hi) in HU from the training foreground's 0.5 and 99.5 percentiles
    (nnU-Net's rule), widened to at least :data:`SOFT_TISSUE_HU`. The widening is for a foreground that is
    one bright or dark structure: a contrast-filled aorta alone gives -2..1621 HU, which maps fat,
    water and muscle (and a non-contrast aorta, 40 HU) to one value, and with them the context
    that tells the structure from its surroundings in a scan from another source or contrast
    phase. A window that already spans soft tissue (organs, tumours) is unchanged."""
    return float(min(p00_5, SOFT_TISSUE_HU[0])), float(max(p99_5, SOFT_TISSUE_HU[1]))


#: what a CT stored without its rescale intercept holds: HU + 1024 (unsigned 0..4095 storage)
HU_STORAGE_OFFSET = 1024.0


def hu_offset(img: sitk.Image, scheme: str, modality: str, source: str = "input", warn: bool = True) -> float:
    """What to add to a channel of CT normalisation (``scheme`` "ct") to have Hounsfield units: 0 for a scan in HU; -1024 for one
    stored as HU + 1024 (unsigned storage whose rescale intercept was lost on conversion), which is
    logged as a warning. A body CT always holds fat, lung, gas or air, all below 0 HU, so a scan
    without a negative voxel is not in HU: up to 255 everywhere it is an 8-bit export (display
    window, not HU) and is refused, as no offset makes it HU again; otherwise it is taken as
    HU + 1024 (air then sits at 0). Without this, a scan in other units gets a plausible-looking
    mask from a network trained on HU. Other schemes: 0."""
    if scheme != "ct":
        return 0.0
    f = sitk.MinimumMaximumImageFilter()
    f.Execute(img)
    lo, hi = f.GetMinimum(), f.GetMaximum()
    if lo < 0:
        return 0.0
    if lo == hi:
        raise ImageReadError(f"{source}: channel {modality!r} holds {lo:g} in every voxel: a blank scan, nothing to segment.")
    if hi <= 255:
        raise ImageReadError(
            f"{source}: channel {modality!r} holds {lo:g}..{hi:g}, no value below 0 and none above 255: an 8-bit export "
            "(display window), not Hounsfield units, which a CT model needs (air -1000, fat -100, water 0 HU). "
            "Export the scan in HU (DICOM values with their rescale slope/intercept applied)."
        )
    if warn:
        log.warning("%s: channel %r holds %g..%g with no value below 0; a CT in Hounsfield units always has some (air, lung, "
                    "fat), so it is read as HU + %g (stored without its rescale intercept) and %g is subtracted. If this scan "
                    "really is in HU, check its header.", source, modality, lo, hi, HU_STORAGE_OFFSET, HU_STORAGE_OFFSET)
    return -HU_STORAGE_OFFSET


def make_plan(manifest: Manifest, cases: Sequence[Case], cfg: Config, max_samples: int = 200_000, seed: int = 0) -> Plan:
    """Fingerprint the training cases: median spacing (canonical axis order) and, for CT
    channels, foreground intensity percentiles, mean and std."""
    rng = np.random.default_rng(seed)
    schemes = [channel_scheme(cfg.data.normalization, m) for m in manifest.modalities]
    spacings, shapes = [], []
    fg: List[List[np.ndarray]] = [[] for _ in manifest.modalities]
    labelled = 0  # cases with any foreground voxel
    for case in cases:
        images, label = load_case(case)
        offsets = [hu_offset(img, sch, m, case.name) for img, sch, m in zip(images, schemes, manifest.modalities)]
        canon, _, _ = canonical_geometry(images[0], cfg.data.orientation)  # geometry only, no pixel copy
        spacings.append(canon.GetSpacing())
        shapes.append(np.array(canon.GetSize()) * np.array(canon.GetSpacing()))  # extent, mm
        if label is not None:
            mask = sitk.GetArrayViewFromImage(label) > 0
            labelled += bool(mask.any())
            for c, img in enumerate(images):
                vals = sitk.GetArrayViewFromImage(img)[mask] + offsets[c]
                if vals.size > max_samples // max(1, len(cases)):
                    vals = rng.choice(vals, max_samples // max(1, len(cases)), replace=False)
                fg[c].append(vals.astype(np.float32))
    spacing = tuple(float(s) for s in (cfg.data.spacing or np.median(np.array(spacings), axis=0)))
    patch = _fit_patch(cfg, np.median(np.array(shapes), axis=0) / np.array(spacing))
    norms = []
    for c, (modality, scheme) in enumerate(zip(manifest.modalities, schemes)):
        if scheme == "ct":
            vals = np.concatenate(fg[c]) if fg[c] else np.zeros(0, np.float32)
            if vals.size < 10:
                raise ConfigError(f"CT normalisation of channel {c} ({modality}) needs labelled foreground voxels; found {vals.size}.")
            lo, hi = ct_window(*np.percentile(vals, [0.5, 99.5]))
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


def channel_scheme(normalization: str, modality: str) -> str:
    """``data.normalization`` of a channel: "auto" is "ct" for CT modality names, else "zscore"."""
    if normalization == "auto":
        return "ct" if is_ct_modality(modality) else "zscore"
    return normalization


def _fit_patch(cfg: Config, median_shape: np.ndarray) -> Tuple[int, ...]:
    """``data.patch_size`` is an upper bound: an axis longer than the median preprocessed case
    shrinks to that length rounded up to the network's input multiple, so no compute is spent
    on padding (e.g. 5 mm slices: few voxels along z)."""
    axes = [0, 1, 2]
    if cfg.model.spatial_dims == 2:
        axes.remove(cfg.data.slice_axis)
    fitted = []
    for p, ax, multiple in zip(cfg.data.patch_size, axes, cfg.model.input_multiple):
        need = int(np.ceil(median_shape[ax] / multiple) * multiple)
        fitted.append(int(min(p, max(multiple, need))))
    if tuple(fitted) != tuple(cfg.data.patch_size):
        log.info("patch size %s fitted to the median case shape %s: %s", list(cfg.data.patch_size), np.round(median_shape).astype(int).tolist(), fitted)
    return tuple(fitted)


# ---------------------------------------------------------------------------------------------
# replay


def _norm_transform(norm: ChannelNorm):
    """The MONAI transform of a channel's normalisation (numpy or torch, any device), or None."""
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    if norm.scheme == "ct":
        return ScaleIntensityRange(norm.lo, norm.hi, (norm.lo - norm.mean) / norm.std, (norm.hi - norm.mean) / norm.std, clip=True)
    if norm.scheme == "zscore":
        return NormalizeIntensity(nonzero=True)
    return None


def _normalise(arr: np.ndarray, norm: ChannelNorm) -> np.ndarray:
    t = _norm_transform(norm)
    return arr.astype(np.float32) if t is None else np.asarray(t(arr), dtype=np.float32)


MIN_VOXELS = 4  # per axis, before and after resampling (ITK's anti-alias filter needs 4)
MAX_VOXELS = 2**30  # per channel after resampling: 4 GiB of float32


def _check_input(images: Sequence[sitk.Image], plan: Plan, source: str) -> None:
    """Channel count, one shared grid, and a grid size volseg can work on (with the limits)."""
    if len(images) != len(plan.channels):
        raise ImageReadError(
            f"{source}: {len(images)} channel(s) given, the model expects {len(plan.channels)} ({list(plan.channels)}); "
            "give one file per channel, or one 4D file with the channels on its 4th axis."
        )
    for c, img in enumerate(images[1:], start=1):
        diff = same_geometry(images[0], img)
        if diff:
            raise ImageReadError(f"{source}: channel {c} ({plan.channels[c]}) is not on the grid of channel 0 ({plan.channels[0]}): {diff}; resample the channels onto one grid first.")
    canon, _, _ = canonical_geometry(images[0], plan.orientation)  # the geometry only: no pixel is copied
    size, _, _ = _target_grid(canon, plan.spacing)
    axes = [a for a in range(3) if not (plan.spatial_dims == 2 and a == plan.slice_axis)]
    small = any(canon.GetSize()[a] < MIN_VOXELS or size[a] < MIN_VOXELS for a in axes)
    if small or int(np.prod(size)) > MAX_VOXELS:
        raise ImageReadError(
            f"{source}: {list(canon.GetSize())} voxels of {[round(s, 4) for s in canon.GetSpacing()]} mm ({plan.orientation} order) "
            f"resample to {size} voxels at the model's {[round(s, 4) for s in plan.spacing]} mm; volseg needs at least {MIN_VOXELS} voxels along "
            f"each {'in-plane ' if plan.spatial_dims == 2 else ''}axis, before and after resampling, and at most {MAX_VOXELS:,} "
            "after (check the header's spacing)."
        )


def preprocess(images: Sequence[sitk.Image], plan: Plan, label: Optional[sitk.Image] = None, source: str = "") -> Dict[str, np.ndarray]:
    """Replay the plan on one case. Returns ``{"image": (C,X,Y,Z) float32}`` and, with a label,
    ``"label": (1,X,Y,Z) uint8`` class indices. Raises :class:`ImageReadError` (naming
    ``source``) when the channel count differs from the plan's, the channels are not on one
    grid, or the grid has fewer than :data:`MIN_VOXELS` per axis (before or after resampling;
    in-plane axes in 2D mode) or more than :data:`MAX_VOXELS` after."""
    _check_input(images, plan, source or "input")
    chans = []
    for img, norm, modality in zip(images, plan.norms, plan.channels):
        img = sitk.Cast(img, sitk.sitkFloat32)
        offset = hu_offset(img, norm.scheme, modality, source or "input")
        if offset:
            img = img + offset
        img = resample(to_canonical(img, plan.orientation), plan.spacing)
        chans.append(_normalise(_array(img), norm))
    out = {"image": np.stack(chans)}
    if label is not None:
        lab = _array(resample(to_canonical(label, plan.orientation), plan.spacing, is_label=True))
        lut = np.zeros(int(max(max(plan.label_values), lab.max())) + 1, np.uint8)
        for idx, value in enumerate(plan.label_values):
            lut[value] = idx
        out["label"] = lut[lab.astype(np.int64)][None]
    return out


def preprocess_torch(images: Sequence[sitk.Image], plan: Plan, device="cpu", source: str = ""):
    """:func:`preprocess` of the image channels in torch on ``device`` (the GPU path): the
    reorientation is a permute/flip view (:func:`canonical_view`), the anti-alias a separable
    Gaussian convolution, the resampling :func:`resample_linear` on the axis-aligned grids, the
    normalisation the same MONAI transform. Returns ``(C, X, Y, Z)`` float32 on ``device``.
    Agrees with :func:`preprocess` to float tolerance inside the grid; SimpleITK's recursive
    Gaussian is an approximation of the exact one used here, and where the new grid reaches up
    to half a voxel beyond the scan it takes the edge value, where SimpleITK writes 0."""
    import torch

    _check_input(images, plan, source or "input")
    canon, perm, sign = canonical_geometry(images[0], plan.orientation)
    size, origin, spacing = _target_grid(canon, plan.spacing)
    coords = grid_coordinates(canon, Grid(tuple(size), origin, spacing, canon.direction))
    sigma = _antialias_sigma(canon.spacing, spacing) if tuple(size) != canon.size or spacing != canon.spacing else np.zeros(3)
    sigma = np.where(np.array(canon.size) >= 4, sigma, 0.0)  # as resample(): ITK smooths only axes of >= 4 voxels
    chans = []
    for img, norm, modality in zip(images, plan.norms, plan.channels):
        arr = np.ascontiguousarray(canonical_view(sitk.GetArrayViewFromImage(img), perm, sign))
        x = torch.from_numpy(arr).to(device).float() + hu_offset(img, norm.scheme, modality, source or "input")
        if sigma.any():
            x = _gaussian(x, [s / sp for s, sp in zip(sigma, canon.spacing)])
        x = resample_linear(x, coords)
        t = _norm_transform(norm)
        chans.append(x if t is None else torch.as_tensor(t(x), dtype=torch.float32, device=x.device))
    return torch.stack(chans)


def _gaussian(x, sigma_vox: Sequence[float]):
    """Separable Gaussian smoothing of ``(X, Y, Z)`` (sigma in voxels per axis; kernel to 4
    sigma, edges replicated)."""
    import torch
    import torch.nn.functional as F

    for axis, s in enumerate(sigma_vox):
        if s < 1e-3:
            continue
        r = max(1, int(np.ceil(4 * s)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32, device=x.device) / s) ** 2)
        k = (k / k.sum()).view(1, 1, -1)
        moved = x.movedim(axis, -1)
        flat = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (r, r), mode="replicate")
        x = F.conv1d(flat, k).reshape(moved.shape).movedim(-1, axis)
    return x


def preprocess_case(case: Case, plan: Plan) -> Dict[str, np.ndarray]:
    images, label = load_case(case)
    return preprocess(images, plan, label, source=case.name)


# ---------------------------------------------------------------------------------------------
# inverse: from the preprocessed grid back to the scan's own grid


@dataclass(frozen=True)
class Grid:
    """A voxel grid without pixels, in SimpleITK's (x, y, z) axis order: ``size`` (voxels),
    ``origin`` and ``spacing`` (mm), ``direction`` (3x3, row-major). It answers the getters
    :func:`_target_grid` uses, so no pixel copy is needed to plan a grid."""

    size: Tuple[int, int, int]
    origin: Tuple[float, float, float]
    spacing: Tuple[float, float, float]
    direction: Tuple[float, ...]

    def GetSize(self):  # noqa: N802 - SimpleITK's getter names
        return self.size

    def GetOrigin(self):  # noqa: N802
        return self.origin

    def GetSpacing(self):  # noqa: N802
        return self.spacing

    def GetDirection(self):  # noqa: N802
        return self.direction


def canonical_geometry(reference: sitk.Image, orientation: str) -> Tuple[Grid, Tuple[int, ...], Tuple[int, ...]]:
    """The grid :func:`to_canonical` gives ``reference``, without copying its pixels, and the
    axis map from it: canonical axis ``a`` is reference axis ``perm[a]``, reversed where
    ``sign[a] < 0``. (DICOMOrient only permutes and flips; a 1-voxel probe with the same
    direction tells which permutation it picks.)"""
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetDirection(reference.GetDirection())
    dc = np.array(to_canonical(probe, orientation).GetDirection()).reshape(3, 3)
    m = np.array(reference.GetDirection()).reshape(3, 3).T @ dc  # m[i, a] = <reference axis i, canonical axis a>
    perm = tuple(int(i) for i in np.abs(m).argmax(0))
    sign = tuple(int(np.sign(m[perm[a], a])) for a in range(3))
    size_r, sp_r = reference.GetSize(), reference.GetSpacing()
    corner = [0, 0, 0]
    for a in range(3):
        corner[perm[a]] = 0 if sign[a] > 0 else size_r[perm[a]] - 1
    grid = Grid(
        size=tuple(int(size_r[perm[a]]) for a in range(3)),
        origin=tuple(reference.TransformIndexToPhysicalPoint(corner)),
        spacing=tuple(float(sp_r[perm[a]]) for a in range(3)),
        direction=tuple(float(v) for v in dc.ravel()),
    )
    return grid, perm, sign


def canonical_view(arr_zyx: np.ndarray, perm: Sequence[int], sign: Sequence[int]) -> np.ndarray:
    """A writable view of a reference-ordered ``[z, y, x]`` array (leading axes kept) in the
    canonical ``(x, y, z)`` order of :func:`canonical_geometry`: writing into it undoes the
    reorientation without a copy."""
    lead = arr_zyx.ndim - 3
    v = np.moveaxis(arr_zyx, [lead, lead + 1, lead + 2], [lead + 2, lead + 1, lead])  # (..., x, y, z)
    v = v.transpose(*range(lead), *(lead + p for p in perm))
    for a in range(3):
        if sign[a] < 0:
            v = np.flip(v, lead + a)
    return v


def grid_coordinates(src: Grid, dst: Grid) -> List[np.ndarray]:
    """Continuous ``src`` voxel index (per axis, float64) of every ``dst`` voxel centre, for two
    grids with the same direction (axis-aligned): ``[u_x, u_y, u_z]``."""
    d = np.array(src.direction).reshape(3, 3)
    offset = d.T @ (np.array(dst.origin) - np.array(src.origin))  # mm along each axis
    return [(offset[a] + np.arange(dst.size[a]) * dst.spacing[a]) / src.spacing[a] for a in range(3)]


def resample_linear(t, coords: Sequence[Optional[np.ndarray]]):
    """Separable linear interpolation of a tensor ``(..., X, Y, Z)`` at continuous voxel
    indices ``coords`` (one 1-D array per trailing axis; None keeps an axis). Beyond the grid
    an axis takes its edge value. On axis-aligned grids this equals SimpleITK's linear
    resampling inside the grid (up to half a voxel beyond the outer voxel centres; further out,
    SimpleITK's nearest-neighbour extrapolator also rounds the other axes), but runs on any
    torch device and lets a caller resample one slab at a time. Axes that shrink most go first
    (least work)."""
    import torch

    lead = t.ndim - len(coords)
    order = sorted((i for i, u in enumerate(coords) if u is not None), key=lambda i: len(coords[i]) / t.shape[lead + i])
    for i in order:
        dim, n = lead + i, t.shape[lead + i]
        u = np.clip(np.asarray(coords[i], np.float64), 0, n - 1)
        if len(u) == n and np.allclose(u, np.arange(n), atol=1e-6):
            continue
        i0 = np.minimum(np.floor(u).astype(np.int64), n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        shape = [1] * t.ndim
        shape[dim] = -1
        w = torch.as_tensor(u - i0, dtype=t.dtype, device=t.device).view(shape)
        a = t.index_select(dim, torch.as_tensor(i0, device=t.device))
        b = t.index_select(dim, torch.as_tensor(i1, device=t.device))
        t = torch.lerp(a, b, w)
    return t


class ScanRestorer:
    """Streams class probabilities from the preprocessed grid onto the scan's own grid.

    Call :meth:`add` with consecutive slabs ``[z0, z1)`` of the preprocessed grid's z axis;
    ``channel(c)`` returns class ``c`` on that slab as a tensor ``(X, Y, z1 - z0)``. Both grids
    are axis-aligned in the canonical orientation, so a slab plus the last slice of the one
    before determines every scan slice that lies in it: each class is resampled (separable
    linear, :func:`resample_linear`, nearest-edge extrapolation) and a running maximum/argmax is
    kept. Memory holds one class of one scan slab at a time (never classes x volume), and
    results go straight into reference-ordered arrays through :func:`canonical_view`.
    ``probabilities=True`` also keeps ``(K, z, y, x)`` uint8 (probability x 255) on the scan
    grid: K bytes per scan voxel.
    """

    def __init__(self, plan: Plan, reference: sitk.Image, probabilities: bool = False, device="cpu"):
        canon, perm, sign = canonical_geometry(reference, plan.orientation)
        size, origin, spacing = _target_grid(canon, plan.spacing)
        self.pre_size = tuple(size)
        self._coords = grid_coordinates(Grid(tuple(size), origin, spacing, canon.direction), canon)
        self.plan, self.device = plan, device
        values = np.asarray(plan.label_values)
        self._values = values.astype(np.uint8 if values.max() <= 255 else np.uint16)
        shape = tuple(reference.GetSize())[::-1]
        self._labels = np.zeros(shape, self._values.dtype)
        self._label_view = canonical_view(self._labels, perm, sign)
        self.probabilities = np.zeros((plan.out_channels,) + shape, np.uint8) if probabilities else None
        self._prob_view = canonical_view(self.probabilities, perm, sign) if probabilities else None
        self._z, self._next, self._carry = 0, 0, None

    def add(self, z0: int, z1: int, channel) -> None:
        import torch

        if z0 != self._z or not z0 < z1 <= self.pre_size[2]:
            raise ValueError(f"slab [{z0}, {z1}) does not continue at z={self._z} of the preprocessed grid {list(self.pre_size)}.")
        uz = self._coords[2]
        k1 = len(uz) if z1 == self.pre_size[2] else int(np.searchsorted(uz, z1 - 1, side="right"))
        k0, lo = self._next, z0 - (self._carry is not None)
        coords = [self._coords[0], self._coords[1], uz[k0:k1] - lo]
        best = index = None
        carry = []
        k = self.plan.out_channels
        for c in range(k):
            p = torch.as_tensor(channel(c)).to(self.device, torch.float32)
            if tuple(p.shape) != (*self.pre_size[:2], z1 - z0):
                raise ValueError(f"class {c} slab has shape {tuple(p.shape)}, expected {(*self.pre_size[:2], z1 - z0)}.")
            src = p if self._carry is None else torch.cat([self._carry[c], p], -1)
            carry.append(p[..., -1:].clone())
            # interpolation is a convex combination and the K probabilities sum to 1, so the winner
            # has at least 1/K: a class below that everywhere in the slab cannot win (exact skip)
            if k1 == k0 or (self._prob_view is None and k > 2 and float(src.max()) < (1 - 1e-3) / k):
                continue
            q = resample_linear(src, coords)
            best, index = self._vote(c, q, best, index)
            if self._prob_view is not None:
                self._prob_view[c, ..., k0:k1] = (q.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        if k1 > k0:
            self._label_view[..., k0:k1] = self._values[index.cpu().numpy()]
        self._z, self._next, self._carry = z1, k1, carry

    def _vote(self, c: int, q, best, index):
        import torch

        if self.plan.binary:
            return None, (q > 0.5).to(torch.uint8)
        if best is None:
            return q.clone(), torch.full(q.shape, c, dtype=torch.uint8, device=q.device)
        index.masked_fill_(q > best, c)  # (boolean-index assignment is several times slower)
        return torch.maximum(best, q, out=best), index

    def labels(self) -> np.ndarray:
        """``[z, y, x]`` label values on the reference grid (uint8 when they fit)."""
        if self._z != self.pre_size[2]:
            raise RuntimeError(f"only {self._z} of {self.pre_size[2]} preprocessed slices were added.")
        return self._labels


def _restore(probs: np.ndarray, plan: Plan, reference: sitk.Image, probabilities: bool) -> ScanRestorer:
    import torch

    restorer = ScanRestorer(plan, reference, probabilities=probabilities)
    if tuple(probs.shape) != (plan.out_channels, *restorer.pre_size):
        raise ValueError(f"probabilities of shape {probs.shape} do not match ({plan.out_channels} classes, preprocessed grid {list(restorer.pre_size)}).")
    restorer.add(0, probs.shape[-1], lambda c: torch.from_numpy(np.asarray(probs[c], np.float32)))
    return restorer


def restore_labels(probs: np.ndarray, plan: Plan, reference: sitk.Image) -> np.ndarray:
    """Map class probabilities on the preprocessed grid back onto ``reference``'s own grid.

    ``probs``: ``(K, X, Y, Z)`` (K = ``plan.out_channels``; float16 is fine) for the
    preprocessed version of ``reference``. One slab of :class:`ScanRestorer`: each class
    channel is resampled (linear) onto the original grid with a running maximum/argmax, so
    memory peaks at a few single-channel volumes rather than ``K x volume x float32``. Returns
    ``[z, y, x]`` label *values* on ``reference``'s voxel grid (uint8 when they fit).
    """
    return _restore(probs, plan, reference, False).labels()


# CT voxels above this (HU) count as body: air is about -1000 HU, lung about -850..-500
BODY_HU = -500.0


def foreground_box(images: Sequence[sitk.Image], plan: Plan, margin_mm: float) -> Optional[Tuple[Tuple[int, int], ...]]:
    """Bounding box of the body on the preprocessed grid, ``((x0, x1), (y0, y1), (z0, z1))``
    (half-open voxel ranges), widened by ``margin_mm``. Computed on the raw intensities before
    any resampling or normalisation: CT channels (``plan.norms``) count voxels above
    :data:`BODY_HU`, other channels nonzero voxels; the channels' boxes are united. None when
    no voxel qualifies (then nothing may be cropped)."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for img, norm, modality in zip(images, plan.norms, plan.channels):
        arr = sitk.GetArrayViewFromImage(img)  # [z, y, x]
        mask = arr > BODY_HU - hu_offset(img, norm.scheme, modality, warn=False) if norm.scheme == "ct" else arr != 0
        for axis in range(3):  # index axis (x, y, z) = array axis 2 - axis
            hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != 2 - axis)))
            if hit.size:
                lo[axis], hi[axis] = min(lo[axis], hit[0]), max(hi[axis], hit[-1])
    if not np.isfinite(lo).all():
        return None
    canon, _, _ = canonical_geometry(images[0], plan.orientation)
    size, origin, spacing = _target_grid(canon, plan.spacing)
    d = np.array(canon.direction).reshape(3, 3)
    corners = [images[0].TransformIndexToPhysicalPoint([int(c) for c in np.where(bits, hi, lo)]) for bits in np.ndindex(2, 2, 2)]
    u = np.array([d.T @ (np.array(p) - np.array(origin)) / np.array(spacing) for p in corners])  # (8, 3) voxel indices
    margin = margin_mm / np.array(spacing)
    start = np.clip(np.floor(u.min(0) - margin), 0, size).astype(int)
    stop = np.clip(np.ceil(u.max(0) + margin) + 1, 0, size).astype(int)
    return tuple((int(a), int(b)) for a, b in zip(start, stop))
