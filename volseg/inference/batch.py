"""Batch inference: resolve inputs to jobs, run the predictor, write masks and sidecars.

A failing scan (unreadable, wrong channel count, an output that cannot be written, ...) is
logged with its name and the batch goes on; :func:`infer_many` returns the failures so the CLI
can list them and exit non-zero. An output folder that can never be written (a file in its place,
no write permission) stops the batch once, before the model is loaded.

The model is loaded once per batch (once per rank), and the next scan is read and preprocessed
in a background thread while the network runs on the current one (one scan ahead at most).
Under ``torchrun`` the scans are sharded across the ranks, balanced by voxel count from the
headers (:func:`shard`); each rank writes its own outputs. Every run, one process or many,
writes ``infer_summary.json`` (:func:`summary_path`) beside the outputs: per scan its status
(``ok``, ``failed``, ``pending`` while running, ``missing`` if its rank stopped reporting), rank,
voxels, error text and timing (``read_s``: reading and preprocessing, ``wait_s``: the part of it
the network waited for, all of it without prefetch), and when it was read and segmented
(``timeline_s``, seconds since its rank started).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import distributed
from ..config import to_dict
from ..data.io import (
    ImageReadError,
    atomic_write,
    case_name,
    is_image_path,
    itk_error_text,
    nifti_affine,
    read_channels,
    read_header,
    write_label_like,
    write_text,
)
from ..data.manifest import load_manifest
from ..runtime import resolve_device
from ..version import versions
from .predictor import Predictor

log = logging.getLogger(__name__)

__all__ = ["Job", "collect_inputs", "check_outputs", "infer_many", "shard", "scan_voxels", "summary_path", "SUMMARY_NAME"]

SUMMARY_NAME = "infer_summary.json"
RANKS_DIR = ".volseg-infer"  # per-rank records; hidden, so a folder of scans never lists it
RANK_STALL_S = 3600.0  # longer than any one scan takes: a rank silent for this long is given up on
POLL_S = 0.5


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
    for folder in sorted({j.output.parent for j in jobs} | ({summary_path(jobs).parent} if jobs else set())):
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

    # arr: (K, z, y, x) uint8 on the reference grid, from Predictor.predict(probabilities=True)
    out = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(3, 2, 1, 0)), nifti_affine(reference))
    out.header.set_slope_inter(1 / 255, 0.0)
    with atomic_write(path) as tmp:
        nib.save(out, str(tmp))
    return path


def summary_path(jobs: Sequence[Job]) -> Path:
    """``infer_summary.json`` in the folder that holds every output (the ``--output`` folder, or
    the folder of a single output file)."""
    return Path(os.path.commonpath([str(j.output.parent.absolute()) for j in jobs])) / SUMMARY_NAME


def scan_voxels(job: Job) -> int:
    """Voxels x channels of a job's scans from their headers only (no voxel data is read):
    :func:`~volseg.data.io.read_header`, slices x the first slice for a DICOM series. An unreadable header counts 0: the scan then fails, by name, on its rank."""
    total = 0
    for path in job.images:
        try:
            total += _header_voxels(Path(path))
        except Exception as exc:  # any reader error: the read on the rank reports it properly
            log.debug("%s: header not read for sharding (%s)", path, exc)
    return total


def _header_voxels(path: Path) -> int:
    if not path.is_dir():
        head = read_header(path)
        return int(np.prod(head.GetSize())) * head.GetNumberOfComponents()
    # DICOM: the series read_channels reads (the one with the most files), as slices x the
    # first slice's header (read_header would read the whole series)
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    files = max((reader.GetGDCMSeriesFileNames(str(path), uid) for uid in reader.GetGDCMSeriesIDs(str(path))), key=len)
    first = read_header(files[0])
    return int(np.prod(first.GetSize())) * first.GetNumberOfComponents() * len(files)


def shard(sizes: Sequence[int], world: int) -> List[int]:
    """The rank of each job: largest first, each to the rank with the fewest voxels so far
    (ties: the lower job index, the lower rank), so every rank gets about the same work."""
    load = [0] * world
    ranks = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        ranks[i] = r
        load[r] += max(1, sizes[i])  # an unreadable header still costs a turn
    return ranks


def infer_many(
    jobs: Sequence[Job],
    model: Union[str, Path],
    device: str = "auto",
    overrides: Optional[dict] = None,
    probabilities: bool = False,
    progress: bool = False,
    checkpoint: str = "best",
    prefetch: bool = True,
    stall_s: float = RANK_STALL_S,
) -> List[Tuple[Job, str]]:
    """Segment every job with the run in ``model``; return ``[(job, error message)]``.

    Under ``torchrun`` the jobs are sharded across the ranks by :func:`shard` and each rank
    segments its share (model loaded once per rank, on ``cuda:LOCAL_RANK`` with CUDA); rank 0
    returns every rank's failures and writes :func:`summary_path`, the others their own.
    ``prefetch``: read and preprocess the next scan in a background thread while the network
    runs on the current one (at most one scan ahead). ``stall_s``: how long rank 0 waits for a
    rank that reports no progress (no scan finished) before it writes the summary without it.
    """
    if not jobs:
        return []
    check_outputs(jobs)
    own_group = distributed.launched() and distributed.world_size() == 1  # under torchrun, group not joined yet
    if own_group:
        # gloo even on CUDA: the group's only traffic is one small broadcast (the shards) at the
        # start; gloo does it on the CPU, with no NCCL communicator taking GPU memory
        distributed.init("cpu")
    try:
        rank, world = distributed.rank(), distributed.world_size()
        out = summary_path(jobs)
        table = distributed.on_main(_shard_table, jobs, world)
        ranklog = _RankLog(out.parent / RANKS_DIR / table["token"], table["token"], rank)
        pred = _load_predictor(model, device, checkpoint, overrides, progress)
        mine = [i for i, r in enumerate(table["ranks"]) if r == rank]
        log.info("rank %d of %d: %d of %d scan(s) on %s", rank, world, len(mine), len(jobs), pred.device)
        refresh = (lambda: _write_summary(out, jobs, table, pred, _read_ranks(ranklog.folder, table["token"], world))) if rank == 0 else None
        records = _run_share(pred, jobs, mine, table, ranklog, probabilities, prefetch, progress and rank == 0, refresh)
        if rank == 0:
            records = _finish(out, jobs, table, pred, ranklog.folder, world, stall_s)
        return [(jobs[r["index"]], r.get("error") or r["status"]) for r in records if r["status"] != "ok"]
    finally:
        if own_group:
            distributed.shutdown()


def _load_predictor(model, device: str, checkpoint: str, overrides: Optional[dict], progress: bool):
    """The predictor, once per rank: on ``cuda:LOCAL_RANK`` under torchrun with CUDA (one
    process per GPU)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and distributed.launched():
        dev = distributed.local_cuda_device()
    return Predictor.from_run(model, device=dev, checkpoint=checkpoint, overrides=overrides, progress=progress and distributed.is_main())


