"""The training loss: Dice + cross-entropy (MONAI), masked for ignored voxels, per region in region mode.

* Label mode without an ignore label: MONAI's ``DiceCELoss`` exactly as before (softmax over the
  classes, or one sigmoid for a single foreground label).
* An ignore label (sparse annotation) or region mode: :class:`MaskedDiceCE`. Voxels whose class
  index is :data:`~volseg.data.plan.IGNORE_INDEX` are replaced by a constant before anything is
  computed and masked out of both terms (MONAI's ``MaskedDiceLoss``; torch's cross-entropy with
  ``ignore_index``, or a masked BCE), so what an ignored voxel was labelled cannot change the
  loss or any gradient by a single bit (tested), and its logits get zero gradient.
* Region mode (nnU-Net's region training): one sigmoid per region, BCE + Dice per region, the
  targets ``labels_to_regions`` of the class-index label map.

``loss(logits (B, K, *spatial), label (B, 1, *spatial) class indices as float)`` -> scalar; deep
supervision wraps it (MONAI's ``DeepSupervisionLoss`` downsamples the label with nearest
interpolation, which keeps the ignore index).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.plan import IGNORE_INDEX, PreprocessingPlan
from ..data.regions import labels_to_regions

__all__ = ["build_loss", "MaskedDiceCE"]


def build_loss(plan: PreprocessingPlan, lambda_dice: float, lambda_ce: float, weight: Optional[torch.Tensor] = None):
    """The loss for ``plan`` (see the module's text); ``weight``: per output channel."""
    if plan.ignore_label is None and not plan.has_regions:
        from monai.losses import DiceCELoss

        return DiceCELoss(include_background=plan.binary, to_onehot_y=not plan.binary, softmax=not plan.binary, sigmoid=plan.binary,
                          weight=weight, lambda_dice=lambda_dice, lambda_ce=lambda_ce, batch=True)
    return MaskedDiceCE(plan.region_indices() if plan.has_regions else None, plan.binary, lambda_dice, lambda_ce, weight)


class MaskedDiceCE(torch.nn.Module):
    """Dice + CE over the annotated voxels only. ``regions``: class-index regions (region mode:
    sigmoid + BCE per region), else softmax + CE over the classes (``binary``: one sigmoid)."""

    def __init__(self, regions: Optional[Sequence[Sequence[int]]], binary: bool, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 weight: Optional[torch.Tensor] = None):
        from monai.losses import MaskedDiceLoss

        super().__init__()
        self.regions = [list(r) for r in regions] if regions else None
        self.sigmoid = bool(self.regions) or binary
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.weight = weight
        self.dice = MaskedDiceLoss(include_background=self.sigmoid, to_onehot_y=not self.sigmoid, softmax=not self.sigmoid,
                                   sigmoid=self.sigmoid, batch=True)

    def forward(self, logits: torch.Tensor, label: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``valid`` (B, 1, *spatial) bool: the annotated voxels (default: ``label != IGNORE_INDEX``)."""
        valid = label != IGNORE_INDEX if valid is None else valid.bool()
        index = torch.where(valid, label, torch.zeros_like(label)).long()  # ignored voxels: a constant from here on
        mask = valid.to(logits.dtype)
        if self.regions is not None:
            target = labels_to_regions(index[:, 0], self.regions).movedim(0, 1).to(logits.dtype)  # (B, R, *spatial)
        elif self.sigmoid:
            target = index.to(logits.dtype)
        else:
            target = index
        dice = self.dice(logits, target.to(logits.dtype), mask)
        if self.sigmoid:
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * mask
            if self.weight is not None:
                bce = bce * self.weight.view(1, -1, *([1] * (logits.ndim - 2)))
            ce = bce.sum() / (mask.sum() * logits.shape[1]).clamp_min(1)
        else:
            # torch's own ignore_index: the mean over the annotated voxels (weighted as torch weights it)
            ce = F.cross_entropy(logits, torch.where(valid[:, 0], index[:, 0], torch.full_like(index[:, 0], -100)), weight=self.weight,
                                 ignore_index=-100)
            if not bool(valid.any()):  # no annotated voxel in the batch: torch gives NaN (0/0), the loss is 0
                ce = logits.sum() * 0.0
        return self.lambda_dice * dice + self.lambda_ce * ce
