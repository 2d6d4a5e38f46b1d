"""Small CLI behaviours seen by a new user: synth modality names, help texts, progress output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from volseg.cli import build_parser, main

from .conftest import TINY


@pytest.mark.parametrize("modality", ["mr", "mri"])
def test_synth_accepts_mr_and_mri(modality, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["-q", "synth", str(out), "--cases", "1", "--test-cases", "0", "--shape", "16", "16", "16", "--modality", modality]) == 0
    man = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert man["modality"] == {"0": "MRI"}
    image = sitk.ReadImage(str(out / man["training"][0]["image"]))
    assert image.GetPixelID() == sitk.sitkFloat32  # MRI intensities, not CT's int16 HU
    assert "MR" in capsys.readouterr().out.upper()


def test_synth_rejects_an_unknown_modality(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path), "--modality", "pet"])
    err = capsys.readouterr().err
    assert "'pet'" in err and "mr" in err


def test_probabilities_help_names_the_stored_type():
    infer = build_parser()._subparsers._group_actions[0].choices["infer"]
    text = " ".join(infer.format_help().split())
    assert "float16" not in text and "uint8" in text and "1/255" in text


@pytest.mark.slow
def test_no_carriage_returns_when_stderr_is_a_pipe(tiny_dataset, tmp_path):
    """Progress bars in a log file or pipe are a wall of '\\r' frames: there, one log line per
    epoch and per scan says how far the command got, and no bar is drawn."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "volseg.cli"]
    sets = [a for s in TINY for a in ("--set", s)]
    run = tmp_path / "run"
    steps = [
        cli + ["train", str(tiny_dataset), "--output", str(run), "--device", "cpu"] + sets,
        cli + ["infer", str(tiny_dataset), "--model", str(run), "--output", str(tmp_path / "pred"), "--device", "cpu"],
    ]
    err = ""
    for args in steps:
        proc = subprocess.run(args, capture_output=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        err += proc.stderr.decode(errors="replace")
    assert "\r" not in err
    assert "epoch 2/2" in err and "_seg.nii.gz" in err  # line-wise progress from the log
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 2