def _shard_table(jobs: Sequence[Job], world: int) -> dict:
    """Rank 0: the shard of every job, and a token that names this run's folder of rank files
    (so another run into the same output folder never reads or removes them)."""
    sizes = [scan_voxels(j) for j in jobs]
    return {"token": uuid.uuid4().hex, "world_size": world, "ranks": shard(sizes, world), "voxels": sizes}


class _RankLog:
    """This rank's records, rewritten (atomically) after every scan to
    ``<summary folder>/.volseg-infer/<token>/rank-NNNNN.json``; rank 0 merges them.

    Why files and not a collective gather at the end: ranks finish at different times, and a
    rank waiting in a collective for a slower one runs into the process group's timeout (30 min
    for gloo) on a long batch; files need no waiting rank, record each scan as soon as it is
    done (a killed job leaves them behind), and let rank 0 give up on a rank that stopped
    reporting (``stall_s``) instead of hanging. Multi-node runs need the output folder on a
    shared file system, as they do for the masks anyway."""

    def __init__(self, folder: Path, token: str, rank: int):
        self.folder, self.token, self.rank = folder, token, rank
        self.records: List[dict] = []
        self.write(done=False)

    def write(self, done: bool) -> None:
        state = {"token": self.token, "rank": self.rank, "done": done, "scans": self.records}
        write_text(self.folder / f"rank-{self.rank:05d}.json", json.dumps(state))


