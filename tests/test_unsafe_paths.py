"""A header never makes volseg read outside its folder, an output never replaces an input or a
device node, and a FIFO named like a scan never blocks a run."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volseg.cli import main
from volseg.data.io import ImageReadError, UnsafeOutputError, detached_data_files, read_image, refuse_unsafe_outputs

MHD = "NDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nElementDataFile = {}\n"
NHDR = "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: {}\n\n"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def tree(tmp_path):
    """scans/ (the header's folder) with data in it and below it; outside/ beside it; links of
    every kind inside scans/."""
    scans, outside = tmp_path / "scans", tmp_path / "outside"
    (scans / "sub").mkdir(parents=True)
    outside.mkdir()
    for p in (scans / "in.raw", scans / "sub" / "below.raw", outside / "out.raw"):
        p.write_bytes(bytes(range(64)))
    (scans / "link_in.raw").symlink_to(scans / "in.raw")
    (scans / "link_out.raw").symlink_to(outside / "out.raw")
    (scans / "link_dev.raw").symlink_to("/dev/zero")
    os.link(outside / "out.raw", scans / "hard.raw")  # a hard link is a regular file here
    os.mkfifo(scans / "fifo.raw")
    return scans


ALLOWED = ["in.raw", "sub/below.raw", "./in.raw", "sub/../in.raw", "link_in.raw", "hard.raw", "{scans}/in.raw"]
REFUSED = ["../outside/out.raw", "{outside}/out.raw", "/etc/passwd", "/dev/urandom", "link_out.raw", "link_dev.raw",
           "fifo.raw", "sub", "missing.raw", "sub/../../outside/out.raw"]


@pytest.mark.parametrize("fmt", [MHD, NHDR], ids=["mhd", "nhdr"])
@pytest.mark.parametrize("entry", ALLOWED + REFUSED)
def test_detached_data_file_must_be_a_regular_file_in_the_headers_folder(fmt, entry, tree):
    allowed = entry in ALLOWED
    entry = entry.format(scans=tree, outside=tree.parent / "outside")
    header = tree / ("h.mhd" if fmt is MHD else "h.nhdr")
    header.write_text(fmt.format(entry))
    if allowed:
        assert read_image(header).GetSize() == (4, 4, 4)
        return
    with pytest.raises(ImageReadError) as info:
        read_image(header)
    msg = str(info.value)
    assert str(header) in msg and entry[:40] in msg and len(msg) < 600, msg


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(["..", ".", "sub", "in.raw", "below.raw", "link_out.raw", "fifo.raw", "x"]), min_size=1, max_size=5),
       absolute=st.booleans())
def test_detached_data_rule_over_generated_paths(parts, absolute, tree):
    """Whatever the path, a data file is accepted exactly when it resolves to a regular file in
    the header's folder or below it."""
    entry = "/".join(parts)
    if absolute:
        entry = str(tree) + "/" + entry
    header = tree / "g.mhd"
    header.write_text(MHD.format(entry))
    target = (tree / entry).resolve()
    inside = target == tree.resolve() or tree.resolve() in target.parents
    ok = inside and target.is_file() and stat.S_ISREG(target.stat().st_mode)
    if ok:
        assert detached_data_files(header) == [target]
    else:
        with pytest.raises(ImageReadError):
            detached_data_files(header)


def test_pattern_and_list_data_files_are_each_checked(tree):
    for i in range(4):
        (tree / f"s{i}.raw").write_bytes(bytes(16))
    header = tree / "p.mhd"
    header.write_text("NDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nElementDataFile = s%d.raw 0 3 1\n")
    assert read_image(header).GetSize() == (4, 4, 4)
    header.write_text("NDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nElementDataFile = LIST\ns0.raw\ns1.raw\n../outside/out.raw\ns3.raw\n")
    with pytest.raises(ImageReadError, match="outside the header's folder"):
        read_image(header)


def test_a_fifo_named_like_a_scan_is_refused_or_skipped_without_blocking(tiny_run, tiny_dataset, tmp_path, capsys, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    scan = next(p for p in sorted(tiny_dataset.parent.rglob("*.nii.gz")) if "label" not in str(p))
    (folder / "real.nii.gz").write_bytes(scan.read_bytes())
    os.mkfifo(folder / "pipe.nii.gz")
    signal.alarm(120)  # opening the FIFO would block forever: fail instead of hanging the suite
    try:
        rc_file = main(["infer", str(folder / "pipe.nii.gz"), "--model", str(tiny_run), "--output", str(tmp_path / "o1")])
        err_file = capsys.readouterr().err
        rc_dir = main(["infer", str(folder), "--model", str(tiny_run), "--output", str(tmp_path / "o2")])
        err_dir = capsys.readouterr().err
    finally:
        signal.alarm(0)
    assert rc_file == 2 and "pipe.nii.gz" in err_file and "FIFO" in err_file and "Traceback" not in err_file
    assert rc_dir == 0 and "pipe.nii.gz: skipped" in (err_dir + caplog.text)
    assert (tmp_path / "o2" / "real_seg.nii.gz").is_file() and not (tmp_path / "o2" / "pipe_seg.nii.gz").exists()


@pytest.mark.parametrize("how", ["same path", "relative spelling", "hard link", "symlink", "fifo"])
def test_infer_never_replaces_its_input_or_a_non_regular_file(how, tiny_run, tiny_dataset, tmp_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(next(p for p in sorted(tiny_dataset.parent.rglob("*.nii.gz")) if "label" not in str(p)).read_bytes())
    before = _sha(scan)
    out = {"same path": scan, "relative spelling": tmp_path / "x" / ".." / "scan.nii.gz", "hard link": tmp_path / "hard.nii.gz",
           "symlink": tmp_path / "link.nii.gz", "fifo": tmp_path / "fifo.nii.gz"}[how]
    if how == "hard link":
        os.link(scan, out)
    elif how == "symlink":
        (tmp_path / "other.nii.gz").write_bytes(b"keep")
        out.symlink_to(tmp_path / "other.nii.gz")
    elif how == "fifo":
        os.mkfifo(out)
    (tmp_path / "x").mkdir()
    rc = main(["infer", str(scan), "--model", str(tiny_run), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and str(out) in err.splitlines()[-1], err[-1500:]
    assert _sha(scan) == before
    if how == "symlink":
        assert out.is_symlink() and (tmp_path / "other.nii.gz").read_bytes() == b"keep"
    if how == "fifo":
        assert stat.S_ISFIFO(os.lstat(out).st_mode)
    assert not list(tmp_path.glob(".volseg-tmp-*"))


def test_export_never_replaces_a_device_node_or_a_run_file(tiny_run, tmp_path, capsys):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    checkpoint = sorted(tiny_run.glob("*.pt"))[0]
    before = _sha(checkpoint)
    for out in (fifo, checkpoint):
        rc = main(["export", str(tiny_run), "--output", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and str(out) in err and "Traceback" not in err, err[-1500:]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and _sha(checkpoint) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device node needs root")
def test_a_device_node_is_never_replaced(tmp_path):
    node = tmp_path / "full"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # the numbers of /dev/full
    with pytest.raises(UnsafeOutputError, match="character device"):
        refuse_unsafe_outputs([node])
    from volseg.data.io import write_text

    with pytest.raises(UnsafeOutputError):
        write_text(node, "x")
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    with pytest.raises(ImageReadError, match="character device"):
        read_image(node)


def test_unrelated_regular_outputs_are_replaced(tmp_path):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    refuse_unsafe_outputs([b], [a])  # b is not an input: replacing it is a rerun
    with pytest.raises(UnsafeOutputError, match="is an input"):
        refuse_unsafe_outputs([b], [a, b])
    assert np.array_equal(np.frombuffer(b.read_bytes(), np.uint8), np.frombuffer(b"b", np.uint8))
