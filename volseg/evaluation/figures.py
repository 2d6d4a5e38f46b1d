"""The structure figures shown next to the overlap metrics: per case and class, the connected
components of the prediction and the reference and, when the case's scan is known, the mean
intensity under each (the scan's own units, HU for CT), computed by :mod:`volseg.stats` as
``volseg infer --statistics`` computes them."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Mapping

import numpy as np

from ..data.io import ImageReadError, read_image
from ..stats import label_statistics
from .metrics import FIGURES

log = logging.getLogger(__name__)

__all__ = ["FIGURES", "case_figures"]



def case_figures(pred: np.ndarray, truth: np.ndarray, image_path: str, labels: Mapping[int, str], name: str) -> Dict[int, dict]:
    """``{label value: {FIGURES...}}`` of one case (``[z, y, x]`` arrays); the means are NaN
    without a readable scan on the labels' grid (logged), or under an empty mask."""
    import SimpleITK as sitk

    image, values = None, None
    if image_path:
        try:
            image = read_image(Path(image_path))
            values = sitk.GetArrayViewFromImage(image)
        except ImageReadError as exc:
            log.warning("%s: no intensity figures (%s)", name, exc)
        if values is not None and values.shape != pred.shape:
            log.warning("%s: scan %s has shape %s, the labels %s; no intensity figures.", name, image_path, list(values.shape), list(pred.shape))
            image, values = None, None
    grid = image if image is not None else sitk.GetImageFromArray(pred.astype(np.uint8))  # components need no world grid
    out = {}
    for value in labels:
        if int(value) == 0:
            continue
        row = {}
        for side, arr in (("pred", pred), ("true", truth)):
            s = label_statistics(arr == value, values, grid)
            row[f"components_{side}"] = float(s["components"])
            row[f"mean_{side}"] = s["intensity"]["mean"] if s["intensity"] else math.nan
        out[int(value)] = row
    return out