def _read_ranks(folder: Path, token: str, world: int) -> Dict[int, dict]:
    """The rank files of this run (``token``) found so far."""
    states = {}
    for r in range(world):
        try:
            state = json.loads((folder / f"rank-{r:05d}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not written yet
            continue
        if state.get("token") == token:
            states[r] = state
    return states


def _run_share(pred, jobs, mine, table, ranklog: _RankLog, probabilities: bool, prefetch: bool, progress: bool, refresh) -> List[dict]:
    """Segment ``jobs[i] for i in mine`` in order, the next scan's read overlapping the current
    scan's network when ``prefetch``; a failure is recorded and the share goes on."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    clock = lambda: round(time.perf_counter() - t0, 4)  # noqa: E731 - seconds since this rank started
    pool = ThreadPoolExecutor(1, thread_name_prefix="volseg-prefetch", initializer=_thread_device, initargs=(pred.device,)) if prefetch else None
    bar = _bar(len(mine)) if progress else None
    ahead = None
    try:
        for n, i in enumerate(mine):
            job, current, ahead = jobs[i], ahead, None
            rec = {"index": i, "name": job.name, "inputs": [str(p) for p in job.images], "output": str(job.output),
                   "rank": ranklog.rank, "voxels": table["voxels"][i], "device": str(pred.device)}
            try:
                t = time.perf_counter()
                loaded = (current or pool.submit(_read, pred, job, clock)).result() if pool else _read(pred, job, clock)
                loaded["wait_s"] = time.perf_counter() - t  # the read time prefetching did not hide
                if pool and n + 1 < len(mine):  # only now: at most one scan ahead in memory
                    ahead = pool.submit(_read, pred, jobs[mine[n + 1]], clock)
                rec.update(_segment(pred, job, loaded, probabilities, clock), status="ok")
            except Exception as exc:  # noqa: BLE001 - one scan's failure, whatever it is, must not end the batch
                rec.update(status="failed", error=_error_line(exc))
                (log.error if isinstance(exc, (ImageReadError, ValueError, RuntimeError, OSError)) else log.exception)("%s: %s", job.name, rec["error"])
            ranklog.records.append(rec)
            ranklog.write(done=n + 1 == len(mine))
            if refresh:
                refresh()
            if bar is not None:
                bar.update(1)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    if not mine:
        ranklog.write(done=True)
    return ranklog.records


def _thread_device(device) -> None:
    """The prefetch thread's current CUDA device is its own (torch keeps it per thread); a
    plain ``cuda`` (no index) is already the current device."""
    if device.type == "cuda" and device.index is not None:
        import torch

        torch.cuda.set_device(device)


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="scan", desc="volseg infer")


def _read(pred, job: Job, clock) -> dict:
    """Read a job's channels and run the network-free part of the predictor on them."""
    start = clock()
    images = [img for p in job.images for img in read_channels(p)]  # a 4D file: its channels
    prepared = pred.prepare(images, source=str(job.images[0]))
    return {"images": images, "prepared": prepared, "read": [start, clock()]}


def _segment(pred, job: Job, loaded: dict, probabilities: bool, clock) -> dict:
    """The network and the writes for one read scan; returns its timing for the summary."""
    start, t0 = clock(), time.perf_counter()
    images = loaded["images"]
    out = pred.predict(images, source=str(job.images[0]), probabilities=probabilities, prepared=loaded["prepared"])
    write_label_like(out["labels"], job.images[0], images[0], job.output)
    prob_path = None
    if probabilities:
        prob_path = _write_probabilities(out["probabilities"], images[0], job.output.with_name(job.output.name.replace("_seg", "_prob")))
    read_s = loaded["read"][1] - loaded["read"][0]  # reading and preprocessing
    timing = {**{k: round(v, 3) for k, v in out["timing"].items()}, "read_s": round(read_s, 3), "wait_s": round(loaded["wait_s"], 3), "total_s": round(time.perf_counter() - t0 + read_s, 3)}
    sidecar = {
        "input": [str(p) for p in job.images],
        "output": str(job.output),
        "probabilities": str(prob_path) if prob_path else None,
        "model": pred.run_info,
        "labels": dict(zip(pred.plan.label_values, pred.plan.label_names)),
        "settings": {**to_dict(pred.infer), "device": str(pred.device)},
        "versions": versions(),
        "timing_s": timing,
    }
    write_text(_sidecar(job.output), json.dumps(sidecar, indent=2))
    log.info("%s -> %s (%.1fs)", job.name, job.output, timing["total_s"])
    return {"timing_s": timing, "timeline_s": {"read": loaded["read"], "segment": [start, clock()]}}


def _finish(out: Path, jobs, table, pred, folder: Path, world: int, stall_s: float) -> List[dict]:
    """Rank 0, its own share done: wait for every rank's last record, write the final summary,
    return its records. A rank whose file has not changed for ``stall_s`` is given up on: its
    unreported scans are ``missing`` and the rank files stay for inspection."""
    last, changed = None, time.monotonic()
    while True:
        states = _read_ranks(folder, table["token"], world)
        key = {r: (len(s["scans"]), s["done"]) for r, s in states.items()}
        if key != last:
            last, changed = key, time.monotonic()
            _write_summary(out, jobs, table, pred, states)
        done = all(states.get(r, {}).get("done") for r in range(world))
        if done or time.monotonic() - changed > stall_s:
            break
        time.sleep(POLL_S)
    stalled = [r for r in range(world) if not states.get(r, {}).get("done")]
    if stalled:
        log.error("rank(s) %s reported nothing for %.0f s; their unreported scans are listed as missing in %s", stalled, stall_s, out)
    summary = _write_summary(out, jobs, table, pred, states, final=True, stalled=stalled)
    if not stalled:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # another run's folder may still be there
            folder.parent.rmdir()
    return summary["scans"]


def _write_summary(out: Path, jobs, table, pred, states: Dict[int, dict], final: bool = False, stalled: Sequence[int] = ()) -> dict:
    """The merged summary, one entry per job in input order: the rank's record, else
    ``pending`` (still running) or, in the final summary, ``missing``."""
    got = {rec["index"]: rec for s in states.values() for rec in s["scans"]}
    scans = []
    for i, job in enumerate(jobs):
        rec = got.get(i)
        if rec is None:
            rank = table["ranks"][i]
            rec = {"index": i, "name": job.name, "inputs": [str(p) for p in job.images], "output": str(job.output), "rank": rank,
                   "voxels": table["voxels"][i], "status": "missing" if final else "pending"}
            if final:
                rec["error"] = f"rank {rank} stopped reporting" if rank in stalled else f"rank {rank} did not report it"
        scans.append(rec)
    counts = {k: sum(r["status"] == k for r in scans) for k in ("ok", "failed", "pending", "missing")}
    summary = {"complete": final and not stalled, "world_size": table["world_size"], "counts": counts, "model": pred.run_info, "scans": scans}
    write_text(out, json.dumps(summary, indent=2))
    return summary


def _sidecar(output: Path) -> Path:
    name = output.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return output.with_name(name[: -len(suffix)] + ".json")
    return output.with_name(name + ".json")

