"""Advice on scans the trained network may handle worse than its training data."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from ..config import Config
from ..data.plan import PreprocessingPlan
from .windows import window_size

log = logging.getLogger(__name__)

__all__ = ["warn_if_thin"]

#: where the evidence behind the advice is written up
THIN_SCANS_DOC = "docs/decisions.md, Thin scans"


def warn_if_thin(shape: Sequence[int], plan: PreprocessingPlan, trained: Optional[Config], source: str) -> None:
    """Warn when the preprocessed scan ``shape`` (voxels, canonical x, y, z) is less than half
    the training window along an axis (a 20-slice series, a limited field of view) and the
    network normalises each window by its own statistics (instance or group norm): the window is
    padded with repeated edge voxels, and those statistics are then a thin slab's, not a
    training patch's. A batch-norm (or norm-free) network, whose statistics are fixed at
    training, is only logged. The measurements behind the advice: :data:`THIN_SCANS_DOC`."""
    roi = window_size(plan)
    thin = [a for a in range(3) if roi[a] > 1 and shape[a] < roi[a] / 2]
    if not thin:
        return
    sp = plan.spacing
    what = ", ".join(f"{shape[a]} voxels ({shape[a] * sp[a]:.0f} mm) along {'xyz'[a]} ({plan.orientation[a]}) against a training window of {roi[a]} "
                     f"voxels ({roi[a] * sp[a]:.0f} mm)" for a in thin)
    norm = trained.model.norm if trained else None
    slab_prob = trained.augment.slab_prob if trained else None
    if norm in ("batch", "none"):
        log.info("%s is thin: %s; padded with repeated edge voxels (model.norm=%s: no per-window statistics for the padding to change).",
                 source or "scan", what, norm)
        return
    advice = ["retrain with --set model.norm=batch (statistics fixed at training; only for thin scans like the training sources', "
              "not for another contrast phase or scanner)"]
    if plan.slice_axis not in thin:  # the slab augmentation thins data.slice_axis only
        advice.append(f"training patches thin along {'xyz'[thin[0]]} are not simulated by any augmentation")
    elif slab_prob:
        advice.append(f"this run trained with augment.slab_prob={slab_prob:g}")
    else:
        advice.append("or with --set augment.slab_prob=0.3")
    log.warning("%s is thin: %s. The rest of the window is repeated edge voxels, and this network normalises each window by its own "
                "statistics (model.norm=%s), so expect lower accuracy than on whole scans; %s (see %s).", source or "scan", what,
                norm or "unknown", "; ".join(advice), THIN_SCANS_DOC)
