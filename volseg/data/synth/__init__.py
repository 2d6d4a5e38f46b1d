"""Synthetic abdominal CT and MRI phantoms: the built-in demo data and the test data.

Each case is a deformed elliptic-cylinder "abdomen" (air outside) with subcutaneous fat, a
muscle wall, a peritoneal cavity of bowel, fat and gas, the aorta and vena cava, a spine and
ribs (bone, *not* labelled: a distractor), and three labelled organs:

======  ==========  =========================================================================
label   name        what
======  ==========  =========================================================================
0       background  everything else (air, fat, muscle, bowel, vessels, bone)
1       liver       large: a right lobe and a left lobe, randomly warped
2       kidney      medium: left and right, bean-shaped, cortex brighter than medulla, each in
                    a fat capsule; the right one presses into the liver (the labels touch)
3       lesion      small (a few hundred voxels at the default size): one lobulated tumour in
                    the liver, brighter than the liver on CT, darker on MRI
======  ==========  =========================================================================

The anatomy is defined in physical space (mm, SimpleITK's LPS world: +x = patient left,
+y = posterior, +z = superior) and each case's voxel grid is placed in that space with its own
spacing, direction and origin, so an anisotropic or rotated case shows the same anatomy on a
different grid. The classes overlap in intensity (on CT the kidney, ~30 HU on average with a
40 HU cortex round a 12 HU medulla, sits inside the muscle and bowel range; liver and lesion
histograms overlap too), so a segmenter must use shape and context, not a threshold.

CT images are int16 Hounsfield units: per-case tissue means, smooth texture, partial-volume
blur (the PSF, one voxel wide), then white noise of 15-22 HU. MRI images are float32 on an
arbitrary per-case scale (100-3000), T1-like contrast (fat bright, bone dark), a smooth
multiplicative bias field (its log has a linear trend of 0.25-0.4 per half field of view, so
intensity changes by a factor 1.6-2.2 across the image) and Rician noise.

Arrays follow SimpleITK: an image's array is indexed ``[z, y, x]``. Generation is
deterministic: case ``i`` of :func:`make_dataset` with seed ``s`` uses
``numpy.random.default_rng((s, i))``.

The modules: :mod:`~volseg.data.synth.geometry` (each case's grid in world space),
:mod:`~volseg.data.synth.anatomy` (organ shapes, tissue and label maps),
:mod:`~volseg.data.synth.render` (CT and MRI intensities), :mod:`~volseg.data.synth.cases`
(:func:`make_case`) and :mod:`~volseg.data.synth.dataset` (:func:`make_dataset`);
:mod:`~volseg.data.synth.tumor` (:func:`make_tumor_dataset`) writes nested tumour phantoms with
nnU-Net region labels and, optionally, sparse annotation (``volseg synth --task tumor``).
"""

from __future__ import annotations

from .cases import LABELS, MODALITIES, MODALITY_ALIASES, make_case
from .dataset import make_dataset
from .geometry import NOMINAL_SPACING_MM, ORIENTATIONS
from .tumor import make_tumor_dataset

__all__ = [
    "LABELS",
    "MODALITIES",
    "MODALITY_ALIASES",
    "ORIENTATIONS",
    "NOMINAL_SPACING_MM",
    "make_case",
    "make_dataset",
    "make_tumor_dataset",
]
