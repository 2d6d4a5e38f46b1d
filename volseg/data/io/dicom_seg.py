"""DICOM Segmentation (SEG) objects written with highdicom: one binary segment per foreground
label, each frame tied to its source slice.

highdicom builds the object (the Segmentation IOD's modules, the references to every source
image, the patient and study attributes copied from the source, new Series and SOP Instance
UIDs); volseg gives it the source headers in slice order (:func:`.dicom_source.source_slices`
places each file by its position) and one label map frame per source slice, so frame ``k`` is
the source slice ``k`` and highdicom derives its Plane Position from that slice's header.
Segment labels are the run's label names; a name that pydicom's SNOMED CT dictionary knows
(``liver`` -> SCT 10200004) is coded as that anatomical structure, any other as generic tissue
(SCT 85756007), the name always in SegmentLabel.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from .base import PathLike
from .dicom_source import require_dicom_libraries, source_slices
from .write import atomic_write

log = logging.getLogger(__name__)

__all__ = ["write_dicom_seg", "segment_codes"]

MANUFACTURER = "volseg"


def segment_codes(name: str):
    """(category, type) codes of a segment named ``name``: SNOMED CT "Anatomical structure" and
    the structure when pydicom's SCT dictionary has the name (CamelCase of its words), else
    "Tissue" for both."""
    from pydicom.sr.codedict import codes

    key = "".join(w.capitalize() for w in re.split(r"[^A-Za-z0-9]+", name) if w)
    try:
        found = getattr(codes.SCT, key) if key else None
    except AttributeError:
        found = None
    if found is not None:
        return codes.SCT.AnatomicalStructure, found
    return codes.SCT.Tissue, codes.SCT.Tissue


def write_dicom_seg(labels: np.ndarray, image, folder: PathLike, path: PathLike, label_names: Mapping[int, str], software: str = "") -> Path:
    """Write ``labels`` (``[z, y, x]`` label values on ``image``, the grid read from the DICOM
    series ``folder``) as a binary DICOM-SEG at ``path`` (atomically). ``label_names``: value ->
    name; value 0 (background) is no segment; every other value is one segment, numbered 1, 2,
    ... in increasing value. Empty frames are omitted (highdicom's default)."""
    require_dicom_libraries("--format dicom-seg")
    import highdicom as hd

    slices = sorted(source_slices(Path(folder), image), key=lambda t: t[0])
    values = sorted(int(v) for v in label_names if int(v) != 0)
    segments = np.zeros(labels.shape, dtype=np.uint8 if len(values) < 256 else np.uint16)
    descriptions = []
    for number, value in enumerate(values, start=1):
        segments[labels == value] = number
        category, kind = segment_codes(label_names[value])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(label_names[value]), segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(name="volseg", version=software or "0", family=_family()),
        ))
    first = slices[0][1]
    seg = hd.seg.Segmentation(
        source_images=[ds for _, ds in slices],
        pixel_array=segments,  # frame k <- source slice k: the (frames, rows, cols) label map highdicom takes
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(first, "SeriesNumber", None) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="volseg",
        software_versions=software or "0",
        device_serial_number="0",
        series_description=f"volseg segmentation of {getattr(first, 'SeriesDescription', '') or 'series ' + str(first.SeriesInstanceUID)}"[:64],
    )
    with atomic_write(path) as tmp:
        seg.save_as(str(tmp))
    log.info("wrote DICOM-SEG %s (%d segment(s), %d source slice(s))", path, len(values), len(slices))
    return Path(path)


def _family():
    from pydicom.sr.codedict import codes

    return codes.cid7162.ArtificialIntelligence
