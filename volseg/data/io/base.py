"""What the readers and the writers share: scan file names and suffixes, the read error, ITK's
error text."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ImageReadError(ValueError):
    """A scan cannot be read or is not what was expected; the message names the file."""


def case_name(path: PathLike) -> str:
    """``/a/b/case_01.nii.gz`` -> ``case_01``; a DICOM folder -> the folder's name."""
    p = Path(path)
    name = p.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_path(path: PathLike) -> bool:
    return any(str(path).lower().endswith(s) for s in IMAGE_SUFFIXES)


def is_nifti_path(path: PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def itk_error_text(exc: BaseException) -> str:
    """The cause in an ITK/SimpleITK error: the lines after the source location
    (``.../itkFoo.hxx:214:``), without ITK's ``ITK ERROR: Filter(0x...):`` prefix."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    located = [i for i, line in enumerate(lines) if re.search(r"\.(?:hxx|cxx|txx|h|cpp):\d+:?$", line)]
    cause = lines[located[-1] + 1 :] if located and located[-1] + 1 < len(lines) else lines[-1:]
    text = " ".join(cause)
    text = re.sub(r"^(?:sitk::ERROR|ITK ERROR|itk::ERROR):\s*", "", text)
    text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)
    return text or type(exc).__name__


@contextmanager
def itk_warnings_off():
    """Silence ITK's global warning display for a block (restored after): for ITK warnings that
    volseg answers itself, in words a user understands."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
