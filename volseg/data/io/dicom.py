"""DICOM series folders: the series chosen, and its slices checked to stack onto one regular grid.

ITK stacks the files GDCM sorts along the slice normal as if they were evenly spaced: the
spacing comes from the first two slices, and a missing slice, a duplicated one or a tilted
stack only earns a C++ "Non uniform sampling" warning. A mask on that grid is up to a slice gap
off, and looks right. So the positions (ImagePositionPatient) and orientations
(ImageOrientationPatient) of every slice are checked here, and a series is refused, with the
numbers, when

- a slice has no position or orientation, or the slices' orientations differ;
- two slices share a position along the normal (duplicates, or two acquisitions mixed);
- the steps between slices differ by more than :data:`STEP_TOLERANCE` of the median step
  (a missing slice, mixed slice spacing);
- the stack is sheared: consecutive positions move within the slice plane (gantry tilt).

volseg does not resample such a series: which slices to trust is the user's call (export the
series again, or resample it onto a regular grid with the scanner's or a viewer's tools).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Sequence

import numpy as np
import SimpleITK as sitk

from .base import ImageReadError, itk_warnings_off

log = logging.getLogger(__name__)

STEP_TOLERANCE = 0.01  # relative: DICOM positions carry ~6 significant digits
SHEAR_TOLERANCE = 0.01  # in-plane drift per slice, relative to the slice step


def _floats(text: str, n: int) -> List[float]:
    values = [float(v) for v in text.replace(" ", "").split("\\") if v]
    if len(values) != n:
        raise ValueError(text)
    return values


def check_slice_geometry(positions: np.ndarray, orientations: np.ndarray, folder: Path) -> None:
    """Raise :class:`ImageReadError` naming ``folder`` when slices at ``positions`` (``(n, 3)``
    mm, in the order they are stacked) with ``orientations`` (``(n, 6)`` direction cosines) do
    not form one regular grid (see the module docstring)."""
    n = len(positions)
    if n < 2:
        return
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        bad = int(np.argmax(np.abs(orientations - orientations[0]).max(axis=1)))
        raise ImageReadError(f"{folder}: slice {bad} is oriented {np.round(orientations[bad], 4).tolist()}, slice 0 {np.round(orientations[0], 4).tolist()}; a series must have one orientation.")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    median = float(np.median(np.abs(along)))
    dup = np.flatnonzero(np.abs(along) <= STEP_TOLERANCE * max(median, 1e-6))
    if dup.size:
        k = int(dup[0])
        raise ImageReadError(
            f"{folder}: {dup.size} pair(s) of slices share a position along the slice normal (e.g. slices {k} and {k + 1} at "
            f"{round(float(positions[k] @ normal), 3)} mm): duplicated slices or two acquisitions in one series; volseg refuses to guess which to keep."
        )
    if (along > 0).any() and (along < 0).any():
        raise ImageReadError(f"{folder}: the slices' positions along the normal go back and forth ({np.round(positions @ normal, 3).tolist()[:8]}...); they cannot be stacked in order.")
    off = np.flatnonzero(np.abs(np.abs(along) - median) > STEP_TOLERANCE * median)
    if off.size:
        k = int(off[0])
        raise ImageReadError(
            f"{folder}: slices are not evenly spaced: {off.size} step(s) differ from the median {round(median, 4)} mm "
            f"(e.g. {round(abs(float(along[k])), 4)} mm between slices {k} and {k + 1}: a missing slice or mixed spacing); "
            f"volseg refuses to stack them on a regular grid (the mask would be off by up to a step). Export the full series, or resample it."
        )
    drift = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    if drift.max() > SHEAR_TOLERANCE * median:
        raise ImageReadError(
            f"{folder}: each slice is shifted {round(float(drift.max()), 3)} mm within its plane from the previous one (a tilted gantry "
            f"or sheared stack); volseg needs slices stacked along their normal. Resample the series onto a regular grid first."
        )


def read_dicom_folder(folder: Path) -> sitk.Image:
    """The series with the most slices in ``folder`` (others are logged), its slice geometry
    checked by :func:`check_slice_geometry`."""
    reader = sitk.ImageSeriesReader()
    names = series_files(folder, log_choice=True)
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's tags, for the geometry check
    with itk_warnings_off():  # ITK's "Non uniform sampling": checked below, in words
        img = reader.Execute()
    _check_series(reader, names, folder)
    return img


def series_files(folder: Path, log_choice: bool = False) -> List[str]:
    """The files of the series :func:`read_dicom_folder` reads from ``folder`` (the one with the
    most slices), in the order GDCM sorts them along the slice normal: slice ``k`` of the image
    is file ``k``. DICOM writers (:mod:`.dicom_seg`, :mod:`.rtstruct`) read their headers."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageReadError(f"{folder}: folder holds no DICOM series (and no single image file).")
    files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    chosen = max(series, key=lambda uid: len(files[uid]))  # ties: the first series GDCM lists
    if len(series) > 1 and log_choice:
        others = ", ".join(f"{uid} ({len(files[uid])} slices)" for uid in series if uid != chosen)
        log.warning("%s holds %d DICOM series; reading %s (%d slices, the most); not read: %s.", folder, len(series), chosen, len(files[chosen]), others)
    return list(files[chosen])


def _check_series(reader: sitk.ImageSeriesReader, names: Sequence[str], folder: Path) -> None:
    positions, orientations = [], []
    for i, name in enumerate(names):
        try:
            positions.append(_floats(reader.GetMetaData(i, "0020|0032"), 3))
            orientations.append(_floats(reader.GetMetaData(i, "0020|0037"), 6))
        except (RuntimeError, ValueError):
            if len(names) == 1:
                return
            raise ImageReadError(
                f"{folder}: slice {Path(name).name} has no readable ImagePositionPatient/ImageOrientationPatient (0020,0032/0037); "
                "volseg cannot check that the slices stack onto a regular grid and refuses the series."
            ) from None
    check_slice_geometry(np.array(positions), np.array(orientations), folder)
