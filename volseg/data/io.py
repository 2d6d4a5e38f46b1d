"""Reading and writing scans.

SimpleITK reads every format we accept (NIfTI, NRRD, MHA/MHD, DICOM series folders) into one
geometry model (origin, spacing, direction in LPS world coordinates, arrays indexed ``[z, y, x]``).
Writes are atomic: the file goes to a temporary name in the target folder, then ``os.replace``
moves it into place, so a crash never leaves a half-written file under a final name.
NIfTI label maps written for a NIfTI input copy that input's header with nibabel, so the affine,
qform/sform codes and the file's axis order come back exactly as they were.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

__all__ = [
    "ImageReadError",
    "read_image",
    "write_image",
    "write_label_like",
    "case_name",
    "is_image_path",
    "atomic_write",
    "same_geometry",
    "write_text",
    "save_torch",
    "nifti_affine",
]


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


def _read_dicom_folder(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageReadError(f"{folder}: folder holds no DICOM series (and no single image file).")
    if len(series) > 1:
        log.warning("%s holds %d DICOM series; reading the first (%s).", folder, len(series), series[0])
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    return reader.Execute()


def read_image(path: PathLike, pixel_type: Optional[int] = None) -> sitk.Image:
    """Read a 3D scan (file or DICOM series folder) as a SimpleITK image.

    A 4D image whose 4th axis has length 1 is squeezed to 3D; a 2D image is rejected (volseg
    models are trained on volumes). ``pixel_type`` casts, e.g. ``sitk.sitkFloat32``.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file or folder.")
    try:
        img = _read_dicom_folder(p) if p.is_dir() else sitk.ReadImage(str(p))
    except ImageReadError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise ImageReadError(f"{p}: cannot read image ({first}).") from None
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        if size[3] != 1:
            raise ImageReadError(
                f"{p}: 4D image of size {size}; only a singleton 4th axis is accepted "
                "(split multi-channel or time series into one file per channel)."
            )
        img = sitk.Extract(img, size[:3] + [0], [0, 0, 0, 0])
    if img.GetDimension() != 3:
        raise ImageReadError(f"{p}: image has {img.GetDimension()} dimensions (size {img.GetSize()}); expected a 3D volume.")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{p}: vector/RGB image with {img.GetNumberOfComponentsPerPixel()} components; expected a scalar volume.")
    if pixel_type is not None:
        img = sitk.Cast(img, pixel_type)
    return img


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> Optional[str]:
    """``None`` when ``a`` and ``b`` share a voxel grid (within ``tol`` relative/mm), else a
    sentence saying what differs."""
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol, atol=tol):
        return f"spacing {tuple(round(s, 4) for s in a.GetSpacing())} vs {tuple(round(s, 4) for s in b.GetSpacing())}"
    extent = max(np.array(a.GetSpacing()) * np.array(a.GetSize()))
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol * extent, 0.05 * min(a.GetSpacing()))):
        return f"origin {tuple(round(o, 2) for o in a.GetOrigin())} vs {tuple(round(o, 2) for o in b.GetOrigin())}"
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=tol):
        return f"direction {tuple(round(d, 3) for d in a.GetDirection())} vs {tuple(round(d, 3) for d in b.GetDirection())}"
    return None


@contextmanager
def atomic_write(final: PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``final``'s folder (same suffix, so writers pick the right
    format); when the block succeeds it is renamed onto ``final``, otherwise removed. A crash
    never leaves a half-written file under the final name."""
    final = Path(final)
    tmp = _temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_path(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if final.name.endswith(".nii.gz") else final.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    # mkstemp makes 0600 files; give the final file the usual permissions (0666 & ~umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def write_image(img: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write ``img`` atomically to ``path`` (format from the suffix)."""
    with atomic_write(path) as tmp:
        sitk.WriteImage(img, str(tmp), compress)
    return Path(path)


def write_label_like(labels: np.ndarray, reference: PathLike, ref_img: sitk.Image, path: PathLike) -> Path:
    """Write a label map (array ``[z, y, x]`` on ``ref_img``'s grid) to ``path``.

    When both the reference and the output are NIfTI, the reference header is copied with
    nibabel (affine, qform/sform and their codes, axis order); otherwise SimpleITK copies the
    geometry. The dtype is kept (callers pass uint8 when the labels fit).
    """
    path = Path(path)
    ref = Path(reference)
    nifti = str(path).endswith((".nii", ".nii.gz")) and str(ref).endswith((".nii", ".nii.gz")) and ref.is_file()
    if nifti:
        import nibabel as nib

        src = nib.load(str(ref))
        arr = np.ascontiguousarray(labels.transpose(2, 1, 0))  # sitk [z,y,x] -> nibabel [x,y,z]
        header = src.header.copy()
        header.set_data_dtype(arr.dtype)
        header["scl_slope"] = 1.0
        header["scl_inter"] = 0.0
        if len(src.shape) != 3:
            header.set_data_shape(arr.shape)
        out = nib.Nifti1Image(arr, src.affine, header)
        # Nifti1Image re-derives qform/sform from `affine`; put both back with their codes.
        q, qcode = src.header.get_qform(coded=True)
        s, scode = src.header.get_sform(coded=True)
        out.set_qform(q if q is not None else src.affine, int(qcode))
        out.set_sform(s if s is not None else src.affine, int(scode))
        with atomic_write(path) as tmp:
            nib.save(out, str(tmp))
        return path
    img = sitk.GetImageFromArray(labels)
    img.CopyInformation(ref_img)
    return write_image(img, path)


def write_text(path: PathLike, text: str) -> Path:
    """Write a small text file atomically (temp file in the same folder, then rename)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_torch(obj: object, path: PathLike) -> Path:
    """``torch.save`` atomically. (ignite's ``Checkpoint`` deletes a same-named file *before*
    writing its replacement, so a crash there loses ``last.pt``; a rename never does.)"""
    import torch

    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def nifti_affine(img: sitk.Image) -> np.ndarray:
    """The NIfTI (RAS) 4x4 affine of a SimpleITK image (LPS), for arrays indexed ``[x, y, z]``."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    d = np.array(img.GetDirection()).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = lps_to_ras @ d @ np.diag(img.GetSpacing())
    aff[:3, 3] = lps_to_ras @ np.array(img.GetOrigin())
    return aff
