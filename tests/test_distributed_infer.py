"""Batch inference: sharding by size, a real 2-process torchrun (gloo, CPU) against one process,
the merged summary, a failed scan and a silent rank, and prefetching the next scan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from volseg.cli import main
from volseg.data.io import write_image
from volseg.data.synth import make_case
from volseg.inference.batch import collect_inputs, infer_many, scan_voxels, shard

# odd shapes, three formats; sizes differ so the shards are balanced by voxels, not by count
SCANS = [("a", (30, 26, 20), ".nii.gz"), ("b", (20, 18, 16), ".nrrd"), ("c", (24, 22, 17), ".mha"),
         ("d", (18, 20, 16), ".nii.gz"), ("e", (22, 16, 18), ".nii")]


def _write(folder: Path, name: str, shape, suffix: str) -> Path:
    image, _ = make_case(len(name) + ord(name[0]), "ct", shape, (1.6, 1.4, 2.0))
    return write_image(sitk.Cast(image, sitk.sitkInt16), folder / f"{name}{suffix}")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("batch_scans")
    for name, shape, suffix in SCANS:
        _write(folder, name, shape, suffix)
    return folder


def _arrays(folder: Path) -> dict:
    """Mask arrays and geometry by case name."""
    out = {}
    for p in sorted(folder.glob("*_seg.nii.gz")):
        img = nib.load(str(p))
        out[p.name] = (np.asarray(img.dataobj), img.affine, img.header.get_data_dtype())
    return out


def _torchrun(nproc: int, folder: Path, run: Path, out: Path, device: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m volseg infer`` through the real entry point."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "volseg", "infer", str(folder), "--model", str(run), "--output", str(out), "--device", device]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_shard_balances_voxels_not_counts():
    sizes = [100, 10, 10, 10, 10, 60]
    ranks = shard(sizes, 2)
    load = [sum(s for s, r in zip(sizes, ranks) if r == k) for k in (0, 1)]
    assert sorted(load) == [100, 100]  # round-robin by count would give 120 / 80
    assert shard(sizes, 2) == ranks  # deterministic: every run shards the same way
    assert shard([5], 3) == [0] and sorted(shard([1, 1, 1], 3)) == [0, 1, 2]


def test_scan_voxels_reads_headers(scans, tmp_path):
    jobs = {j.name: j for j in collect_inputs([scans])}
    for name, _, _ in SCANS:
        assert scan_voxels(jobs[name]) == int(np.prod(sitk.ReadImage(str(jobs[name].images[0])).GetSize())), name
    (tmp_path / "junk.nii.gz").write_bytes(b"not a scan")
    assert scan_voxels(collect_inputs([tmp_path / "junk.nii.gz"])[0]) == 0  # fails later, on its rank


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_summary(tiny_run, scans, tmp_path):
    """A truncated scan fails on its rank; the others are segmented exactly as by one process."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in scans.iterdir():
        (folder / p.name).symlink_to(p)
    good = (scans / "e.nii").read_bytes()
    (folder / "cut.nii").write_bytes(good[: len(good) // 2])  # header intact: it gets a rank by size

    one = tmp_path / "one"
    # the ranks run one thread each (OMP_NUM_THREADS=1) and CPU reductions (group norm in
    # channels_last) depend on the thread count, so the single process runs one thread too: the
    # comparison is of the sharding, not of the threading
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["-q", "infer", str(folder), "--model", str(tiny_run), "--output", str(one), "--device", "cpu"]) == 1
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    proc = _torchrun(2, folder, tiny_run, two, "cpu")
    assert proc.returncode != 0, proc.stderr[-3000:]  # one scan failed
    assert "FAILED cut" in proc.stderr, proc.stderr[-3000:]
    for name, _, _ in SCANS:  # each scan segmented by one rank only (its log line: "a -> .../a_seg.nii.gz")
        assert proc.stderr.count(f"{name} -> ") == 1, proc.stderr[-3000:]
    assert "rank 0 of 2" in proc.stderr and "rank 1 of 2" in proc.stderr

    a, b = _arrays(one), _arrays(two)
    assert sorted(a) == sorted(b) == sorted(f"{n}_seg.nii.gz" for n, _, _ in SCANS)
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)
        assert a[name][2] == b[name][2]

    summary = json.loads((two / "infer_summary.json").read_text())
    assert summary["complete"] and summary["world_size"] == 2
    names = [s["name"] for s in summary["scans"]]
    assert sorted(names) == sorted([n for n, _, _ in SCANS] + ["cut"])  # each scan once
    status = {s["name"]: s["status"] for s in summary["scans"]}
    assert status.pop("cut") == "failed" and set(status.values()) == {"ok"}
    assert {s["rank"] for s in summary["scans"]} == {0, 1}
    cut = next(s for s in summary["scans"] if s["name"] == "cut")
    assert "cut.nii" in cut["error"]
    assert summary["counts"] == {"ok": len(SCANS), "failed": 1, "pending": 0, "missing": 0}
    assert not (two / ".volseg-infer").exists()  # rank files removed after a complete merge
    one_summary = json.loads((one / "infer_summary.json").read_text())  # one format for one process
    assert one_summary["world_size"] == 1 and {s["rank"] for s in one_summary["scans"]} == {0}


