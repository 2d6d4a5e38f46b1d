"""RT Structure Sets (RTSTRUCT): one ROI per foreground label, closed planar contours on the
source slices.

Why pydicom and contourpy, not rt-utils or highdicom: highdicom (0.28) writes no RT Structure
Set. rt-utils (1.2.7) does, but its pixel-to-patient matrix scales the column index by
PixelSpacing[0] (the *row* spacing), so on a series with non-square pixels every contour lands
stretched; it reads every file under the folder as one series (a second series in the folder is
mixed in), invents a Frame of Reference UID when the source has none, and prints to stdout.
The RTSTRUCT IOD's modules are few (patient, study, RT series, frame of reference, structure set, ROI
contour, RT ROI observations, SOP common), so they are written here with pydicom, with the source attributes
copied from the series' headers (:func:`.dicom_source.source_slices`, which places each file on
its slice by position).

Contours: the 0.5 iso-line of each slice's binary mask (marching squares, contourpy, which
matplotlib already depends on), i.e. the boundary half-way between voxel centres inside and
outside. Filling the contours back with the even-odd rule (a hole is a contour inside a contour,
as planning systems read them) at the voxel centres gives back exactly the voxels of the mask.
Each point is mapped to patient coordinates (LPS, mm) with the image's geometry:
``origin + direction @ (spacing * (column, row, slice))``.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import List, Mapping

import numpy as np

from .base import PathLike
from .dicom_source import source_slices
from .write import atomic_write

log = logging.getLogger(__name__)

__all__ = ["write_rtstruct", "slice_contours", "RTSTRUCT_SOP_CLASS"]

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"  # what RTReferencedStudySequence conventionally names
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription")


def slice_contours(mask2d: np.ndarray) -> List[np.ndarray]:
    """Closed contours of a 2D binary mask (``[row, column]``) as ``(n, 2)`` arrays of
    (column, row) pixel coordinates, the last point not repeating the first."""
    import contourpy

    padded = np.pad(mask2d.astype(np.float64), 1)  # a mask touching the edge still gets closed lines
    gen = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    out = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, dtype=float) - 1.0
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) >= 3:
            out.append(pts)
    return out


def _ds(**attrs):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def write_rtstruct(labels: np.ndarray, image, folder: PathLike, path: PathLike, label_names: Mapping[int, str], software: str = "") -> Path:
    """Write ``labels`` (``[z, y, x]`` label values on ``image``, the grid read from the DICOM
    series ``folder``) as an RT Structure Set at ``path`` (atomically): one ROI per foreground
    value of ``label_names`` (named by it), contours on the source slices."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    slices = sorted(source_slices(Path(folder), image), key=lambda t: t[0])
    first = slices[0][1]
    ds = _ds(SpecificCharacterSet="ISO_IR 192", SOPClassUID=RTSTRUCT_SOP_CLASS, SOPInstanceUID=generate_uid(), Modality="RTSTRUCT")
    for key in PATIENT_STUDY:  # type 2 attributes: copied as they are, empty when the source has none
        setattr(ds, key, getattr(first, key, ""))
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = first.FrameOfReferenceUID, getattr(first, "PositionReferenceIndicator", "")  # Frame of Reference module
    now = datetime.datetime.now()
    ds.update(_ds(
        SeriesInstanceUID=generate_uid(), SeriesNumber=int(getattr(first, "SeriesNumber", None) or 0) + 2000, InstanceNumber=1,
        SeriesDescription=f"volseg structures of {getattr(first, 'SeriesDescription', '') or 'series ' + str(first.SeriesInstanceUID)}"[:64],
        Manufacturer="volseg", SoftwareVersions=software or "0", OperatorsName="",
        StructureSetLabel="volseg", StructureSetDate=now.strftime("%Y%m%d"), StructureSetTime=now.strftime("%H%M%S"),
        InstanceCreationDate=now.strftime("%Y%m%d"), InstanceCreationTime=now.strftime("%H%M%S"),
    ))
    images = Sequence([_ds(ReferencedSOPClassUID=s.SOPClassUID, ReferencedSOPInstanceUID=s.SOPInstanceUID) for _, s in slices])
    series = _ds(SeriesInstanceUID=first.SeriesInstanceUID, ContourImageSequence=images)
    study = _ds(ReferencedSOPClassUID=STUDY_COMPONENT, ReferencedSOPInstanceUID=first.StudyInstanceUID, RTReferencedSeriesSequence=Sequence([series]))
    ds.ReferencedFrameOfReferenceSequence = Sequence([_ds(FrameOfReferenceUID=first.FrameOfReferenceUID, RTReferencedStudySequence=Sequence([study]))])
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = Sequence(), Sequence(), Sequence()
    values = sorted(int(v) for v in label_names if int(v) != 0)
    for number, value in enumerate(values, start=1):
        ds.StructureSetROISequence.append(_ds(ROINumber=number, ReferencedFrameOfReferenceUID=first.FrameOfReferenceUID,
                                              ROIName=str(label_names[value]), ROIGenerationAlgorithm="AUTOMATIC"))
        roi = _ds(ReferencedROINumber=number, ROIDisplayColor=_color(number))
        contours = _contours(labels == value, image, slices)
        if contours:
            roi.ContourSequence = Sequence(contours)
        ds.ROIContourSequence.append(roi)
        ds.RTROIObservationsSequence.append(_ds(ObservationNumber=number, ReferencedROINumber=number, RTROIInterpretedType="ORGAN", ROIInterpreter=""))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = RTSTRUCT_SOP_CLASS, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID, ds.file_meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    with atomic_write(path) as tmp:
        ds.save_as(str(tmp), enforce_file_format=True)
    log.info("wrote RTSTRUCT %s (%d ROI(s), %d source slice(s))", path, len(values), len(slices))
    return Path(path)


def _contours(mask: np.ndarray, image, slices) -> list:
    """ContourSequence items of one ROI: each slice's closed contours in patient LPS mm."""
    from pydicom.sequence import Sequence

    origin = np.array(image.GetOrigin(), dtype=float)
    axes = np.array(image.GetDirection(), dtype=float).reshape(3, 3) * np.array(image.GetSpacing(), dtype=float)  # columns: mm per index step
    items = []
    for k, src in slices:
        if not mask[k].any():
            continue
        for pts in slice_contours(mask[k]):
            index = np.column_stack([pts, np.full(len(pts), float(k))])  # (column, row, slice) = (i, j, k)
            world = origin + index @ axes.T
            items.append(_ds(ContourImageSequence=Sequence([_ds(ReferencedSOPClassUID=src.SOPClassUID, ReferencedSOPInstanceUID=src.SOPInstanceUID)]),
                             ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=len(world),
                             ContourData=[float(f"{v:.4f}") for v in world.ravel()]))
    return items


def _color(number: int) -> List[int]:
    from matplotlib import colormaps

    r, g, b, _ = colormaps["tab10"]((number - 1) % 10)
    return [int(round(255 * c)) for c in (r, g, b)]
