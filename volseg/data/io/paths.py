"""What may be read and what may be replaced.

- **Inputs** (:func:`check_input`) are regular files or folders. A FIFO, socket or device node
  named like a scan is refused before it is opened (opening a FIFO blocks forever; a device
  never ends).
- **Detached data files** (:func:`detached_data_files`): a MetaImage (``.mhd``/``.mha``) or NRRD
  (``.nhdr``/``.nrrd``) header names the file(s) its voxels are in. Each must be a regular file in
  the header's own folder or below it, after following symlinks: a header never makes volseg read
  ``/etc/passwd``, ``../../x.raw`` or ``/dev/urandom``. ITK reads the files itself, so the
  header is parsed here first with the same rules ITK uses to find them.
- **Outputs** (:func:`refuse_unsafe_outputs`) replace only a missing name or a regular file (not a
  symlink, folder or device node), and never a file that is an input of the same command (same
  resolved path or the same inode: a hard link counts).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Iterable, List

from .base import ImageReadError, PathLike

METAIMAGE_SUFFIXES = (".mhd", ".mha")
NRRD_SUFFIXES = (".nhdr", ".nrrd")
_MAX_HEADER_LINE = 1 << 16  # bytes; a longer "line" is binary data, not a header field
_MAX_HEADER_LINES = 10_000
_MAX_DATA_FILES = 100_000


class UnsafeOutputError(ValueError):
    """An output name that must not be replaced (an input of the same command, a device node,
    a folder, a symlink); the message names it."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def check_input(path: PathLike) -> Path:
    """``path`` as a Path when it is a regular file or a folder (symlinks followed); otherwise
    :class:`ImageReadError` naming it and what it is."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ImageReadError(f"{p}: no such file or folder.") from None
    except OSError as exc:  # a symlink loop, a permission problem
        raise ImageReadError(f"{p}: cannot be read ({exc.strerror or exc}).") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ImageReadError(f"{p}: is {_kind(mode)}, not a scan file; volseg reads regular files and folders only.")
    return p


def _header_lines(path: Path) -> List[str]:
    """The text lines at the start of ``path`` up to the first that is too long or not text."""
    lines: List[str] = []
    with open(path, "rb") as fh:
        for _ in range(_MAX_HEADER_LINES):
            raw = fh.readline(_MAX_HEADER_LINE)
            if not raw or not raw.endswith(b"\n"):
                if raw and len(raw) < _MAX_HEADER_LINE:
                    lines.append(raw.decode("latin-1").strip())
                break
            lines.append(raw.decode("latin-1").strip())
    return lines


def _expand(spec: str, following: List[str], header: Path) -> List[str]:
    """File names from a data-file value: one name, ``LIST`` (names on the following lines) or a
    ``printf`` pattern with ``min max step`` (MetaImage and NRRD write these the same way)."""
    parts = spec.split()
    if not parts:
        raise ImageReadError(f"{header}: the header's data-file field is empty.")
    if parts[0].upper() == "LIST":
        return [line for line in following if line]
    if "%" in parts[0] and len(parts) >= 4:
        try:
            lo, hi, step = int(parts[1]), int(parts[2]), int(parts[3])
            indices = range(lo, hi + (1 if step > 0 else -1), step)
            if len(indices) > _MAX_DATA_FILES:
                raise ImageReadError(f"{header}: the header names {len(indices)} data files (pattern {spec[:200]!r}); at most {_MAX_DATA_FILES}.")
            return [parts[0] % i for i in indices]
        except (ValueError, TypeError, ZeroDivisionError):
            raise ImageReadError(f"{header}: cannot read the data-file pattern {spec[:200]!r}.") from None
    return [spec.strip()]


def detached_data_files(header: PathLike) -> List[Path]:
    """The data files a MetaImage or NRRD header names (``[]`` when its voxels are inside it),
    each checked to be a regular file in the header's folder or below it; otherwise
    :class:`ImageReadError` naming the header and the path."""
    header = Path(header)
    name = header.name.lower()
    if not name.endswith(METAIMAGE_SUFFIXES + NRRD_SUFFIXES) or not header.is_file():
        return []
    lines = _header_lines(header)
    spec, following = None, []
    if name.endswith(METAIMAGE_SUFFIXES):
        for i, line in enumerate(lines):
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "elementdatafile":
                spec, following = value.strip(), lines[i + 1 :]
                break
        if spec is not None and spec.upper() == "LOCAL":
            return []
    else:
        end = next((i for i, line in enumerate(lines) if not line), len(lines))  # a blank line ends a NRRD header
        for line in lines[1:end]:
            key, sep, value = line.partition(":")
            if sep and not value.startswith("=") and re.sub(r"\s", "", key.lower()) == "datafile":
                spec, following = value.strip(), lines[end + 1 :]
                break
    if spec is None:
        return []
    folder = header.parent.resolve()
    files: List[Path] = []
    for entry in _expand(spec, following, header):
        target = (header.parent / entry).resolve()  # an absolute entry stays absolute
        if target != folder and folder not in target.parents:
            raise ImageReadError(
                f"{header}: the header's data file {entry[:200]!r} resolves to {target}, outside the header's folder {folder}; "
                "volseg reads detached data files only from the header's own folder (or below it)."
            )
        try:
            mode = target.stat().st_mode
        except OSError:
            raise ImageReadError(f"{header}: the header's data file {entry[:200]!r} does not exist ({target}).") from None
        if not stat.S_ISREG(mode):
            raise ImageReadError(f"{header}: the header's data file {entry[:200]!r} ({target}) is {_kind(mode)}; it must be a regular file.")
        files.append(target)
    return files


def file_identity(path: PathLike):
    """What makes two names one file: ``(device, inode)`` (hard links and any spelling agree),
    or the resolved path when the file cannot be stat'ed."""
    p = Path(path)
    try:
        st = p.stat()
        return (st.st_dev, st.st_ino)
    except OSError:
        return p.resolve()


def refuse_unsafe_outputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike] = ()) -> None:
    """Raise :class:`UnsafeOutputError` naming the first of ``outputs`` that must not be
    (re)placed: anything but a missing name or a regular file, or a file that is one of
    ``inputs`` or a detached data file of one (same resolved path or same inode)."""
    taken = {}
    for src in inputs:
        src = Path(src)
        try:
            data = detached_data_files(src) if src.is_file() else []
        except ImageReadError:  # a bad header fails its own scan when it is read
            data = []
        for q in [src] + data:
            taken[file_identity(q)] = src
    for out in outputs:
        p = Path(out)
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UnsafeOutputError(f"{p}: cannot be written ({exc.strerror or exc}).") from None
        if not stat.S_ISREG(mode):
            raise UnsafeOutputError(f"{p}: is {_kind(mode)}; volseg replaces only regular files (or writes a new name). Choose another output.")
        src = taken.get(file_identity(p))
        if src is not None:
            raise UnsafeOutputError(f"{p}: is an input of this command ({src}); writing there would destroy it. Choose another output.")
