"""The source series of a DICOM output: its files' headers, each placed on the slice of the
image it belongs to by its position (never by file order or list index), and the attributes
a derived object (DICOM-SEG, RTSTRUCT) must copy checked up front.

Both writers take the label map on the grid :func:`~volseg.data.io.read_image` returned for the
folder, so slice ``k`` of the map is the slice whose ImagePositionPatient lies ``k`` steps from
the image origin along the slice normal; :func:`source_slices` computes that ``k`` for every file
and refuses a file that lies between slices or off the grid, so a mask can never be written onto
a neighbouring slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Tuple

import numpy as np

from .base import ImageReadError
from .dicom import series_files

__all__ = ["DICOM_EXTRA", "REQUIRED_UIDS", "require_dicom_libraries", "source_slices"]

DICOM_EXTRA = "pip install 'volseg[dicom]'"
#: what a derived object must reference; a series without them cannot be linked to its study
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
POSITION_TOLERANCE = 0.01  # of a slice step: positions carry ~6 significant digits


def require_dicom_libraries(what: str) -> None:
    """Raise ``ImportError`` (one line naming the extra) when highdicom is not installed."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} needs highdicom, which is not installed: {DICOM_EXTRA}") from None


def source_slices(folder: Path, image) -> List[Tuple[int, Any]]:
    """``[(k, header)]`` of the series read from ``folder``: each file's pydicom header (no pixel
    data) and the index ``k`` of the slice of ``image`` (its ``[z, y, x]`` array's first axis) it
    lies on. Raises :class:`ImageReadError` (one line, naming the folder) when a header lacks
    :data:`REQUIRED_UIDS`, or a file is not on ``image``'s grid."""
    import pydicom

    origin = np.array(image.GetOrigin(), dtype=float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    dz = float(image.GetSpacing()[2])
    out = []
    for name in series_files(folder):
        ds = pydicom.dcmread(name, stop_before_pixels=True)
        missing = [k for k in REQUIRED_UIDS if not str(getattr(ds, k, "") or "").strip()]
        if missing:
            raise ImageReadError(
                f"{folder}: {Path(name).name} has no {', '.join(missing)}; a DICOM-SEG or RTSTRUCT must reference the source's "
                f"study, series and frame of reference (required: {', '.join(REQUIRED_UIDS)}). Export the series with its DICOM attributes."
            )
        offset = (np.array([float(v) for v in ds.ImagePositionPatient]) - origin) @ direction  # (i, j, k) in mm
        k = offset[2] / dz
        if abs(k - round(k)) > POSITION_TOLERANCE or not 0 <= round(k) < image.GetSize()[2] or np.abs(offset[:2]).max() > POSITION_TOLERANCE * dz:
            raise ImageReadError(f"{folder}: {Path(name).name} at {list(ds.ImagePositionPatient)} mm does not lie on a slice of the series' grid; refusing to guess its slice.")
        out.append((int(round(k)), ds))
    ks = sorted(k for k, _ in out)
    if ks != list(range(image.GetSize()[2])):
        raise ImageReadError(f"{folder}: its files lie on slices {ks[:8]}... of {image.GetSize()[2]}; every slice needs exactly one file.")
    return out
