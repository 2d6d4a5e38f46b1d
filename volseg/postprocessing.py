"""Postprocessing of label maps: the largest connected component, and nnU-Net's rule for when to
keep only it, learned from a run's (or a cross-validation's) validation predictions.

For each foreground label, keeping only its largest connected component is switched on if and
only if it raises that label's mean Dice over the validation cases, and never for a label whose
reference masks are in pieces (left and right kidney as one label). The decision and both Dice
values go to ``FOLDER/postprocessing.json`` (:mod:`volseg.runfolder.layout`), which
``volseg infer --model FOLDER`` applies (an explicit ``infer.largest_component`` wins).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np

from .metrics import dice_per_class, load_label_pair
from .runfolder import read_plan, runs_of, validation_pairs, write_postprocessing

log = logging.getLogger(__name__)

__all__ = ["largest_component", "learn_postprocessing", "REFERENCE_ONE_PIECE"]

#: a label counts as one piece when its largest connected component holds this share of its
#: reference mask in every validation case
REFERENCE_ONE_PIECE = 0.95


def largest_component(index: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Keep only the largest connected component (26-connectivity in 3D) of each class index in
    ``classes``; removed voxels become background. (MONAI's KeepLargestConnectedComponent needs
    scikit-image on the CPU; scipy, already a dependency, does the labelling.)"""
    from scipy import ndimage

    out = index.copy()
    structure = np.ones((3,) * index.ndim, bool)
    for k in classes:
        comp, n = ndimage.label(index == k, structure=structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[(comp > 0) & (comp != sizes.argmax())] = 0
    return out


def learn_postprocessing(folder: Union[str, Path]) -> List[int]:
    """nnU-Net's rule on the validation predictions of a run or parent: the label values whose
    mean Dice rises (strictly) when only their largest connected component is kept, except
    labels whose reference masks are in pieces (:data:`REFERENCE_ONE_PIECE`). Written to
    ``FOLDER/postprocessing.json`` with the Dice before and after for every label."""
    folder = Path(folder)
    plan = read_plan(folder if (folder / "plan.json").is_file() else runs_of(folder)[0])
    labels = dict(zip(plan.label_values, plan.label_names))
    if plan.has_regions:  # a label value there is a difference of nested regions, whose pieces are not one structure
        write_postprocessing(folder, {"largest_component": [], "rule": "none: region models are not postprocessed (a label value is "
                                      "the difference of nested regions, e.g. edema = whole tumour minus core, not one component)"})
        log.info("postprocessing: none for a region model")
        return []
    values = sorted(labels)
    before: Dict[int, List[float]] = {v: [] for v in values[1:]}
    after: Dict[int, List[float]] = {v: [] for v in values[1:]}
    truth_kept: Dict[int, List[float]] = {v: [] for v in values[1:]}  # share of the reference in its largest component
    pairs = validation_pairs(folder)
    for name, pred_path, truth_path, _ in pairs:
        pred, truth, _ = load_label_pair(pred_path, truth_path, name)
        if plan.ignore_label is not None:  # unannotated voxels score nothing
            pred = np.where(truth == plan.ignore_label, 0, pred)
        for v in before:
            p, t = (pred == v).astype(np.uint8), (truth == v).astype(np.uint8)
            before[v].append(dice_per_class(p, t, 2)[0])
            after[v].append(dice_per_class(largest_component(p, [1]), t, 2)[0])
            if t.any():
                truth_kept[v].append(float(largest_component(t, [1]).sum() / t.sum()))
    # nnU-Net's rule, guarded: never for a label whose reference is itself in pieces (left and
    # right kidney as one label, lesions, vertebrae): there a briefly trained model that misses
    # one piece on validation "gains" from the step, which then deletes a found piece at test time
    whole = {v: min(truth_kept[v], default=1.0) >= REFERENCE_ONE_PIECE for v in before}
    keep = [v for v in before if np.mean(after[v]) > np.mean(before[v]) and whole[v]]
    write_postprocessing(folder, {
        "largest_component": keep,
        "rule": ("keep only the largest connected component of a label iff that raises its mean Dice over the validation cases "
                 f"and the label's largest component holds at least {REFERENCE_ONE_PIECE:.0%} of its reference in every validation case"),
        "cases": len(pairs),
        "labels": {labels[v]: {"label": v, "dice": float(np.mean(before[v])), "dice_largest_component": float(np.mean(after[v])),
                               "reference_in_largest_component": min(truth_kept[v], default=None), "applied": v in keep} for v in before},
    })
    log.info("postprocessing learned from %d validation cases: largest component of labels %s (%s)", len(pairs), keep or "none",
             ", ".join(f"{labels[v]} {np.mean(before[v]):.3f}->{np.mean(after[v]):.3f}" for v in before))
    return keep
