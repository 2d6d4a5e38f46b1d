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

The modules: :mod:`.inputs` (jobs, output checks), :mod:`.ranks` (sharding, rank records, the
summary), :mod:`.scan` (one scan read, segmented, written) and this one, which runs a batch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from .. import distributed
from ..config import ConfigError
from ..data.io import ImageReadError
from ..runtime import resolve_device
from .inputs import STATISTICS_NAME, SUMMARY_NAME, Job, check_formats, check_outputs, collect_inputs, summary_path
from .predictor import Predictor
from .ranks import RANK_STALL_S, RANKS_DIR, _finish, _RankLog, _read_ranks, _shard_table, _write_summary, scan_voxels, shard
from .scan import _error_line, _read, _segment

log = logging.getLogger(__name__)

__all__ = ["Job", "collect_inputs", "jobs_for_model", "check_outputs", "infer_many", "shard", "scan_voxels", "summary_path", "SUMMARY_NAME"]


def infer_many(
    jobs: Sequence[Job],
    model: Union[str, Path],
    device: str = "auto",
    overrides: Optional[dict] = None,
    probabilities: bool = False,
    progress: bool = False,
    checkpoint: Optional[str] = None,
    prefetch: bool = True,
    stall_s: float = RANK_STALL_S,
    formats: Sequence[str] = ("nifti",),
    statistics: bool = False,
    folds: Optional[Sequence[str]] = None,
) -> List[Tuple[Job, str]]:
    """Segment every job with the run in ``model``; return ``[(job, error message)]``.

    Under ``torchrun`` the jobs are sharded across the ranks by :func:`shard` and each rank
    segments its share (model loaded once per rank, on ``cuda:LOCAL_RANK`` with CUDA); rank 0
    returns every rank's failures and writes :func:`summary_path`, the others their own.
    ``prefetch``: read and preprocess the next scan in a background thread while the network
    runs on the current one (at most one scan ahead). ``stall_s``: how long rank 0 waits for a
    rank that reports no progress (no scan finished) before it writes the summary without it.
    ``formats``: any of ``nifti``, ``dicom-seg``, ``rtstruct`` (the DICOM ones only for DICOM
    series inputs: checked before the model loads, :func:`~.inputs.check_formats`);
    ``statistics``: also ``<case>_stats.json`` per scan and ``statistics.csv`` for the batch.
    ``model`` may be an nnU-Net v2 model folder (:mod:`volseg.inference.nnunet`; give its
    jobs through :func:`jobs_for_model` so nnU-Net's ``CASE_XXXX`` channel files group into
    cases). ``checkpoint``: ``best`` or ``last`` for volseg runs (default ``best``), ``final``
    or ``best`` for nnU-Net folders (default ``final``); ``folds``: the ``fold_K`` folders
    to ensemble (default: all).
    """
    if not jobs:
        return []
    formats = check_formats(jobs, formats)
    check_outputs(jobs, formats, probabilities, statistics)
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
        pred = _load_predictor(model, device, checkpoint, overrides, progress, folds)
        mine = [i for i, r in enumerate(table["ranks"]) if r == rank]
        log.info("rank %d of %d: %d of %d scan(s) on %s", rank, world, len(mine), len(jobs), pred.device)
        refresh = (lambda: _write_summary(out, jobs, table, pred, _read_ranks(ranklog.folder, table["token"], world))) if rank == 0 else None
        writes = {"probabilities": probabilities, "formats": formats, "statistics": statistics}
        records = _run_share(pred, jobs, mine, table, ranklog, writes, prefetch, progress and rank == 0, refresh)
        if rank == 0:
            records = _finish(out, jobs, table, pred, ranklog.folder, world, stall_s)
            if statistics:
                _write_statistics_csv(out.parent / STATISTICS_NAME, [jobs[r["index"]] for r in records if r["status"] == "ok"])
        return [(jobs[r["index"]], r.get("error") or r["status"]) for r in records if r["status"] != "ok"]
    finally:
        if own_group:
            distributed.shutdown()


def _load_predictor(model, device: str, checkpoint: Optional[str], overrides: Optional[dict], progress: bool, folds: Optional[Sequence[str]] = None):
    """The predictor, once per rank: on ``cuda:LOCAL_RANK`` under torchrun with CUDA (one
    process per GPU). An nnU-Net model folder gets :class:`~.nnunet.NnUNetPredictor`."""
    from .nnunet import NnUNetPredictor, is_nnunet_folder

    dev = resolve_device(device)
    if dev.type == "cuda" and distributed.launched():
        dev = distributed.local_cuda_device()
    show = progress and distributed.is_main()
    models = [model] if isinstance(model, (str, Path)) else list(model)
    nnunet = [m for m in models if is_nnunet_folder(m)]
    if nnunet:
        if len(models) > 1:
            raise ConfigError(f"--model: {nnunet[0]} is an nnU-Net model folder; it cannot be ensembled with other folders yet (give it alone).")
        return NnUNetPredictor.from_folder(models[0], folds, checkpoint, overrides, dev, show)
    if checkpoint not in (None, "best", "last"):
        raise ConfigError(f"--checkpoint {checkpoint!r}: a volseg run has best or last ('final' and 'best' are nnU-Net's).")
    if folds:
        if len(models) > 1:
            raise ConfigError("--folds picks folds of one cross-validation folder; give a single --model with it.")
        picked = [Path(models[0]) / f"fold_{k}" for k in folds]
        missing = [str(p) for p in picked if not p.is_dir()]
        if missing:
            raise ConfigError(f"--folds {list(folds)}: no such fold folder(s) {missing}.")
        model = picked
    return Predictor.from_run(model, device=dev, checkpoint=checkpoint or "best", overrides=overrides, progress=show)


def jobs_for_model(jobs: Sequence[Job], model) -> List[Job]:
    """``jobs`` as ``model`` takes them: for an nnU-Net model folder, its ``CASE_XXXX`` channel
    files grouped into one job per case (:func:`~.nnunet.inputs.nnunet_jobs`); else unchanged."""
    from .nnunet import is_nnunet_folder, nnunet_channels
    from .nnunet.inputs import nnunet_jobs

    models = [model] if isinstance(model, (str, Path)) else list(model)
    if len(models) == 1 and is_nnunet_folder(models[0]):
        return nnunet_jobs(jobs, nnunet_channels(models[0]))
    return list(jobs)


def _write_statistics_csv(path: Path, jobs: Sequence[Job]) -> None:
    """The batch's ``statistics.csv`` from its scans' ``<case>_stats.json`` (every rank's)."""
    import json

    from ..data.io import write_text
    from ..stats import statistics_csv

    write_text(path, statistics_csv([json.loads(j.stats.read_text(encoding="utf-8")) for j in jobs if j.stats.is_file()]))
    log.info("wrote %s", path)


def _run_share(pred, jobs, mine, table, ranklog: _RankLog, writes: dict, prefetch: bool, progress: bool, refresh) -> List[dict]:
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
                rec.update(_segment(pred, job, loaded, writes["probabilities"], clock, writes["formats"], writes["statistics"]), status="ok")
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
