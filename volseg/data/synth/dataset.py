"""The dataset writer (:func:`make_dataset`): synthetic cases as a Decathlon-style folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ...version import __version__
from ..io import write_image, write_text
from .cases import LABELS, MODALITIES, _check_modality, _check_output, _check_shape, _check_spacing, make_case
from .geometry import ORIENTATIONS

log = logging.getLogger(__name__)

_GENERATOR_VERSION = 1


def make_dataset(
    out_dir: Union[str, Path],
    cases: int = 8,
    modality: str = "ct",
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 48),
    spacing: Optional[Sequence[float]] = None,
    test_cases: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write a Decathlon-style synthetic dataset and return its ``dataset.json`` path.

    Layout under ``out_dir``: ``imagesTr/``, ``labelsTr/`` (``cases`` cases), ``imagesTs/``,
    ``labelsTs/`` (``test_cases`` held-out cases, labels included for evaluation), each
    ``<name>.nii.gz`` with ``name = synth<modality>_<index:03d>`` (test indices follow the
    training ones), and ``dataset.json`` (``name``, ``description``, ``modality``, ``labels``,
    ``numTraining``, ``numTest``, ``training`` and ``test`` as lists of ``{"image", "label"}``
    with paths relative to ``out_dir``). Case ``i`` is ``make_case((seed, i), ...)`` with the
    orientation ``ORIENTATIONS[i % 3]`` and, when ``spacing`` is None, anisotropic spacing
    for odd ``i``, so any three consecutive cases cover every orientation and both spacings.
    Files are written atomically. A folder that already holds a ``dataset.json`` (this
    generator's or anyone's) is refused unless ``overwrite``; then files of the same names are
    replaced.
    """
    modality = _check_modality(modality)
    shape3 = _check_shape(shape)
    spacing3 = _check_spacing(spacing)
    out = _check_output(out_dir, overwrite, cases=cases, test_cases=test_cases, seed=seed)
    t0 = time.perf_counter()
    entries: Dict[str, List[Dict[str, str]]] = {"Tr": [], "Ts": []}
    for index in range(cases + test_cases):
        split = "Tr" if index < cases else "Ts"
        name = f"synth{modality}_{index:03d}"
        image, label = make_case(
            np.random.default_rng((int(seed), index)),
            modality,
            shape3,
            spacing3,
            orientation=ORIENTATIONS[index % len(ORIENTATIONS)],
            anisotropic=index % 2 == 1,
        )
        rel = {"image": f"./images{split}/{name}.nii.gz", "label": f"./labels{split}/{name}.nii.gz"}
        for img, key in ((image, "image"), (label, "label")):
            write_image(img, out / rel[key])
        entries[split].append(rel)
        log.debug("wrote %s: size %s, spacing %s", name, image.GetSize(), image.GetSpacing())
    manifest = _manifest(modality, cases, test_cases, int(seed), shape3, spacing3, entries)
    path = write_text(out / "dataset.json", json.dumps(manifest, indent=2) + "\n")
    log.info(
        "wrote %d training and %d test synthetic %s cases to %s in %.1f s",
        cases, test_cases, MODALITIES[modality], out, time.perf_counter() - t0,
    )
    return path


def _manifest(modality: str, cases: int, test_cases: int, seed: int, shape3: Sequence[int], spacing3: Optional[Sequence[float]],
              entries: Dict[str, List[Dict[str, str]]]) -> dict:
    """The ``dataset.json`` record of a synthetic dataset: Decathlon's keys and a ``synth``
    entry with the generator version and the arguments that made it."""
    return {
        "name": f"VolsegSynth{MODALITIES[modality]}",
        "description": (
            f"Synthetic abdominal {MODALITIES[modality]} phantoms (liver, kidneys, liver lesion; "
            "spine and ribs present but unlabelled) made by volseg.data.synth.make_dataset"
        ),
        "reference": "volseg.data.synth",
        "licence": "CC0-1.0",
        "release": __version__,
        "tensorImageSize": "3D",
        "modality": {"0": MODALITIES[modality]},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": cases,
        "numTest": test_cases,
        "training": entries["Tr"],
        "test": entries["Ts"],
        "synth": {
            "generator_version": _GENERATOR_VERSION,
            "seed": seed,
            "shape": list(shape3),
            "spacing": list(spacing3) if spacing3 is not None else None,
        },
    }
