"""Intensities: Hounsfield units, the CT clip window and the per-channel normalisation."""

from __future__ import annotations

import logging
from typing import Tuple

import numpy as np
import SimpleITK as sitk

from ..data.io import ImageReadError
from ..data.manifest import is_ct_modality
from ..data.plan import ChannelNorm

log = logging.getLogger(__name__)

__all__ = ["SOFT_TISSUE_HU", "HU_STORAGE_OFFSET", "CT_PLAUSIBLE_HU", "MAX_MAGNITUDE", "BODY_HU", "ct_window", "check_intensities", "hu_offset", "channel_scheme", "norm_transform", "normalise"]


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


#: CT values beyond these (HU; after a +1024 storage offset at most) are no Hounsfield units:
#: scanners store -1024..3071, extended scales reach some 30,000 for metal
CT_PLAUSIBLE_HU = (-10_000.0, 100_000.0)
#: beyond this magnitude no scanner's intensities lie, and float32 statistics overflow
MAX_MAGNITUDE = 1e12


def check_intensities(img: sitk.Image, scheme: str, modality: str, source: str = "input") -> None:
    """Refuse a channel whose values cannot be a scan's: non-finite values, a magnitude beyond
    :data:`MAX_MAGNITUDE`, or for CT normalisation values outside :data:`CT_PLAUSIBLE_HU` (a
    wrong ``scl_slope`` or an int64 export of something else). A network would still paint a
    plausible-looking mask on them."""
    f = sitk.MinimumMaximumImageFilter()
    f.Execute(img)
    lo, hi = f.GetMinimum(), f.GetMaximum()
    if not (np.isfinite(lo) and np.isfinite(hi)) or max(abs(lo), abs(hi)) > MAX_MAGNITUDE:
        raise ImageReadError(f"{source}: channel {modality!r} holds {lo:g}..{hi:g}, no scan's intensities (check the header's "
                             "scl_slope/scl_inter or rescale slope/intercept, and the data type).")
    if scheme == "ct" and (lo < CT_PLAUSIBLE_HU[0] or hi > CT_PLAUSIBLE_HU[1] + HU_STORAGE_OFFSET):
        raise ImageReadError(f"{source}: channel {modality!r} holds {lo:g}..{hi:g}, outside any Hounsfield scale "
                             f"({CT_PLAUSIBLE_HU[0]:g}..{CT_PLAUSIBLE_HU[1]:g} HU); check the header's rescale slope/intercept "
                             "(scl_slope/scl_inter) and that the file is a CT in HU.")


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


def channel_scheme(normalization: str, modality: str) -> str:
    """``data.normalization`` of a channel: "auto" is "ct" for CT modality names, else "zscore"."""
    if normalization == "auto":
        return "ct" if is_ct_modality(modality) else "zscore"
    return normalization


def norm_transform(norm: ChannelNorm):
    """The MONAI transform of a channel's normalisation (numpy or torch, any device), or None."""
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    if norm.scheme == "ct":
        return ScaleIntensityRange(norm.lo, norm.hi, (norm.lo - norm.mean) / norm.std, (norm.hi - norm.mean) / norm.std, clip=True)
    if norm.scheme == "zscore":
        return NormalizeIntensity(nonzero=True)
    return None


def normalise(x, norm: ChannelNorm):
    """A channel ``(X, Y, Z)`` (numpy array or torch tensor, any device) normalised by ``norm``,
    float32 and of the same kind."""
    t = norm_transform(norm)
    y = x if t is None else t(x)
    if isinstance(x, np.ndarray):
        return np.asarray(y, dtype=np.float32)
    import torch

    return torch.as_tensor(y, dtype=torch.float32, device=x.device)


# CT voxels above this (HU) count as body: air is about -1000 HU, lung about -850..-500
BODY_HU = -500.0

