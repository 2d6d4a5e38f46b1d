"""MONAI transform chains for training: class-balanced patch sampling and augmentation.

Input items are preprocessed cases ``{"image": (C,X,Y,Z) float32, "label": (1,X,Y,Z) uint8}``.
The deterministic head (:func:`cached_transforms`) precomputes per-class voxel indices so that
``RandCropByLabelClassesd`` does not rescan the volume for every patch; CacheDataset keeps its
output. :func:`random_transforms` samples patches and augments them. In 2D slice mode a patch is
a ``(H, W, 1)`` crop along ``plan.slice_axis`` squeezed to ``(C, H, W)`` before the 2D
augmentations.
"""

from __future__ import annotations

import logging
import math
import re
from typing import List, Optional, Sequence

import torch
from monai.transforms import MapTransform, RandomizableTransform

from ..config import AugmentConfig, Config, ConfigError
from .plan import IGNORE_INDEX, PreprocessingPlan

__all__ = ["cached_transforms", "random_transforms", "class_ratios", "sampling_classes", "RegionIndicesd", "crop_size", "elastic_2d_params", "mirror_axes", "RandLabelIntensityd"]

log = logging.getLogger(__name__)

#: ``augment.slab_prob``'s thinnest slab, as a share of the patch depth
SLAB_MIN = 1 / 6

#: a label name that says left or right as a word: "kidney_left", "Right lung", "lung_r", "L kidney"
#: (not "vertebrae_L1")
_LATERAL = re.compile(r"(?:^|[^a-z0-9])(?:left|right|lt|rt|l|r)(?:[^a-z0-9]|$)", re.IGNORECASE)


def mirror_axes(plan: PreprocessingPlan) -> List[int]:
    """Canonical axes (0..2, ``plan.orientation`` order) along which mirroring is safe, for
    training flips and mirroring TTA: every spatial axis, except the left-right one when a label
    name is lateral ("kidney_left", "lung_r"). A left-right flip turns a left kidney into a
    right one without changing its label, which teaches the network to confuse them (nnU-Net
    mirrors every axis; TotalSegmentator turns mirroring off for this reason). Up-down and
    front-back flips stay: they do not swap lateral labels."""
    axes = [a for a in range(3) if not (plan.spatial_dims == 2 and a == plan.slice_axis)]
    lateral = [n for n in plan.label_names if _LATERAL.search(n)]
    if lateral:
        lr = next(i for i, c in enumerate(plan.orientation.upper()) if c in "LR")
        if lr in axes:
            axes.remove(lr)
    return axes


def sampling_classes(plan: PreprocessingPlan) -> List[str]:
    """What the class-balanced crop centres on: background then each class, or in region mode
    background then each region (a nested region is drawn as often as the one around it)."""
    return ["background", *plan.region_names] if plan.has_regions else list(plan.label_names)


def class_ratios(plan: PreprocessingPlan, ratios: Optional[Sequence[float]]) -> list:
    """Sampling ratio per class index (region mode: background, then per region); default: 1 each."""
    names = sampling_classes(plan)
    if ratios is None:
        return [1.0] * len(names)
    if len(ratios) != len(names):
        raise ConfigError(
            f"data.class_ratios={list(ratios)} has {len(ratios)} entries; the manifest has {len(names)} "
            f"{'sampling classes' if plan.has_regions else 'classes'} {names} (background first)."
        )
    return [float(r) for r in ratios]


def crop_size(plan: PreprocessingPlan) -> list:
    """3D crop size: the patch, or in slice mode the 2D patch with 1 inserted at the slice axis."""
    size = list(plan.patch_size)
    if plan.spatial_dims == 2:
        size.insert(plan.slice_axis, 1)
    return size


def cached_transforms(plan: PreprocessingPlan):
    from monai.transforms import ClassesToIndicesd, Compose, EnsureTyped, SpatialPadd

    return Compose(
        [
            EnsureTyped(keys=["image", "label"], track_meta=False),
            # a case smaller than the patch: edge voxels repeated, as inference pads
            # (inference.predictor.rolling_windows); zeros would be a tissue after normalisation
            SpatialPadd(keys=["image", "label"], spatial_size=crop_size(plan), mode="replicate"),
            RegionIndicesd(plan.region_indices()) if plan.has_regions
            else ClassesToIndicesd(keys="label", num_classes=plan.num_classes, indices_postfix="_cls_indices"),
        ]
    )


