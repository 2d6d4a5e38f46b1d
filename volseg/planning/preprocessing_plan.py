"""The preprocessing plan from a fingerprint and a config: a pure function, no scan is read."""

from __future__ import annotations

import logging
from typing import Sequence, Tuple

import numpy as np

from ..config import Config, ConfigError
from ..data.manifest import Case, Manifest
from ..data.plan import ChannelNorm, PreprocessingPlan
from ..preprocessing.pipeline import MAX_VOXELS, MIN_VOXELS
from .fingerprint import channel_schemes, fingerprint

log = logging.getLogger(__name__)

__all__ = ["make_plan", "plan_cases"]


def _check_resampled_sizes(extents: np.ndarray, spacing: Tuple[float, float, float], median) -> None:
    """Refuse a spacing that resamples a training case (``extents``: mm per case and axis)
    beyond what preprocessing accepts, naming ``data.spacing`` (not the case: no scan is bad)."""
    sizes = np.maximum(1, np.round(extents / np.array(spacing)))
    voxels = sizes.prod(axis=1)
    worst = int(np.argmax(voxels)) if voxels.max() > MAX_VOXELS else int(np.argmin(sizes.min(axis=1)))
    if voxels[worst] > MAX_VOXELS or sizes[worst].min() < MIN_VOXELS:
        raise ConfigError(
            f"data.spacing={[float(f'{s:.4g}') for s in spacing]} mm resamples training case {worst} ({np.round(extents[worst], 1).tolist()} mm) "
            f"to {sizes[worst].astype(int).tolist()} voxels; a case needs at least {MIN_VOXELS} voxels per axis and at most {MAX_VOXELS:,} in all. "
            f"The cases' median spacing is {[float(f'{s:.4g}') for s in median]} mm."
        )


def make_plan(fp: dict, manifest: Manifest, cfg: Config) -> PreprocessingPlan:
    """The :class:`PreprocessingPlan` of ``cfg`` for fingerprint ``fp`` of ``manifest``'s
    training cases: ``data.spacing`` or the median spacing (canonical axis order), the patch
    fitted to the median case, and per channel the normalisation (CT: the foreground window and
    clipped statistics). ``fp`` must be taken in ``cfg``'s orientation and normalisation."""
    schemes = channel_schemes(manifest, cfg.data.normalization)
    taken = [c["norm"]["scheme"] for c in fp["channels"]]
    if fp["orientation"] != cfg.data.orientation.upper() or taken != schemes:
        raise ValueError(f"the fingerprint was taken for orientation {fp['orientation']} and channel schemes {taken}, "
                         f"the config asks for {cfg.data.orientation.upper()} and {schemes}.")
    spacings = np.array(fp["spacings_mm"], float)
    sx, sy, sz = (float(s) for s in (cfg.data.spacing or np.median(spacings, axis=0)))
    spacing = (sx, sy, sz)
    _check_resampled_sizes(np.array(fp["shapes"]) * spacings, spacing, np.median(spacings, axis=0))
    extent = np.median(np.array(fp["shapes"]) * spacings, axis=0)  # mm
    patch = _fit_patch(cfg, extent / np.array(spacing))
    norms = []
    for c, (ch, scheme) in enumerate(zip(fp["channels"], schemes)):
        stats = ch["norm"]
        if scheme != "ct":
            norms.append(ChannelNorm(scheme))
            continue
        if stats["foreground_voxels_sampled"] < 10:
            raise ConfigError(f"CT normalisation of channel {c} ({ch['name']}) needs labelled foreground voxels; "
                              f"found {stats['foreground_voxels_sampled']}.")
        norms.append(ChannelNorm("ct", float(stats["lo"]), float(stats["hi"]), float(stats["mean"]), float(stats["std"])))
    if not any(c["cases_present"] for c in fp["classes"] if c["value"] != 0):
        log.warning("none of the %d training cases has a foreground voxel in its label map: the network can only learn "
                    "background; check the manifest's label files", fp["cases"])
    values = sorted(manifest.labels)
    return PreprocessingPlan(
        spacing=spacing,
        orientation=cfg.data.orientation.upper(),
        channels=tuple(manifest.modalities),
        norms=tuple(norms),
        label_values=tuple(values),
        label_names=tuple(manifest.labels[v] for v in values),
        spatial_dims=cfg.model.spatial_dims,
        patch_size=patch,
        slice_axis=cfg.data.slice_axis,
        regions=tuple(vs for _, vs in manifest.regions),
        region_names=tuple(n for n, _ in manifest.regions),
        regions_class_order=tuple(manifest.regions_class_order),
        ignore_label=manifest.ignore_label,
    )


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


def plan_cases(manifest: Manifest, cases: Sequence[Case], cfg: Config, seed: int = 0) -> PreprocessingPlan:
    """:func:`make_plan` of a fresh fingerprint of ``cases`` (in ``cfg``'s orientation and
    normalisation): the plan of a set of cases in one call."""
    fp = fingerprint(manifest, cases, orientation=cfg.data.orientation, normalization=cfg.data.normalization, seed=seed)
    return make_plan(fp, manifest, cfg)
