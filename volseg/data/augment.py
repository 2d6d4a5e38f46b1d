"""volseg's own MONAI transform (imported by :func:`volseg.data.transforms.random_transforms`)."""

from __future__ import annotations

import torch
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["RandLabelShiftd"]


class RandLabelShiftd(RandomizableTransform, MapTransform):
    """With probability ``prob``, adds one offset drawn from U(-offset, offset) (normalised units)
    per foreground class and image channel to that class's voxels of the patch.

    A structure's own intensity is what changes most between sources: the aorta is ~40 HU
    without contrast, ~150 HU portal-venous, ~350 HU arterial; an MRI sequence or coil changes
    one tissue's contrast against its neighbours. Global scale/shift/gamma keep the contrast
    between a structure and its neighbours, so a few training scans of one phase teach the
    network that contrast; moving each labelled structure against its surroundings makes it
    rely on shape and context as well (SynthSeg's per-label intensity randomisation, applied to
    real images). MONAI has no label-conditioned intensity transform. The patch is not changed
    in place (a crop can be a view of the cached case)."""

    def __init__(self, prob: float, offset: float, num_classes: int, image_key: str = "image", label_key: str = "label"):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys=[image_key])
        self.offset, self.num_classes, self.label_key = float(offset), int(num_classes), label_key

    def __call__(self, data):
        self.randomize(None)
        if not self._do_transform:
            return data
        d = dict(data)
        for key in self.keys:
            img = d[key]
            lut = self.R.uniform(-self.offset, self.offset, size=(img.shape[0], self.num_classes)).astype("float32")
            lut[:, 0] = 0.0  # background keeps its intensity
            idx = torch.as_tensor(d[self.label_key][0], device=img.device).long().clamp(0, self.num_classes - 1)
            d[key] = img + torch.as_tensor(lut, device=img.device)[:, idx].to(img.dtype)
        return d