class RegionIndicesd(MapTransform):
    """``label_cls_indices``: the voxel indices of background and of each region (class-index
    regions), for ``RandCropByLabelClassesd``. MONAI's ``ClassesToIndicesd`` finds one class
    per label value; a region is a union of them. Ignored voxels (:data:`IGNORE_INDEX`) are in
    no list, so no crop centres on them."""

    def __init__(self, regions: Sequence[Sequence[int]]):
        super().__init__(keys=["label"])
        self.regions = [list(r) for r in regions]

    def __call__(self, data):
        from monai.transforms.utils import map_classes_to_indices

        from .regions import labels_to_regions

        d = dict(data)
        label = torch.as_tensor(d["label"])[0]
        onehot = torch.cat([(label == 0)[None], labels_to_regions(label, self.regions)])
        d["label_cls_indices"] = map_classes_to_indices(onehot)
        return d


def random_transforms(plan: PreprocessingPlan, cfg: Config, num_samples: int):
    import monai.transforms as T

    a: AugmentConfig = cfg.augment
    keys = ["image", "label"]
    dims = plan.spatial_dims
    chain = [
        T.RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=crop_size(plan),
            ratios=class_ratios(plan, cfg.data.class_ratios),
            num_classes=len(sampling_classes(plan)),
            num_samples=num_samples,
            indices_key="label_cls_indices",
            warn=False,
        ),
        T.DeleteItemsd(keys="label_cls_indices"),
    ]
    if dims == 2:
        chain.append(T.SqueezeDimd(keys=keys, dim=plan.slice_axis + 1, update_meta=False))
    chain += _geometric(a, dims)
    if a.flip_prob > 0:
        # patch axes: the canonical ones (in 2D without the slice axis), in order
        patch_axes = [ax for ax in range(3) if not (dims == 2 and ax == plan.slice_axis)]
        mirrored = mirror_axes(plan)
        if len(mirrored) < len(patch_axes):
            log.info("lateral labels among %s: no mirroring along the left-right axis of %s", list(plan.label_names[1:]), plan.orientation)
        chain.extend(T.RandFlipd(keys=keys, prob=a.flip_prob, spatial_axis=patch_axes.index(ax)) for ax in mirrored)
    chain += [
        T.RandScaleIntensityd(keys="image", factors=0.25, prob=a.intensity_scale_prob),
        T.RandShiftIntensityd(keys="image", offsets=0.25, prob=a.intensity_shift_prob),
        T.RandAdjustContrastd(keys="image", prob=a.contrast_prob, gamma=(0.7, 1.5), retain_stats=True),
        RandLabelIntensityd(a.label_intensity_prob, a.label_intensity_range),
        T.RandGaussianNoised(keys="image", prob=a.noise_prob, std=a.noise_std),
        T.RandGaussianSmoothd(keys="image", prob=a.blur_prob, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        T.RandBiasFieldd(keys="image", prob=a.bias_field_prob, coeff_range=(0.0, 0.2)),
        T.RandSimulateLowResolutiond(keys="image", prob=a.lowres_prob, zoom_range=(0.5, 1.0), upsample_mode="trilinear" if dims == 3 else "bilinear"),
    ]
    if dims == 3 and a.slab_prob > 0:
        # last, so the repeated slices are identical, as inference's padding makes them; the
        # slab is the patch's centre (the voxel the class-balanced crop drew stays in it), and
        # the symmetric pad puts it mid-window, where inference puts a thin scan
        full = list(plan.patch_size)
        thin = [max(1, math.ceil(n * SLAB_MIN)) if i == plan.slice_axis else n for i, n in enumerate(full)]
        slab = T.Compose([T.RandSpatialCropd(keys=keys, roi_size=thin, max_roi_size=full, random_size=True, random_center=False),
                          T.SpatialPadd(keys=keys, spatial_size=full, mode="replicate")])  # fmt: skip
        chain.append(T.OneOf([slab, T.Identityd(keys=keys)], weights=[a.slab_prob, 1 - a.slab_prob]))
    chain += [
        T.EnsureTyped(keys=keys, track_meta=False),
    ]
    return T.Compose(chain)


class RandLabelIntensityd(RandomizableTransform, MapTransform):
    """Adds to each foreground structure of a patch its own offset, uniform in ``+-offsets``
    (normalised units), on every image channel; background unchanged. Expects ``label`` as class
    indices ``(1, ...)``, as the patches here are.

    Our own because MONAI's intensity transforms are global (one mapping for every voxel), while
    what differs between sources is often per structure: a contrast phase makes vessels, kidneys
    and spleen brighter than in the training scans and leaves fat and muscle alone, so a network
    that learned "spleen = 45 HU" misses an enhanced one. The label-driven intensity
    randomisation of SynthSeg (Billot et al. 2023) in a mild form: the network has to lean on
    shape and context as well as on intensity."""

    def __init__(self, prob: float, offsets: float):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, ["image", "label"])
        self.offsets = offsets

    def __call__(self, data):
        self.randomize(None)
        if not self._do_transform or self.offsets == 0:
            return data
        d = dict(data)
        image, label = torch.as_tensor(d["image"]), torch.as_tensor(d["label"])[0].long()
        classes = [int(c) for c in torch.unique(label) if c not in (0, IGNORE_INDEX)]  # an ignored slab is no structure
        table = torch.zeros(int(label.max()) + 1, dtype=image.dtype)
        table[classes] = torch.as_tensor(self.R.uniform(-self.offsets, self.offsets, size=len(classes)), dtype=image.dtype)
        d["image"] = image + table[label]
        return d


