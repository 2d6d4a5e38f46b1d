"""A full disk: the failing write names the file the user asked for, leaves nothing under an
output name (no mask without its sidecar), and keeps the previous checkpoint."""

from __future__ import annotations

import errno
import pathlib

import torch

from volseg.cli import main
from volseg.data.io import TEMP_PREFIX

from .conftest import TINY


def _fill_disk_on(monkeypatch, suffix: str) -> None:
    """Writes of files ending in ``suffix`` (through ``Path.write_text``) get half their bytes
    out, then ENOSPC: what a full disk does."""
    real = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name.endswith(suffix):
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def test_infer_on_a_full_disk_leaves_no_mask_and_names_the_file(tiny_run, tiny_dataset, tmp_path, monkeypatch, capsys):
    scan = next(p for p in sorted(tiny_dataset.parent.rglob("*.nii.gz")) if "label" not in str(p))
    out = tmp_path / "pred"
    _fill_disk_on(monkeypatch, "_seg.json")  # the mask is written, then its sidecar fails
    rc = main(["infer", str(scan), "--model", str(tiny_run), "--output", str(out)])
    err = capsys.readouterr().err
    name = scan.name.replace(".nii.gz", "")
    assert rc == 1 and "Traceback" not in err
    assert f"cannot write {out / (name + '_seg.json')}: No space left on device" in err, err[-1500:]
    assert not (out / f"{name}_seg.nii.gz").exists() and not (out / f"{name}_seg.json").exists()
    assert not list(out.glob(TEMP_PREFIX + "*"))


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(tiny_dataset, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    args = ["train", str(tiny_dataset), "--output", str(run), "--device", "cpu"] + sum((["--set", s] for s in TINY), [])
    real, saves = torch.save, []

    def save(obj, f, *a, **k):
        saves.append(pathlib.Path(f).name)
        if saves.count("last.pt") > 1 and str(f).endswith("last.pt"):  # the first epoch's last.pt goes through
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].endswith(f"cannot write {run / 'last.pt'}: No space left on device"), err[-1500:]
    state = torch.load(run / "last.pt", weights_only=True)  # the first epoch's checkpoint, whole
    assert state["epoch"] == 1
    assert not list(run.glob(TEMP_PREFIX + "*"))
    monkeypatch.setattr(torch, "save", real)
    assert main(["-q", "train", str(tiny_dataset), "--output", str(run), "--resume", "--device", "cpu"]) == 0  # space freed: it resumes
