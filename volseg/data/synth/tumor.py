"""Synthetic brain-tumour phantoms with nested structures (BraTS-like) and nnU-Net region labels.

Each case is a single-channel MRI-like volume: an ellipsoidal "brain" (bright against the dark
outside, a smooth multiplicative bias, Rician-like noise) holding one lobulated tumour of three
nested parts, each with its own intensity:

=====  =========================  ===========================================================
value  label                      what
=====  =========================  ===========================================================
1      edema                      the outer shell, slightly brighter than the brain
2      necrotic / non-enhancing   the centre, darker than the brain
3      enhancing                  a bright rim round the centre
=====  =========================  ===========================================================

The manifest declares nnU-Net v2 region labels, as BraTS is evaluated: ``whole tumor`` [1, 2, 3],
``tumor core`` [2, 3], ``enhancing tumor`` [3], painted back in ``regions_class_order`` [1, 2, 3].
``sparse=K`` keeps every K-th axial (z) slice of the *training* labels annotated and sets the rest
to the ``ignore`` label (value 4): the sparse-annotation setting; test labels stay complete, so
evaluation measures the whole volume. Case ``i`` uses ``numpy.random.default_rng((seed, i))``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np

from ...version import __version__
from ..io import write_image, write_text
from .cases import _check_output, _check_shape

log = logging.getLogger(__name__)

__all__ = ["TUMOR_LABELS", "TUMOR_REGIONS", "IGNORE_VALUE", "make_tumor_case", "make_tumor_dataset"]

TUMOR_LABELS = {0: "background", 1: "edema", 2: "necrosis", 3: "enhancing"}
#: (name, label values) per region, in ``regions_class_order`` [1, 2, 3]
TUMOR_REGIONS: Tuple[Tuple[str, Tuple[int, ...]], ...] = (("whole tumor", (1, 2, 3)), ("tumor core", (2, 3)), ("enhancing tumor", (3,)))
IGNORE_VALUE = 4
_SPACING = (1.0, 1.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape), sigma)
    return n / max(float(n.std()), 1e-6)


def make_tumor_case(rng: np.random.Generator, shape: Sequence[int] = (40, 40, 32)):
    """``(image float32, label uint8)`` arrays indexed ``[z, y, x]``; every label present."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in reversed(tuple(shape))], indexing="ij")
    size = np.array([shape[2], shape[1], shape[0]], np.float32)  # z, y, x
    centre = size / 2 + rng.uniform(-0.05, 0.05, 3) * size
    brain = ((z - centre[0]) / (0.45 * size[0])) ** 2 + ((y - centre[1]) / (0.45 * size[1])) ** 2 + ((x - centre[2]) / (0.45 * size[2])) ** 2 < 1
    t_centre = centre + rng.uniform(-0.15, 0.15, 3) * size
    r = np.sqrt((z - t_centre[0]) ** 2 + (y - t_centre[1]) ** 2 + (x - t_centre[2]) ** 2)
    r = r * (1 + 0.18 * _smooth_noise(rng, r.shape, 3.0))  # lobulated surfaces
    scale = float(min(size)) * rng.uniform(0.8, 1.2)
    r_edema, r_rim, r_core = 0.32 * scale, 0.21 * scale, 0.14 * scale
    label = np.zeros(r.shape, np.uint8)
    label[(r < r_edema) & brain] = 1
    label[(r < r_rim) & brain] = 3
    label[(r < r_core) & brain] = 2
    means = {0: 0.0, 1: 1.25, 2: 0.55, 3: 1.8}  # relative to the brain (1.0)
    image = np.where(brain, 1.0, 0.05).astype(np.float32)
    for value, m in means.items():
        if value:
            image[label == value] = m * rng.uniform(0.93, 1.07)
    image *= np.exp(0.15 * _smooth_noise(rng, image.shape, 8.0)).astype(np.float32)  # bias field
    image += 0.12 * rng.standard_normal(image.shape).astype(np.float32)
    return (np.abs(image) * rng.uniform(200, 800)).astype(np.float32), label


def _sparsify(label: np.ndarray, every: int) -> np.ndarray:
    """Every ``every``-th z slice kept (starting at the tumour's middle slice, so the sparse
    annotation still shows the tumour), the others set to :data:`IGNORE_VALUE`."""
    zs = np.nonzero(label.any(axis=(1, 2)))[0]
    start = int(zs[len(zs) // 2]) % every if zs.size else 0
    out = np.full_like(label, IGNORE_VALUE)
    out[start::every] = label[start::every]
    return out


def make_tumor_dataset(out_dir: Union[str, Path], cases: int = 8, seed: int = 0, shape: Sequence[int] = (40, 40, 32), test_cases: int = 2,
                       sparse: int = 1, overwrite: bool = False) -> Path:
    """Write tumour phantoms as ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/`` and an
    nnU-Net v2 style ``dataset.json`` (region labels, ``regions_class_order``, and with
    ``sparse`` > 1 the ``ignore`` label); return its path. ``sparse=K``: training labels keep
    every K-th z slice (see the module's text)."""
    import SimpleITK as sitk

    shape3 = _check_shape(shape)
    out = _check_output(out_dir, overwrite, cases=cases, test_cases=test_cases, seed=seed, sparse=sparse)
    entries: dict = {"Tr": [], "Ts": []}
    for index in range(cases + test_cases):
        split = "Tr" if index < cases else "Ts"
        name = f"tumor_{index:03d}"
        image, label = make_tumor_case(np.random.default_rng((int(seed), index)), shape3)
        if split == "Tr" and sparse > 1:
            label = _sparsify(label, sparse)
        rel = {"image": f"./images{split}/{name}.nii.gz", "label": f"./labels{split}/{name}.nii.gz"}
        for arr, key in ((image, "image"), (label, "label")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(_SPACING)
            write_image(img, out / rel[key])
        entries[split].append(rel)
    labels: dict = {"background": 0, **{n: list(vs) if len(vs) > 1 else vs[0] for n, vs in TUMOR_REGIONS}}
    if sparse > 1:
        labels["ignore"] = IGNORE_VALUE
    manifest = {
        "name": "VolsegSynthTumor",
        "description": "Synthetic nested-structure tumour phantoms (edema, necrosis, enhancing rim) made by volseg.data.synth.make_tumor_dataset"
                       + (f"; training labels annotate every {sparse}th z slice, the rest is 'ignore'" if sparse > 1 else ""),
        "reference": "volseg.data.synth", "licence": "CC0-1.0", "release": __version__, "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": labels,
        "regions_class_order": [1, 2, 3],
        "numTraining": cases, "numTest": test_cases,
        "training": entries["Tr"], "test": entries["Ts"],
        "synth": {"task": "tumor", "seed": int(seed), "shape": list(shape3), "sparse": int(sparse)},
    }
    path = write_text(out / "dataset.json", json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %d training and %d test tumour phantoms to %s", cases, test_cases, out)
    return path
