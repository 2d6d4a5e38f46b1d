"""Every subcommand's user mistakes end in one line naming the bad value, exit status 2, and no
traceback (table-driven: one row per mistake)."""

from __future__ import annotations

import pytest

from volseg.cli import main

# (arguments with {data}, {out}, {scan} placeholders, what the last line must name)
BAD = [
    (["model", "--set", "model.norm=batchnorm"], "model.norm"),
    (["model", "--config", "nosuch_config"], "nosuch_config"),
    (["model", "--set", "model"], "section.key=value"),
    (["synth", "{out}", "--shape", "64", "64", "12"], "shape"),
    (["synth", "{out}", "--cases", "-3"], "cases"),
    (["synth", "{out}", "--spacing", "0", "1", "1"], "spacing"),
    (["synth", "{out}", "--modality", "pet"], "pet"),
    (["synth", "{out}", "--cases", "many"], "many"),
    (["synth", "{data_dir}"], "--force"),
    (["plan", "{out}/missing.json"], "missing.json"),
    (["plan", "{data}", "--memory", "-1"], "--memory"),
    (["train", "{data}", "--set", "train.epochs=abc", "--output", "{out}/run"], "train.epochs"),
    (["train", "{data}", "--set", "nosuch.key=1", "--output", "{out}/run"], "nosuch"),
    (["train", "{data}", "--resume", "--output", "{out}/run", "--set", "model.norm=batch"], "--resume"),
    (["train", "{data}", "--folds", "1", "--output", "{out}/cv"], "--folds 1"),
    (["train", "{data}", "--device", "tpu"], "tpu"),
    (["train", "{data}", "--set", "data.spacing=[1e-6,1e-6,1e-6]", "--output", "{out}/run"], "data.spacing"),
    (["train", "{data}", "--set", "data.spacing=[100,100,100]", "--output", "{out}/run"], "data.spacing"),
    (["infer", "{scan}", "--model", "{out}/run", "--set", "infer.nosuchkey=1"], "nosuchkey"),
    (["infer", "{scan}", "--model", "{out}/run", "--set", "infer.overlap=2"], "infer.overlap"),
    (["infer", "{scan}", "--model", "{out}/run", "--set", "train.epochs=3"], "train.epochs"),
    (["infer", "{out}/nosuch.nii.gz", "--model", "{out}/run"], "nosuch.nii.gz"),
    (["infer", "{scan}", "--model", "{out}/norun", "--output", "{out}/pred"], "norun"),
    (["evaluate"], "--pred"),
    (["evaluate", "--pred", "{out}/nosuch_pred", "--truth", "{data}"], "nosuch_pred"),
    (["report", "{out}/nosuch_run"], "nosuch_run"),
    (["export", "{out}/nosuch_run"], "nosuch_run"),
    (["export", "{out}/nosuch_run", "--format", "tflite"], "tflite"),
    (["demo", "--shape", "8", "8", "8", "--output", "{out}/demo"], "shape"),
    (["demo", "--set", "train.nosuch=1", "--output", "{out}/demo"], "train.nosuch"),
]


@pytest.mark.parametrize("args,names", BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_a_user_mistake_is_one_line_and_exit_status_2(args, names, tiny_dataset, tmp_path, capsys):
    scan = next(p for p in sorted(tiny_dataset.parent.rglob("*.nii.gz")) if "label" not in str(p))
    argv = [a.format(data=tiny_dataset, data_dir=tiny_dataset.parent, out=tmp_path, scan=scan) for a in args]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors (a bad choice or type)
        rc = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (argv, rc, err[-2000:])
    assert "Traceback" not in err, err
    assert lines and names in lines[-1] and lines[-1].startswith("volseg"), lines[-3:]
    assert len(lines[-1]) < 600, lines[-1]


def _bomb(levels: int = 9) -> str:
    """A YAML alias bomb: each level lists the previous one 9 times (9**levels leaves)."""
    lines = ['l0: &l0 ["xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel:\n  features: [{', '.join([f'*l{levels - 1}'] * 9)}]\n"


# hostile files: (file name, its text, arguments with {file}, what the last line must name)
HOSTILE = [
    ("bomb.yaml", _bomb(), ["model", "--config", "{file}"], "aliases"),
    ("small_bomb.yaml", "model:\n  norm: [&a [xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx], "
     + ", ".join(f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcd", "bcde")) + "]\n", ["model", "--config", "{file}"], "model.norm"),
    ("deep.yaml", "model:\n  features: " + "[" * 5000 + "]" * 5000 + "\n", ["model", "--config", "{file}"], "nested"),
    ("long.yaml", "model:\n  norm: " + "x" * 500_000 + "\n", ["model", "--config", "{file}"], "model.norm"),
    ("deep.json", '{"training": ' + "[" * 100_000 + "]" * 100_000 + "}", ["plan", "{file}"], "nested"),
]


@pytest.mark.parametrize("name,text,args,names", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_config_or_manifest_is_one_short_line(name, text, args, names, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    rc = main([a.format(file=path) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert lines and names in lines[-1] and str(path.name) in lines[-1], lines[-1][:2000]
    assert len(err) < 1000, len(err)  # a short excerpt of the bad value, never the value itself
