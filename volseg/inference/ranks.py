"""A batch across ``torchrun`` ranks: each job's rank (balanced by voxel count from the headers),
each rank's record file, and rank 0's merged ``infer_summary.json``."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ..data.io import read_header, write_text
from .inputs import Job

log = logging.getLogger(__name__)

__all__ = ["shard", "scan_voxels"]

RANKS_DIR = ".volseg-infer"  # per-rank records; hidden, so a folder of scans never lists it
RANK_STALL_S = 3600.0  # longer than any one scan takes: a rank silent for this long is given up on
POLL_S = 0.5


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
