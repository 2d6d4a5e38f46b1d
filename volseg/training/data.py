"""Training and validation data: cached preprocessed cases and the patch loader.

The deterministic part of the pipeline (read, reorient, resample, normalise, class indices,
padding to the crop size) is MONAI transforms (:class:`PreprocessCased` first), so MONAI's
``CacheDataset``/``PersistentDataset`` keep its output and only the random crops and
augmentations run per step. ``data.cache``:

* ``memory``: every case is preprocessed once per run, in the main process, into RAM. The size is
  estimated from the plan and the image headers before filling (voxels at the target spacing x
  (4 bytes per channel + 1 label byte + 8 index bytes)); when it would take more than
  :data:`MEMORY_FRACTION` of the available RAM, the disk cache is used instead (logged warning).
* ``disk``: preprocessed cases are ``.pt`` files (MONAI ``PersistentDataset``, read back with
  ``weights_only=True``) under ``data.cache_dir`` (default: ``volseg_cache/`` beside the run
  folder, so runs in one parent folder share it), in a subfolder named by a hash of the plan JSON
  and :data:`CACHE_VERSION`, then ``train/`` and ``val/``. A second run with the same plan reuses
  them and preprocesses nothing; a case file changed since (size or mtime; not checked inside
  DICOM folders) is preprocessed again.
  Missing entries are filled in the main process before the loader starts, so workers never
  preprocess the same case twice. Under torchrun each rank caches (in memory or on disk) only its
  own shard of the cases (:func:`volseg.distributed.shard`), so N processes fill the cache in
  parallel and a machine's RAM holds each case once.
* ``none``: preprocess on every access (only sensible for tiny data).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from monai.transforms import MapTransform

from .. import distributed
from ..config import Config
from ..data.io import read_header
from ..data.manifest import Case
from ..data.plan import PreprocessingPlan
from ..data.transforms import cached_transforms, random_transforms
from ..preprocessing import preprocess_case
from ..version import __version__

log = logging.getLogger(__name__)

__all__ = ["PreprocessCased", "build_datasets", "cache_folder", "estimate_cache_bytes", "available_ram_bytes", "CACHE_VERSION"]

# bump when preprocessing or the cached transforms change what they produce for the same plan
CACHE_VERSION = 2  # 2: cases smaller than the patch are edge-padded (were zero-padded)
# a memory cache may take at most this share of the RAM available when training starts
MEMORY_FRACTION = 0.6
# bytes cached per voxel besides the image channels: label (uint8) + class indices (int64)
_LABEL_AND_INDEX_BYTES = 1 + 8


class PreprocessCased(MapTransform):
    """``{"name", "image": [paths], "label": path}`` -> ``{"name", "image": (C,X,Y,Z) float32,
    "label": (1,X,Y,Z) uint8 class indices}`` by replaying ``plan``. Deterministic, so MONAI's
    datasets cache its output."""

    def __init__(self, plan: PreprocessingPlan):
        super().__init__(keys=["image", "label"])
        self.plan = plan

    def __call__(self, data: dict) -> dict:
        case = Case(data["name"], tuple(Path(p) for p in data["image"]), Path(data["label"]))
        out = preprocess_case(case, self.plan)
        out["name"] = data["name"]
        return out


def items(cases: Sequence[Case]) -> List[dict]:
    """Dataset items; ``stamp`` (size and mtime of every file) makes a changed file a cache miss."""

    def stamp(p: Path) -> str:
        st = p.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"

    out = []
    for c in cases:
        files = list(c.images) + [c.label]
        out.append({"name": c.name, "image": [str(p) for p in c.images], "label": str(c.label),
                    "stamp": [stamp(Path(p)) if Path(p).is_file() else "dir" for p in files]})
    return out


def cache_folder(plan: PreprocessingPlan, cfg: Config, run: Path) -> Path:
    """``<data.cache_dir or RUN/../volseg_cache>/<hash of plan + cache version>``."""
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(run).resolve().parent / "volseg_cache"
    key = hashlib.sha1(f"{plan.to_json()}\n{CACHE_VERSION}\n{__version__}".encode()).hexdigest()[:16]
    return root / key


def _voxels(case: Case, plan: PreprocessingPlan) -> float:
    head = read_header(case.images[0])
    size, spacing = head.GetSize()[:3], head.GetSpacing()[:3]
    # reorientation permutes axes, so the product of extents is what matters
    return float(np.prod(np.array(size, float) * np.array(spacing)) / np.prod(plan.spacing))


def estimate_cache_bytes(cases: Sequence[Case], plan: PreprocessingPlan, with_indices: bool = True) -> int:
    """Bytes a memory cache of ``cases`` takes: voxels at the plan's spacing x (4 bytes per
    channel + 1 label byte + 8 bytes of class indices when ``with_indices``)."""
    per_voxel = 4 * len(plan.channels) + (_LABEL_AND_INDEX_BYTES if with_indices else 1)
    return int(sum(_voxels(c, plan) for c in cases) * per_voxel)


def available_ram_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (Linux), else free physical pages (POSIX)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _choose_cache(cfg: Config, train_cases, val_cases, plan: PreprocessingPlan) -> str:
    """``data.cache``, or ``disk`` when a memory cache would not fit. Under torchrun the cases
    are this rank's shard, and the processes on one machine share its RAM: the estimate is
    multiplied by their number (``LOCAL_WORLD_SIZE``)."""
    if cfg.data.cache != "memory":
        return cfg.data.cache
    procs = distributed.local_world_size()
    need = procs * (estimate_cache_bytes(train_cases, plan) + estimate_cache_bytes(val_cases, plan, with_indices=False))
    avail = available_ram_bytes()
    across = f" ({procs} processes on this machine, each caching its share)" if procs > 1 else ""
    if need > MEMORY_FRACTION * avail:
        log.warning("data.cache=memory would need about %.1f GiB%s, more than %.0f%% of the %.1f GiB of RAM available; "
                    "using the disk cache instead", need / 2**30, across, 100 * MEMORY_FRACTION, avail / 2**30)
        return "disk"
    log.info("memory cache: about %.2f GiB%s of %.1f GiB available", need / 2**30, across, avail / 2**30)
    return "memory"


def _dataset(kind: str, data: List[dict], transforms: list, folder: Optional[Path], threads: int):
    """The dataset of ``kind``, filled now for the caches. A case that fails to preprocess
    raises its own error (MONAI wraps it in ``RuntimeError("applying transform ...")``), so the
    user reads the one line that names the case."""
    try:
        return _build(kind, data, transforms, folder, threads)
    except RuntimeError as exc:
        cause = exc.__cause__
        while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, (ValueError, OSError)):
            raise cause from None
        raise


def _build(kind: str, data: List[dict], transforms: list, folder: Optional[Path], threads: int):
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.transforms import Compose

    transform = Compose(transforms).flatten()  # CacheDataset caches up to the first random transform
    if kind == "memory":
        # copy_cache=False: the random part starts with RandCropByLabelClassesd, which makes new
        # dicts and crops without writing into the cached arrays (tested), while a deep copy of a
        # cached 512x512x200 CT with its class indices takes 1.0 s per draw (measured)
        return CacheDataset(data, transform, num_workers=threads, progress=False, copy_cache=False)
    if kind == "disk":
        ds = PersistentDataset(data, transform, cache_dir=folder)
        _fill_disk_cache(ds, data, transform, folder)
        return ds
    return Dataset(data, transform)


def _fill_disk_cache(ds, data: List[dict], transform, folder: Path) -> None:
    """Preprocess the entries missing from ``folder`` now, in this process (workers would
    race for the same case)."""
    from monai.data import PersistentDataset
    from monai.data.utils import pickle_hashing

    missing = [d for d in data if not (folder / f"{pickle_hashing(d).decode('utf-8')}.pt").is_file()]
    if not missing:
        return
    from monai.transforms import RandomizableTrait, Transform

    first_random = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    head = transform.transforms[:first_random] if first_random is not None else transform.transforms
    filler = PersistentDataset(missing, list(head), cache_dir=folder)
    for i in range(len(filler)):
        filler[i]


def build_datasets(train_cases: Sequence[Case], val_cases: Sequence[Case], plan: PreprocessingPlan, cfg: Config, run: Path, num_samples: int):
    """(training dataset, validation dataset, training transform). Training items are cached
    after padding and class indexing and yield ``num_samples`` augmented patches each;
    validation items are whole preprocessed cases ``{"image", "label"}``."""
    t0 = time.perf_counter()
    kind = _choose_cache(cfg, train_cases, val_cases, plan)
    folder = cache_folder(plan, cfg, run) if kind == "disk" else None
    threads = None if kind == "memory" and cfg.data.num_workers else 0
    head = [PreprocessCased(plan)] + list(cached_transforms(plan).transforms)
    train_ds = _dataset(kind, items(train_cases), head + list(random_transforms(plan, cfg, num_samples).transforms),
                        folder / "train" if folder else None, threads)
    val_ds = _dataset(kind, items(val_cases), [PreprocessCased(plan)], folder / "val" if folder else None, threads)
    where = f" in {folder}" if folder else ""
    log.info("data cache %s%s: %d training + %d validation cases ready in %.1f s", kind, where, len(train_cases), len(val_cases),
             time.perf_counter() - t0)
    return train_ds, val_ds, train_ds.transform
