"""Reading and writing scans.

Every reader returns SimpleITK images (origin, spacing, direction in LPS world coordinates,
arrays indexed ``[z, y, x]``). SimpleITK reads NRRD, MHA/MHD and DICOM series folders. NIfTI
headers are read with nibabel, because ITK's NIfTI reader (5.4) silently fills a truncated file
with zeros or stale memory, turns NaN voxels into 0 and may take the geometry from the qform
where nibabel and most viewers take the sform; see :func:`_read_nifti` for who reads the voxels.

Rules applied to every scan (training, inference and evaluation all read through here):

- **Geometry** of a NIfTI file follows nibabel's rule: the sform when its code is > 0, else the
  qform, else pixdim. A sheared affine (not spacing x rotation) is refused. Zero or non-finite
  spacing (pixdim or affine) is refused, in every format.
- **Truncated files** (fewer voxel bytes than the header declares) are refused naming the file.
- **NaN/Inf voxels**: an image holding any non-finite voxel is refused, with the NaN and Inf
  counts. volseg does not replace them: any stand-in value (0, the minimum) would be a guess that
  turns into a plausible-looking mask; replace them yourself with a value that fits the scan.
- **Label maps** (:func:`read_label`) must hold integer values only.
- **DICOM folders** holding several series: the series with the most slices is read (a
  localizer or scout has few); the choice and the other series are logged.
- **4D files**: a 4th axis of length 1 is squeezed; longer 4th axes are channels
  (:func:`read_channels`, e.g. the Medical Segmentation Decathlon's multi-modal tasks).

Writes are atomic: the file is written under its final name inside a hidden temporary folder
(``.volseg-tmp-XXXX/``) in the target folder, then ``os.replace`` moves it into place, so a crash
never leaves a half-written file under a final name, and a temporary file never looks like an
input scan. Temporary folders older than an hour (left by a killed process) are removed, with a
log line, the next time volseg writes to that folder.
NIfTI label maps written for a NIfTI input copy that input's header with nibabel, so the affine,
qform/sform codes and the file's axis order come back exactly as they were.

- **Paths** (:mod:`.paths`): inputs are regular files or folders (a FIFO or device node is
  refused before it is opened); a MetaImage/NRRD header's detached data files must be regular
  files in the header's folder or below it; an output replaces only a missing name or a regular
  file that is not an input of the same command.

The modules: :mod:`.base` (file names, :class:`ImageReadError`), :mod:`.paths` (what may be read
and replaced), :mod:`.read` (the readers and their checks) and :mod:`.write` (the atomic
writers). Every name is importable from here.
"""

from __future__ import annotations

from .base import IMAGE_SUFFIXES, NIFTI_SUFFIXES, ImageReadError, PathLike, case_name, is_image_path, is_nifti_path, itk_error_text, itk_warnings_off
from .paths import UnsafeOutputError, check_input, detached_data_files, file_identity, refuse_unsafe_outputs
from .read import read_channels, read_header, read_image, read_label, same_geometry
from .write import STALE_TEMP_S, TEMP_PREFIX, atomic_write, nifti_affine, save_torch, write_image, write_label_like, write_text

__all__ = [
    "ImageReadError",
    "UnsafeOutputError",
    "check_input",
    "detached_data_files",
    "refuse_unsafe_outputs",
    "read_image",
    "read_header",
    "read_channels",
    "read_label",
    "write_image",
    "write_label_like",
    "case_name",
    "is_image_path",
    "is_nifti_path",
    "atomic_write",
    "same_geometry",
    "write_text",
    "save_torch",
    "nifti_affine",
    "itk_error_text",
    "itk_warnings_off",
    "file_identity",
    "PathLike",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "TEMP_PREFIX",
    "STALE_TEMP_S",
]
