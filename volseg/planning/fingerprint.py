"""The dataset fingerprint: one pass over the training cases, written to ``fingerprint.json``.

Everything planning decides is a function of it: the config (:mod:`.planner`) and the
preprocessing plan (:mod:`.preprocessing_plan`), so ``volseg train`` reads every scan once.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..data.manifest import Case, Manifest, is_ct_modality
from ..preprocessing.geometry import canonical_geometry
from ..preprocessing.intensity import channel_scheme, check_intensities, ct_window, hu_offset
from ..preprocessing.pipeline import load_case

__all__ = ["fingerprint", "channel_schemes"]


def channel_schemes(manifest: Manifest, normalization: str) -> List[str]:
    """``data.normalization`` resolved per channel of ``manifest`` (``ct``, ``zscore`` or ``none``)."""
    return [channel_scheme(normalization, m) for m in manifest.modalities]


def _label_counts(label: sitk.Image) -> Dict[int, int]:
    """Voxels per label value. ITK's label statistics, not ``np.bincount``: bincount first
    copies the map to int64 (8 bytes a voxel), an order of magnitude slower and 0.6 GB for a
    512 x 512 x 300 scan."""
    stats = sitk.LabelShapeStatisticsImageFilter()  # background value 0: counted as the rest
    stats.ComputePerimeterOff()
    stats.Execute(label)
    counts = {int(v): int(stats.GetNumberOfPixels(v)) for v in stats.GetLabels()}
    counts[0] = int(np.prod(label.GetSize())) - sum(counts.values())
    return counts


def fingerprint(manifest: Manifest, cases: Sequence[Case], orientation: str = "RAS", normalization: str = "auto",
                max_samples: int = 200_000, seed: int = 0, norm_cases: Optional[Sequence[Case]] = None) -> dict:
    """Dataset fingerprint as a JSON-able dict, from one read of each case. Spacings (mm) and
    shapes (voxels) are in the canonical ``orientation``'s (x, y, z) order; intensity statistics
    are over labelled foreground voxels (at most ``max_samples`` per channel, drawn evenly from
    the cases), in HU for channels that ``normalization`` (``data.normalization``) makes CT, with
    the clipped mean/std the CT normalisation uses. ``classes[i]["smallest_mm3"]``: the smallest
    volume the class has in any one case (None when it never occurs).

    ``norm_cases`` (default: ``cases``): the cases whose foreground gives the normalisation's
    statistics (``channels[c]["norm"]``), collected in the same pass: a run plans its config from
    every training case but normalises with its training split's alone, so no validation scan's
    intensities enter the preprocessing it is validated with."""
    rng = np.random.default_rng(seed)
    schemes = channel_schemes(manifest, normalization)
    values = sorted(manifest.labels)
    per_case = max(1, max_samples // max(1, len(cases)))
    norm_names = {c.name for c in (cases if norm_cases is None else norm_cases)}
    norm_rng = np.random.default_rng(seed)
    norm_per_case = max(1, max_samples // max(1, len(norm_names)))
    spacings: List[List[float]] = []
    shapes: List[List[int]] = []
    samples: List[List[np.ndarray]] = [[] for _ in manifest.modalities]
    norm_samples: List[List[np.ndarray]] = [[] for _ in manifest.modalities]
    counts = np.zeros(len(values), np.int64)
    smallest: Dict[int, float] = {}
    present = {v: 0 for v in values}
    ignored = total = 0
    for case in cases:
        images, label = load_case(case)
        if label is None:
            raise ValueError(f"{case.name}: a fingerprint needs every case's label map.")
        canon, _, _ = canonical_geometry(images[0], orientation)  # geometry only, no pixel copy
        spacings.append([float(s) for s in canon.GetSpacing()])
        shapes.append([int(s) for s in canon.GetSize()])
        lab = sitk.GetArrayViewFromImage(label)
        case_counts = _label_counts(label)
        ignored += case_counts.get(manifest.ignore_label, 0) if manifest.ignore_label is not None else 0
        total += int(np.prod(label.GetSize()))
        voxel_mm3 = float(np.prod(canon.GetSpacing()))
        for i, v in enumerate(values):
            n = case_counts.get(v, 0)
            counts[i] += n
            if v and n:
                present[v] += 1
                smallest[v] = min(smallest.get(v, math.inf), n * voxel_mm3)
        mask = lab > 0  # annotated foreground only: an ignored voxel is not known to be foreground
        if manifest.ignore_label is not None:
            mask &= lab != manifest.ignore_label
        for c, img in enumerate(images):
            name = manifest.modalities[c]
            check_intensities(img, schemes[c], name, case.name)
            vals = sitk.GetArrayViewFromImage(img)[mask] + hu_offset(img, schemes[c], name, case.name)
            samples[c].append(rng.choice(vals, per_case, replace=False) if vals.size > per_case else vals)
            if case.name in norm_names:
                norm_samples[c].append(norm_rng.choice(vals, norm_per_case, replace=False) if vals.size > norm_per_case else vals)
    return {
        "cases": len(cases),
        "orientation": orientation.upper(),
        "normalization": normalization,
        "spacings_mm": spacings,
        "shapes": shapes,
        "channels": [dict(_channel_stats(name, schemes[c], samples[c]), norm=_norm_stats(schemes[c], norm_samples[c], len(norm_names)))
                     for c, name in enumerate(manifest.modalities)],
        "ignored_voxel_fraction": ignored / max(1, total),  # the share of voxels labelled "ignore" (not annotated)
        "classes": [
            {"value": v, "name": manifest.labels[v], "voxel_fraction": float(counts[i] / max(1, counts.sum())),
             "cases_present": present[v] if v else len(cases), "smallest_mm3": smallest.get(v)}
            for i, v in enumerate(values)
        ],
    }


def _channel_stats(name: str, scheme: str, samples: List[np.ndarray]) -> dict:
    vals = np.concatenate(samples).astype(np.float64) if samples else np.zeros(0)
    stats = {"name": name, "ct": is_ct_modality(name), "scheme": scheme, "foreground_voxels_sampled": int(vals.size)}
    if vals.size:
        p = np.percentile(vals, [0.5, 50, 99.5])
        stats.update(mean=float(vals.mean()), std=float(vals.std()), p00_5=float(p[0]), median=float(p[1]), p99_5=float(p[2]))
    return stats


def _norm_stats(scheme: str, samples: List[np.ndarray], cases: int) -> dict:
    """What the channel's normalisation uses, over the ``norm_cases``' foreground samples: for
    CT the clip window (:func:`~volseg.preprocessing.intensity.ct_window` of the 0.5 and 99.5
    percentiles) and the clipped values' mean and std (float32, as the voxels are)."""
    vals = np.concatenate(samples).astype(np.float32) if samples else np.zeros(0, np.float32)
    out: dict = {"scheme": scheme, "cases": cases, "foreground_voxels_sampled": int(vals.size)}
    if scheme == "ct" and vals.size:
        lo, hi = ct_window(*np.percentile(vals, [0.5, 99.5]))
        clipped = np.clip(vals, lo, hi)
        out.update(lo=lo, hi=hi, mean=float(clipped.mean()), std=float(max(clipped.std(), 1e-6)))
    return out

