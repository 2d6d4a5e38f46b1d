"""Overlap shared by training's validation, postprocessing and evaluation: Dice per class, and
a prediction and its reference read onto one grid."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np

from .data.io import ImageReadError, read_label, same_geometry

__all__ = ["EvaluationError", "dice_per_class", "dice_per_output", "load_label_pair"]


class EvaluationError(ValueError):
    """Predictions and references cannot be compared; the message names the files or cases."""


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> List[float]:
    """Dice of each foreground class index (1..K-1) of two index maps of one shape; both empty
    counts as 1."""
    import torch
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    p = one_hot(torch.as_tensor(pred[None, None]).long(), num_classes)
    t = one_hot(torch.as_tensor(truth[None, None]).long(), num_classes)
    return compute_dice(p, t, include_background=False, ignore_empty=False)[0].tolist()


def dice_per_output(pred: np.ndarray, truth: np.ndarray, plan) -> Tuple[List[str], List[float]]:
    """(names, Dice) of what the plan's network outputs, from two class-index maps of one shape:
    each foreground class, or in region mode each region. Voxels the truth marks as ignored
    (``IGNORE_INDEX``) count for neither map."""
    import torch
    from monai.metrics import compute_dice

    from .data.plan import IGNORE_INDEX
    from .data.regions import labels_to_regions

    valid = truth != IGNORE_INDEX
    if plan.has_regions:
        regions = plan.region_indices()
        p = labels_to_regions(pred, regions) & valid
        t = labels_to_regions(truth, regions) & valid
        dice = compute_dice(torch.as_tensor(p[None]).float(), torch.as_tensor(t[None]).float(), include_background=True, ignore_empty=False)
        return list(plan.region_names), dice[0].tolist()
    zero = np.zeros((), pred.dtype)
    return list(plan.label_names[1:]), dice_per_class(np.where(valid, pred, zero), np.where(valid, truth, zero), plan.num_classes)


def load_label_pair(pred_path: Path, truth_path: Path, name: str) -> Tuple[np.ndarray, np.ndarray, Tuple[float, ...]]:
    """(prediction, reference, spacing) as ``[z, y, x]`` arrays and mm in that order; an
    :class:`EvaluationError` naming the case when either cannot be read or the grids differ."""
    import SimpleITK as sitk

    try:  # truncated, NaN or non-integer label maps are refused by read_label
        p_img, t_img = read_label(pred_path), read_label(truth_path)
    except ImageReadError as exc:
        raise EvaluationError(f"case {name!r}: {exc}") from None
    diff = same_geometry(p_img, t_img)
    if diff:
        raise EvaluationError(
            f"prediction {pred_path} and reference {truth_path} are on different voxel grids ({diff}); "
            "resample the prediction onto the reference grid first."
        )
    # sitk spacing is (x, y, z); the arrays are [z, y, x].
    return sitk.GetArrayFromImage(p_img), sitk.GetArrayFromImage(t_img), tuple(reversed(t_img.GetSpacing()))
