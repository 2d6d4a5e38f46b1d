"""Writing scans, label maps, text and checkpoints, every write atomic (see :mod:`volseg.data.io`)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Set

import numpy as np
import SimpleITK as sitk

from .base import PathLike, is_nifti_path, itk_error_text
from .paths import refuse_unsafe_outputs

log = logging.getLogger(__name__)

TEMP_PREFIX = ".volseg-tmp-"
STALE_TEMP_S = 3600.0  # a temporary folder older than this was left by a killed process

_swept: Set[Path] = set()  # folders already cleaned of stale temporary folders by this process


def _remove_stale_temps(folder: Path) -> None:
    """Remove ``.volseg-tmp-*`` folders older than :data:`STALE_TEMP_S` (a killed writer's)."""
    if folder in _swept:
        return
    _swept.add(folder)
    now = time.time()
    for p in folder.glob(TEMP_PREFIX + "*"):
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if p.is_dir() and age > STALE_TEMP_S:
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, a temporary folder left %.1f h ago by an interrupted volseg run", p, age / 3600)


def _write_error(final: Path, cause: str, errno_: object) -> OSError:
    err = OSError(f"cannot write {final}: {cause}")
    err.errno = errno_  # type: ignore[assignment]  # kept for callers that test it (ENOSPC)
    return err


@contextmanager
def atomic_write(final: PathLike) -> Iterator[Path]:
    """Yield a temporary path for ``final``: a file of the same name inside a new hidden folder
    ``.volseg-tmp-XXXX/`` next to it (same name, so writers pick the right format from the
    suffix; hidden folder, so it is never taken for an input). When the block succeeds the file
    is renamed onto ``final``; the folder is removed either way. ``final`` must be a missing
    name or a regular file (:func:`~volseg.data.io.paths.refuse_unsafe_outputs`): a rename onto a
    device node or a symlink replaces it."""
    final = Path(final)
    refuse_unsafe_outputs([final])
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final.parent.resolve())
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=final.parent))
    try:
        tmp = folder / final.name
        try:
            yield tmp
            os.replace(tmp, final)
        except OSError as exc:  # a full disk, a quota: name the file the user asked for, not the temporary one
            raise _write_error(final, exc.strerror or str(exc), exc.errno) from exc
        except RuntimeError as exc:
            if "ITK" not in str(exc) and "SimpleITK" not in str(exc):
                raise
            raise _write_error(final, itk_error_text(exc), None) from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_image(img: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write ``img`` atomically to ``path`` (format from the suffix)."""
    with atomic_write(path) as tmp:
        sitk.WriteImage(img, str(tmp), compress)
    return Path(path)


def write_label_like(labels: np.ndarray, reference: PathLike, ref_img: sitk.Image, path: PathLike) -> Path:
    """Write a label map (array ``[z, y, x]`` on ``ref_img``'s grid) to ``path``.

    When both the reference and the output are NIfTI, the reference header is copied with
    nibabel (affine, qform/sform and their codes, axis order), so the mask carries the geometry
    :func:`read_image` used (nibabel's rule); otherwise SimpleITK copies ``ref_img``'s geometry.
    The dtype is kept (callers pass uint8 when the labels fit).
    """
    path = Path(path)
    ref = Path(reference)
    if not (is_nifti_path(path) and is_nifti_path(ref) and ref.is_file()):
        img = sitk.GetImageFromArray(labels)
        img.CopyInformation(ref_img)
        return write_image(img, path)
    import nibabel as nib

    src = nib.load(str(ref))
    arr = np.ascontiguousarray(labels.transpose(2, 1, 0))  # sitk [z,y,x] -> nibabel [x,y,z]
    header = src.header.copy()
    header.set_data_dtype(arr.dtype)
    header["scl_slope"] = 1.0
    header["scl_inter"] = 0.0
    if len(src.shape) != 3:
        header.set_data_shape(arr.shape)
    # affine=None keeps the header's qform/sform fields and codes byte for byte (an affine
    # would be re-encoded, and a 180-degree quaternion may come back with the opposite sign)
    out = nib.Nifti1Image(arr, None, header)
    with atomic_write(path) as tmp:
        nib.save(out, str(tmp))
    return path


def write_text(path: PathLike, text: str) -> Path:
    """Write a small text file atomically (see :func:`atomic_write`)."""
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
