"""One scan of a batch: read and prepared (what prefetching runs ahead), then segmented, with its
mask, probabilities and sidecar written; a failure as one line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np

from ..config import to_dict
from ..data.io import atomic_write, itk_error_text, nifti_affine, read_channels, write_label_like, write_text
from ..version import versions
from .inputs import Job

log = logging.getLogger(__name__)


def _read(pred, job: Job, clock) -> dict:
    """Read a job's channels and run the network-free part of the predictor on them."""
    start = clock()
    images = [img for p in job.images for img in read_channels(p)]  # a 4D file: its channels
    prepared = pred.prepare(images, source=str(job.images[0]))
    return {"images": images, "prepared": prepared, "read": [start, clock()]}


def _segment(pred, job: Job, loaded: dict, probabilities: bool, clock, formats: Sequence[str] = ("nifti",), statistics: bool = False) -> dict:
    """The network and the writes for one read scan; returns its timing for the summary."""
    start, t0 = clock(), time.perf_counter()
    images = loaded["images"]
    out = pred.predict(images, source=str(job.images[0]), probabilities=probabilities, prepared=loaded["prepared"])
    written: List[Path] = []
    try:
        _write_masks(pred, job, out["labels"], images[0], formats, written)
        prob_path = _write_probabilities(out["probabilities"], images[0], job.probabilities) if probabilities else None
        if prob_path is not None:
            written.append(prob_path)
        if statistics:
            written.append(_write_statistics(pred, job, out["labels"], images[0]))
        timing = _write_sidecar(pred, job, out, loaded, prob_path, t0, written)
    except BaseException:  # a failed case leaves none of its outputs: a mask without its sidecar looks finished
        for path in written:
            Path(path).unlink(missing_ok=True)
        raise
    log.info("%s -> %s (%.1fs)", job.name, job.output, timing["total_s"])
    return {"timing_s": timing, "timeline_s": {"read": loaded["read"], "segment": [start, clock()]}}


def _write_masks(pred, job: Job, labels: np.ndarray, reference, formats: Sequence[str], written: List[Path]) -> None:
    """The mask in each of ``formats`` (NIfTI, DICOM-SEG, RTSTRUCT), named by the job; each
    file is added to ``written`` as soon as it is there (a later failure removes it)."""
    names = dict(zip(pred.plan.label_values, pred.plan.label_names))
    software = versions().get("volseg", "")
    for fmt in formats:
        if fmt == "nifti":
            written.append(write_label_like(labels, job.images[0], reference, job.output))
        elif fmt == "dicom-seg":
            from ..data.io.dicom_seg import write_dicom_seg

            written.append(write_dicom_seg(labels, reference, job.images[0], job.dicom_seg, names, software))
        else:
            from ..data.io.rtstruct import write_rtstruct

            written.append(write_rtstruct(labels, reference, job.images[0], job.rtstruct, names, software))


def _write_statistics(pred, job: Job, labels: np.ndarray, reference) -> Path:
    """``<case>_stats.json``: :func:`volseg.stats.statistics` of the mask on the scan as
    read (HU for a CT run: the reader applies the files' rescale slope/intercept)."""
    from ..stats import statistics

    unit = "HU" if pred.plan.channels and pred.plan.channels[0].upper() == "CT" else ""
    stats = statistics(labels, reference, dict(zip(pred.plan.label_values, pred.plan.label_names)), case=job.name, unit=unit)
    return write_text(job.stats, json.dumps(stats, indent=2, allow_nan=False) + "\n")


def _write_sidecar(pred, job: Job, out: dict, loaded: dict, prob_path, t0: float, written: Sequence[Path] = ()) -> dict:
    """The mask's JSON sidecar (inputs, outputs, model, labels, settings, versions, timing);
    returns the timing."""
    read_s = loaded["read"][1] - loaded["read"][0]  # reading and preprocessing
    timing = {**{k: round(v, 3) for k, v in out["timing"].items()}, "read_s": round(read_s, 3), "wait_s": round(loaded["wait_s"], 3), "total_s": round(time.perf_counter() - t0 + read_s, 3)}
    sidecar = {
        "input": [str(p) for p in job.images],
        "output": str(job.output) if job.output in written else None,
        "outputs": [str(p) for p in written],
        "probabilities": str(prob_path) if prob_path else None,
        "model": pred.run_info,
        "labels": dict(zip(pred.plan.label_values, pred.plan.label_names)),
        **({"regions": dict(zip(pred.plan.region_names, map(list, pred.plan.regions)))} if pred.plan.has_regions else {}),
        "settings": {**to_dict(pred.infer), "device": str(pred.device)},
        "versions": versions(),
        "timing_s": timing,
    }
    write_text(job.sidecar, json.dumps(sidecar, indent=2))
    return timing


def _write_probabilities(arr: np.ndarray, reference, path: Path) -> Path:
    """Class probabilities on the reference grid as a 4D NIfTI ``(x, y, z, class)`` of uint8
    with ``scl_slope = 1/255``: readers get floats in [0, 1]. (NIfTI has no float16 type.)"""
    import nibabel as nib

    # arr: (K, z, y, x) uint8 on the reference grid, from Predictor.predict(probabilities=True)
    out = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(3, 2, 1, 0)), nifti_affine(reference))
    out.header.set_slope_inter(1 / 255, 0.0)
    with atomic_write(path) as tmp:
        nib.save(out, str(tmp))
    return path


def _error_line(exc: BaseException) -> str:
    """One line for a failed scan: ITK's cause without its source location, else the message."""
    if isinstance(exc, RuntimeError) and ("ITK ERROR" in str(exc) or "SimpleITK" in str(exc)):
        return itk_error_text(exc)
    if isinstance(exc, OSError) and exc.filename:  # reads raise ImageReadError: this is a write
        return f"cannot write {exc.filename2 or exc.filename}: {exc.strerror}"  # os.replace: filename2 is the target
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
