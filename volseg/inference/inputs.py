"""Batch inputs: CLI inputs (files, DICOM folders, folders of scans, manifests) resolved to jobs,
their output paths checked up front, and where the batch's summary goes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..data.io import ImageReadError, case_name, check_input, is_image_path, itk_warnings_off, refuse_unsafe_outputs
from ..data.manifest import load_manifest

log = logging.getLogger(__name__)

__all__ = ["Job", "collect_inputs", "check_outputs", "check_formats", "parse_formats", "summary_path", "SUMMARY_NAME", "FORMATS", "STATISTICS_NAME"]

SUMMARY_NAME = "infer_summary.json"
STATISTICS_NAME = "statistics.csv"
FORMATS = ("nifti", "dicom-seg", "rtstruct")  # what --format takes; the DICOM ones need a DICOM series input


@dataclass(frozen=True)
class Job:
    name: str
    images: Tuple[Path, ...]  # one per channel
    output: Path

    @property
    def probabilities(self) -> Path:
        """Where ``--probabilities`` writes (``<case>_prob.nii.gz`` beside the mask)."""
        return self.output.with_name(self.output.name.replace("_seg", "_prob"))

    @property
    def sidecar(self) -> Path:
        """The mask's JSON sidecar: its name with ``.json`` for the image suffix."""
        return self.output.with_name(case_name(self.output) + ".json")

    @property
    def dicom_seg(self) -> Path:
        """Where ``--format dicom-seg`` writes (``<case>_seg.dcm`` beside the mask)."""
        return self.output.with_name(f"{self.name}_seg.dcm")

    @property
    def rtstruct(self) -> Path:
        """Where ``--format rtstruct`` writes (``<case>_rtstruct.dcm`` beside the mask)."""
        return self.output.with_name(f"{self.name}_rtstruct.dcm")

    @property
    def stats(self) -> Path:
        """Where ``--statistics`` writes (``<case>_stats.json`` beside the mask)."""
        return self.output.with_name(f"{self.name}_stats.json")

    def outputs(self, formats: Sequence[str] = ("nifti",), probabilities: bool = False, statistics: bool = False) -> List[Path]:
        """Every file this job writes with these options (the sidecar always)."""
        named = {"nifti": self.output, "dicom-seg": self.dicom_seg, "rtstruct": self.rtstruct}
        return [named[f] for f in formats] + [self.sidecar] + ([self.probabilities] if probabilities else []) + ([self.stats] if statistics else [])


def _is_dicom_dir(p: Path) -> bool:
    import SimpleITK as sitk

    if not p.is_dir():
        return False
    with itk_warnings_off():  # ITK's "No Series were found" is an answer here, not a warning
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)))


def collect_inputs(inputs: Sequence[Union[str, Path]], output: Optional[Union[str, Path]] = None) -> List[Job]:
    """Turn CLI inputs (files, DICOM folders, folders of scans, manifests) into jobs.

    Output: ``<case>_seg.nii.gz`` next to each input, in the folder ``output``, or, for a
    single input, ``output`` itself when it ends in an image suffix. In a folder, hidden names
    (``.*``, e.g. volseg's own ``.volseg-tmp-*`` folders) and earlier outputs (``*_seg``,
    ``*_prob``) are skipped.
    """
    found: List[Tuple[str, Tuple[Path, ...]]] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise ImageReadError(f"{p}: no such file or folder.")
        if p.suffix == ".json":
            man = load_manifest(p)
            if not man.test:
                raise ImageReadError(f"{p}: manifest has no 'test' cases to segment.")
            found += [(c.name, c.images) for c in man.test]
        elif p.is_dir() and not _is_dicom_dir(p):
            entries = [q for q in p.iterdir() if not q.name.startswith(".")]
            named = [q for q in entries if is_image_path(q) and not case_name(q).endswith(("_seg", "_prob"))]
            scans = sorted(q for q in named if q.is_file() or q.is_dir())  # stat only: opening a FIFO blocks
            for q in sorted(set(named) - set(scans)):
                log.warning("%s: skipped, not a regular file (a FIFO, socket, device node or broken link).", q)
            scans += sorted(q for q in entries if q.is_dir() and _is_dicom_dir(q))
            if not scans:
                raise ImageReadError(f"{p}: folder holds no scans (.nii, .nii.gz, .nrrd, .mha, .mhd or DICOM series).")
            found += [(case_name(q), (q,)) for q in scans]
        else:
            found.append((case_name(p), (check_input(p),)))
    single_file = output is not None and len(found) == 1 and is_image_path(output)
    jobs = []
    for name, images in found:
        if single_file:
            out = Path(output)
        elif output is not None:
            out = Path(output) / f"{name}_seg.nii.gz"
        else:
            out = images[0].parent / f"{name}_seg.nii.gz"
        jobs.append(Job(name, tuple(images), out))
    outs = [j.output for j in jobs]
    dup = sorted({str(o) for o in outs if outs.count(o) > 1})
    if dup:
        raise ImageReadError(f"several inputs would write the same output {dup}; give them distinct names or separate --output folders.")
    return jobs


