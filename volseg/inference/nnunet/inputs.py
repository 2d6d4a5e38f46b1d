"""nnU-Net's input naming, ``CASE_XXXX.<ending>`` (one file per channel, XXXX = 0000, 0001, ...):
the channel files of a case become one job named CASE, whose mask is ``CASE_seg.nii.gz``."""

from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

from ...data.io import ImageReadError
from ..inputs import Job

__all__ = ["nnunet_jobs"]

_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


def nnunet_jobs(jobs: Sequence[Job], n_channels: int) -> List[Job]:
    """Group ``jobs`` (one per file, from :func:`~volseg.inference.collect_inputs`) by nnU-Net's
    channel suffix for a model taking ``n_channels``; a case must have every channel
    ``_0000 .. _{n-1:04d}``, else :class:`~volseg.data.io.ImageReadError` names what it has. A
    file without the suffix is a case of its own (a single-channel model only). An output file
    name given by hand is kept."""
    groups: Dict[Tuple[str, str], Dict[int, Job]] = {}
    order: List[Tuple[str, str]] = []
    out: List[Job] = []
    for job in jobs:
        m = _CHANNEL.match(job.name) if len(job.images) == 1 else None
        if m is None:
            if n_channels > 1 and len(job.images) != n_channels:
                raise ImageReadError(f"{job.images[0]}: the model takes {n_channels} channels, given as CASE_0000 .. CASE_{n_channels - 1:04d} files; "
                                     "this file has no _XXXX channel suffix.")
            out.append(job)
            continue
        key = (str(job.output.parent), m.group(1))
        if key not in groups:
            groups[key] = {}
            order.append(key)
            out.append(key)  # type: ignore[arg-type]  # placeholder, replaced below
        groups[key][int(m.group(2))] = job
    result: List[Job] = []
    for item in out:
        if isinstance(item, Job):
            result.append(item)
            continue
        case = item[1]
        chans = groups[item]
        if sorted(chans) != list(range(n_channels)):
            have = [f"{case}_{c:04d}" for c in sorted(chans)]
            raise ImageReadError(f"{case}: channel files {have}; the model takes {n_channels} channel(s): "
                                 f"{[f'{case}_{c:04d}' for c in range(n_channels)]}.")
        first = chans[0]
        default = first.output.name == f"{first.name}_seg.nii.gz"
        output = first.output.with_name(f"{case}_seg.nii.gz") if default else first.output
        result.append(Job(case, tuple(chans[c].images[0] for c in range(n_channels)), output))
    return result