def test_prefetch_same_outputs_and_reads_ahead(tiny_run, scans, tmp_path, monkeypatch):
    from volseg.inference import Predictor

    loads, from_run = [], Predictor.from_run
    monkeypatch.setattr(Predictor, "from_run", staticmethod(lambda *a, **k: loads.append(a) or from_run(*a, **k)))
    timelines = {}
    for prefetch in (True, False):
        out = tmp_path / str(prefetch)
        jobs = collect_inputs([scans / f"{n}{s}" for n, _, s in SCANS[:3]], out)
        assert infer_many(jobs, tiny_run, device="cpu", prefetch=prefetch) == []
        timelines[prefetch] = [s["timeline_s"] for s in json.loads((out / "infer_summary.json").read_text())["scans"]]
    assert len(loads) == 2  # the model is loaded once per batch, not once per scan
    a, b = _arrays(tmp_path / "True"), _arrays(tmp_path / "False")
    assert sorted(a) == sorted(b) and len(a) == 3
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
    # with prefetch, the next scan's read starts before the current scan's network and writes end
    # (it is submitted before they begin); without, only after
    ahead = [nxt["read"][0] < cur["segment"][1] for cur, nxt in zip(timelines[True], timelines[True][1:])]
    after = [nxt["read"][0] >= cur["segment"][1] for cur, nxt in zip(timelines[False], timelines[False][1:])]
    assert all(ahead) and all(after), timelines


def test_silent_rank_does_not_hang_rank_0(tiny_run, scans, tmp_path, monkeypatch):
    """Rank 0 of a 2-rank job whose rank 1 never reports: after ``stall_s`` it writes the
    summary with rank 1's scans as missing and returns them as failures."""
    from volseg import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    jobs = collect_inputs([scans / f"{n}{s}" for n, _, s in SCANS[:3]], tmp_path / "out")
    failures = infer_many(jobs, tiny_run, device="cpu", stall_s=1.0)
    summary = json.loads((tmp_path / "out" / "infer_summary.json").read_text())
    missing = [s["name"] for s in summary["scans"] if s["status"] == "missing"]
    assert not summary["complete"] and missing and sorted(j.name for j, _ in failures) == sorted(missing)
    assert all(s["rank"] == 1 for s in summary["scans"] if s["status"] == "missing")
    assert all(s["status"] == "ok" for s in summary["scans"] if s["rank"] == 0)
    assert (tmp_path / "out" / ".volseg-infer").is_dir()  # kept for inspection


@pytest.mark.cuda
def test_prefetch_on_cuda_matches(tiny_run, scans, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    for prefetch in (True, False):
        jobs = collect_inputs([scans / f"{n}{s}" for n, _, s in SCANS[:3]], tmp_path / str(prefetch))
        assert infer_many(jobs, tiny_run, device="cuda", prefetch=prefetch) == []
    a, b = _arrays(tmp_path / "True"), _arrays(tmp_path / "False")
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)


@pytest.mark.cuda
def test_two_gpus_one_process_each(tiny_run, scans, tmp_path):
    """Two ranks on two GPUs (cuda:LOCAL_RANK) against one process on one GPU."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    assert main(["-q", "infer", str(scans), "--model", str(tiny_run), "--output", str(tmp_path / "one"), "--device", "cuda"]) == 0
    proc = _torchrun(2, scans, tiny_run, tmp_path / "two", "cuda")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on cuda:0" in proc.stderr and "on cuda:1" in proc.stderr
    a, b = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == len(SCANS)
    for name in a:  # AMP windows on two devices: allow a rare argmax tie to fall differently
        assert (a[name][0] != b[name][0]).mean() < 1e-3, name