def parse_formats(text: str) -> Tuple[str, ...]:
    """``--format``'s comma-separated list, each one of :data:`FORMATS` (else
    :class:`~volseg.config.ConfigError`, one line)."""
    from ..config import ConfigError

    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format {text!r}: unknown {bad or 'empty'}; choose one or more of {', '.join(FORMATS)} (comma-separated).")
    return tuple(dict.fromkeys(formats))


def check_formats(jobs: Sequence[Job], formats: Sequence[str]) -> Tuple[str, ...]:
    """``formats`` checked, before anything is read or written: each one of :data:`FORMATS`, at
    least one; ``dicom-seg``/``rtstruct`` only when every input is a DICOM series folder (their
    references and geometry come from its files) and highdicom is installed. Raises
    :class:`~volseg.config.ConfigError` (the formats) or :class:`ImageReadError` (naming the
    inputs that are not DICOM series), one line."""
    from ..config import ConfigError

    formats = parse_formats(",".join(formats))
    dicom = [f for f in formats if f != "nifti"]
    if dicom:
        not_dicom = [str(j.images[0]) for j in jobs if not _is_dicom_dir(j.images[0])]
        if not_dicom:
            shown = ", ".join(not_dicom[:5]) + (f" and {len(not_dicom) - 5} more" if len(not_dicom) > 5 else "")
            raise ImageReadError(f"--format {','.join(dicom)} needs DICOM series inputs (the output references their files); not a DICOM series: {shown}. Use --format nifti for them.")
        try:
            import highdicom  # noqa: F401
        except ImportError:
            raise ConfigError(f"--format {','.join(dicom)} needs highdicom, which is not installed: pip install 'volseg[dicom]'") from None
    return formats


def check_outputs(jobs: Sequence[Job], formats: Sequence[str] = ("nifti",), probabilities: bool = True, statistics: bool = False) -> None:
    """Raise ``NotADirectoryError``/``PermissionError`` (one line naming the folder) when an
    output folder can never be written: a file stands where it or a parent folder should be,
    or its nearest existing folder is not writable; :class:`~volseg.data.io.UnsafeOutputError`
    when an output (mask, probabilities, sidecar) would replace an input of the batch or anything
    but a regular file."""
    names = [name for j in jobs for name in j.outputs(formats, probabilities, statistics)]
    if statistics and jobs:
        names.append(summary_path(jobs).parent / STATISTICS_NAME)
    # a folder under an output name fails that scan alone when it is written (the batch goes on)
    refuse_unsafe_outputs([n for n in names if not n.is_dir() or n.is_symlink()], [img for j in jobs for img in j.images])
    for folder in sorted({j.output.parent for j in jobs} | ({summary_path(jobs).parent} if jobs else set())):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(f"output {folder}: {existing} is a file, not a folder; give --output a folder (or a file name for a single input).")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"output {folder}: folder {existing} is not writable; choose another --output.")


def summary_path(jobs: Sequence[Job]) -> Path:
    """``infer_summary.json`` in the folder that holds every output (the ``--output`` folder, or
    the folder of a single output file)."""
    return Path(os.path.commonpath([str(j.output.parent.absolute()) for j in jobs])) / SUMMARY_NAME
