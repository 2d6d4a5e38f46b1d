"""Batch inference: resolve inputs to jobs, run the predictor, write masks and sidecars.

A failing scan (unreadable, wrong channel count, an output that cannot be written, ...) is
logged with its name and the batch goes on; :func:`infer_many` returns the failures so the CLI
can list them and exit non-zero. An output folder that can never be written (a file in its place,
no write permission) stops the batch once, before the model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..data.io import ImageReadError, case_name, is_image_path, itk_error_text, read_channels, write_label_like, write_text

log = logging.getLogger(__name__)

__all__ = ["Job", "collect_inputs", "check_outputs", "infer_many"]


@dataclass(frozen=True)
class Job:
    name: str
    images: Tuple[Path, ...]  # one per channel
    output: Path


def _is_dicom_dir(p: Path) -> bool:
    import SimpleITK as sitk

    return p.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)))


def collect_inputs(inputs: Sequence[Union[str, Path]], output: Optional[Union[str, Path]] = None) -> List[Job]:
    """Turn CLI inputs (files, DICOM folders, folders of scans, manifests) into jobs.

    Output: ``<case>_seg.nii.gz`` next to each input, in the folder ``output``, or, for a
    single input, ``output`` itself when it ends in an image suffix. In a folder, hidden names
    (``.*``, e.g. volseg's own ``.volseg-tmp-*`` folders) and earlier outputs (``*_seg``,
    ``*_prob``) are skipped.
    """
    from ..data.manifest import load_manifest

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
            scans = sorted(q for q in entries if is_image_path(q) and not case_name(q).endswith(("_seg", "_prob")))
            scans += sorted(q for q in entries if q.is_dir() and _is_dicom_dir(q))
            if not scans:
                raise ImageReadError(f"{p}: folder holds no scans (.nii, .nii.gz, .nrrd, .mha, .mhd or DICOM series).")
            found += [(case_name(q), (q,)) for q in scans]
        else:
            found.append((case_name(p), (p,)))
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


def check_outputs(jobs: Sequence[Job]) -> None:
    """Raise ``NotADirectoryError``/``PermissionError`` (one line naming the folder) when an
    output folder can never be written: a file stands where it or a parent folder should be,
    or its nearest existing folder is not writable."""
    for folder in sorted({j.output.parent for j in jobs}):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(f"output {folder}: {existing} is a file, not a folder; give --output a folder (or a file name for a single input).")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"output {folder}: folder {existing} is not writable; choose another --output.")


def _error_line(exc: BaseException) -> str:
    """One line for a failed scan: ITK's cause without its source location, else the message."""
    if isinstance(exc, RuntimeError) and ("ITK ERROR" in str(exc) or "SimpleITK" in str(exc)):
        return itk_error_text(exc)
    if isinstance(exc, OSError) and exc.filename:  # reads raise ImageReadError: this is a write
        return f"cannot write {exc.filename2 or exc.filename}: {exc.strerror}"  # os.replace: filename2 is the target
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _write_probabilities(arr: np.ndarray, reference, path: Path) -> Path:
    """Class probabilities on the reference grid as a 4D NIfTI ``(x, y, z, class)`` of uint8
    with ``scl_slope = 1/255``: readers get floats in [0, 1]. (NIfTI has no float16 type.)"""
    import nibabel as nib

    from ..data.io import atomic_write, nifti_affine

    # arr: (K, z, y, x) uint8 on the reference grid, from Predictor.predict(probabilities=True)
    out = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(3, 2, 1, 0)), nifti_affine(reference))
    out.header.set_slope_inter(1 / 255, 0.0)
    with atomic_write(path) as tmp:
        nib.save(out, str(tmp))
    return path


def infer_many(
    jobs: Sequence[Job],
    model: Union[str, Path],
    device: str = "auto",
    overrides: Optional[dict] = None,
    probabilities: bool = False,
    progress: bool = False,
    checkpoint: str = "best",
) -> List[Tuple[Job, str]]:
    """Segment every job with the run in ``model``; return ``[(job, error message)]``."""
    from .. import versions
    from ..config import to_dict
    from .predictor import Predictor

    check_outputs(jobs)
    pred = Predictor.from_run(model, device=device, checkpoint=checkpoint, overrides=overrides, progress=progress)
    failures: List[Tuple[Job, str]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), unit="scan", desc="volseg infer")
    for job in jobs:
        t0 = time.perf_counter()
        try:
            images = [img for p in job.images for img in read_channels(p)]  # a 4D file: its channels
            out = pred.predict(images, source=str(job.images[0]), probabilities=probabilities)
            write_label_like(out["labels"], job.images[0], images[0], job.output)
            prob_path = None
            if probabilities:
                prob_path = _write_probabilities(out["probabilities"], images[0], job.output.with_name(job.output.name.replace("_seg", "_prob")))
            sidecar = {
                "input": [str(p) for p in job.images],
                "output": str(job.output),
                "probabilities": str(prob_path) if prob_path else None,
                "model": pred.run_info,
                "labels": dict(zip(pred.plan.label_values, pred.plan.label_names)),
                "settings": {**to_dict(pred.infer), "device": str(pred.device)},
                "versions": versions(),
                "timing_s": {**{k: round(v, 3) for k, v in out["timing"].items()}, "total_s": round(time.perf_counter() - t0, 3)},
            }
            write_text(_sidecar(job.output), json.dumps(sidecar, indent=2))
            log.info("%s -> %s (%.1fs)", job.name, job.output, time.perf_counter() - t0)
        except (ImageReadError, ValueError, RuntimeError, OSError) as exc:
            msg = _error_line(exc)
            log.error("%s: %s", job.name, msg)
            failures.append((job, msg))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return failures


def _sidecar(output: Path) -> Path:
    name = output.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")