def _geometric(a: AugmentConfig, dims: int) -> list:
    """Rotation, scaling and elastic deformation, each firing with its own probability.

    Rotation and scaling are two ``RandAffined`` so that each fires with exactly its own
    probability (one merged affine fired with 1 - (1 - p_rot)(1 - p_scale)); both fire on
    p_rot x p_scale of the patches (9% by default), which then resample twice.
    In 2D, MONAI's ``Rand2DElasticd`` moves a B-spline control grid instead of smoothing voxel
    noise as ``Rand3DElasticd`` does; :func:`elastic_2d_params` maps ``augment.elastic_sigma``
    and ``augment.elastic_magnitude`` onto it so both give about the same displacements."""
    import monai.transforms as T

    keys, modes = ["image", "label"], ("bilinear", "nearest")
    chain = []
    if a.rotate_prob > 0 and a.rotate_range_deg > 0:
        rot = math.radians(a.rotate_range_deg)
        chain.append(T.RandAffined(keys=keys, prob=a.rotate_prob, rotate_range=[rot] * (3 if dims == 3 else 1), mode=modes, padding_mode="border"))
    if a.scale_prob > 0 and a.scale_range > 0:
        chain.append(T.RandAffined(keys=keys, prob=a.scale_prob, scale_range=[a.scale_range] * dims, mode=modes, padding_mode="border"))
    if a.elastic_prob > 0:
        if dims == 3:
            chain.append(T.Rand3DElasticd(keys=keys, prob=a.elastic_prob, sigma_range=a.elastic_sigma, magnitude_range=a.elastic_magnitude,
                                          mode=modes, padding_mode="border"))
        else:
            spacing, magnitude = elastic_2d_params(a)
            chain.append(T.Rand2DElasticd(keys=keys, prob=a.elastic_prob, spacing=spacing, magnitude_range=magnitude,
                                          mode=modes, padding_mode="border"))
    return chain


def elastic_2d_params(a: AugmentConfig):
    """``(spacing, magnitude_range)`` of ``Rand2DElasticd`` equivalent to the 3D settings.

    ``Rand3DElasticd`` smooths uniform(-1, 1) noise (variance 1/3) with a Gaussian of sigma s
    voxels and multiplies by m, so a displacement has standard deviation
    ``m * sqrt(1/3) / (2 sqrt(pi) s) ** 1.5`` voxels (a normalised 3D Gaussian's squared sum).
    ``Rand2DElasticd`` draws N(0, 1) x m offsets on a control grid: the grid spacing is the
    Gaussian's width (4 s, mean sigma) and the magnitude range spans the 3D displacements
    (weakest: small m, large s; strongest: large m, small s)."""

    def std(m: float, s: float) -> float:
        return m * math.sqrt(1 / 3) / (2 * math.sqrt(math.pi) * s) ** 1.5

    s0, s1 = a.elastic_sigma
    m0, m1 = a.elastic_magnitude
    spacing = max(2.0, 4 * (s0 + s1) / 2)
    return (spacing, spacing), (std(m0, s1), std(m1, s0))
