"""The documentation stays true to the code: the generated configuration reference is current,
the README's command table names real subcommands and options, every command line shown in
README.md and docs/*.md parses with the real CLI parser (and its --set keys exist), and the
README stays a short manual. Fast: no torch, no data."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GENERATOR = DOCS / "gen_config_reference.py"
README_MAX_BYTES = 12 * 1024


# ------------------------------------------------------------------------------------------------
# helpers


def _parser() -> argparse.ArgumentParser:
    from volseg.cli import build_parser

    return build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert actions, "volseg's parser has no subcommands"
    return dict(actions[0].choices)


def _readme_table() -> List[Tuple[str, str]]:
    """(subcommand, rest of the row) for every row of README.md whose first cell is `volseg X`."""
    rows = []
    for line in README.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`volseg ([a-z][\w-]*)`\s*\|(.*)\|\s*$", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


def _shell_blocks(text: str) -> List[str]:
    """The contents of the fenced ```bash / ```sh / ```shell code blocks."""
    return re.findall(r"^```(?:bash|sh|shell|console)[ \t]*\n(.*?)^```", text, flags=re.M | re.S)


def _volseg_commands(block: str) -> List[List[str]]:
    """argv lists (after `volseg`) of the command lines in a shell block: lines that start with
    `volseg`, and `... -m volseg ...` (torchrun, python -m). Backslash continuations are
    joined, comments dropped, shell variables ($VAR, $(...)) left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        if tokens[:1] == ["volseg"]:
            start = 1
        else:
            start = next((i + 2 for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["-m", "volseg"]), None)
            if start is None:
                continue
        out.append([t for t in tokens[start:] if "$" not in t])
    return out


def _documented_commands() -> List[Tuple[str, List[str]]]:
    found = []
    for path in [README] + sorted(DOCS.glob("*.md")):
        for block in _shell_blocks(path.read_text(encoding="utf-8")):
            found += [(path.relative_to(ROOT).as_posix(), argv) for argv in _volseg_commands(block)]
    return found


# ------------------------------------------------------------------------------------------------
# (a) the configuration reference is generated and current


def test_configuration_reference_is_current():
    proc = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        "docs/configuration.md is stale; regenerate it with `python docs/gen_config_reference.py` and commit it.\n"
        + proc.stdout + proc.stderr
    )


def test_the_check_fails_on_a_stale_reference(tmp_path, capsys):
    gen = runpy.run_path(str(GENERATOR))
    text, _ = gen["generate"]()
    stale = tmp_path / "configuration.md"
    stale.write_text(text.replace("| `epochs` |", "| `epochz` |"), encoding="utf-8")
    gen["main"].__globals__["OUTPUT"] = stale
    gen["main"].__globals__["ROOT"] = tmp_path
    assert gen["main"](["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    stale.write_text(text, encoding="utf-8")
    assert gen["main"](["--check"]) == 0


def test_the_reference_lists_every_key_with_its_default():
    import dataclasses
    import typing

    import volseg.config as config

    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    by_name = {s.splitlines()[0].strip(): s for s in sections}
    hints = typing.get_type_hints(config.Config)
    for f in dataclasses.fields(config.Config):
        assert f.name in by_name, f"section {f.name} missing from docs/configuration.md"
        for key in dataclasses.fields(hints[f.name]):
            assert re.search(rf"^\| `{key.name}` \|", by_name[f.name], flags=re.M), f"{f.name}.{key.name} missing"


# ------------------------------------------------------------------------------------------------
# (b) the README's command table and every documented command line match the CLI


def test_readme_table_names_real_subcommands():
    table = _readme_table()
    assert table, "README.md has no command table (rows starting with | `volseg COMMAND` |)"
    commands = _subparsers(_parser())
    unknown = [name for name, _ in table if name not in commands]
    assert not unknown, f"README.md's command table names subcommands the CLI does not have: {unknown}; CLI: {sorted(commands)}"


def test_readme_table_lists_every_subcommand():
    listed = {name for name, _ in _readme_table()}
    missing = sorted(set(_subparsers(_parser())) - listed)
    assert not missing, f"subcommands missing from README.md's command table: {missing}"


def test_readme_table_options_exist():
    commands = _subparsers(_parser())
    wrong = []
    for name, rest in _readme_table():
        if name not in commands:
            continue  # reported by test_readme_table_names_real_subcommands
        options = set(commands[name]._option_string_actions)
        wrong += [f"volseg {name} {opt}" for opt in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest) if opt not in options]
    assert not wrong, f"README.md's command table shows options the CLI does not have: {wrong}"


def test_the_subcommands_answer_help():
    """The installed entry point (`python -m volseg`) really has the README's commands."""
    for name, _ in _readme_table():
        proc = subprocess.run([sys.executable, "-m", "volseg", name, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage: volseg " + name in proc.stdout, (name, proc.stdout + proc.stderr)


def test_documented_command_lines_parse():
    from volseg.config import ConfigError, load_config

    commands = _documented_commands()
    assert len(commands) >= 20, f"found only {len(commands)} command lines in README.md and docs/"
    bad = []
    for where, argv in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = _parser().parse_args(argv)
        except SystemExit:
            bad.append(f"{where}: volseg {' '.join(argv)}: {err.getvalue().strip().splitlines()[-1:]}")
            continue
        if getattr(args, "set", None):
            try:
                load_config(None, args.set)
            except ConfigError as exc:
                bad.append(f"{where}: volseg {' '.join(argv)}: {exc}")
    assert not bad, "command lines in the documentation that volseg's CLI rejects:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("argv", [["bogus"], ["infer", "scan.nii.gz"], ["train", "m.json", "--nonsense"]])
def test_a_wrong_command_line_is_caught(argv):
    """The check above can fail: what argparse rejects, it reports."""
    block = "volseg " + " ".join(argv) + "  # comment\n"
    (parsed,) = _volseg_commands(block)
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        _parser().parse_args(parsed)


def test_torchrun_and_continued_lines_are_found():
    block = "OMP_NUM_THREADS=4 torchrun --nnodes 2 \\\n    -m volseg train data.json --output runs/ct $start  # note\n"
    assert _volseg_commands(block) == [["train", "data.json", "--output", "runs/ct"]]


def test_documented_python_api_names_exist():
    """Every ``volseg.NAME`` used in a ```python block of README.md or docs/*.md is public API."""
    import volseg

    names = set()
    for path in [README] + sorted(DOCS.glob("*.md")):
        for block in re.findall(r"^```python[ \t]*\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.M | re.S):
            names |= set(re.findall(r"\bvolseg\.([A-Za-z_]\w*)", block))
    assert {"load_config", "train", "Predictor", "read_image"} <= names, names
    missing = sorted(n for n in names if n not in getattr(volseg, "__all__", ()) and not hasattr(volseg, n))
    assert not missing, f"the documentation uses volseg.{missing}, which `import volseg` does not provide"


# ------------------------------------------------------------------------------------------------
# (c) the README is a short manual


def test_readme_is_at_most_12_kib():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; keep it a manual of at most {README_MAX_BYTES} bytes and move detail to docs/"


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = _shell_blocks(text)[0]
    lines = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert lines[:2] == ["make demo", "make test"], first_block


def test_readme_and_docs_links_resolve():
    """Relative links in README.md and docs/*.md point at files that exist (mkdocs --strict
    checks docs/ too, but not the README)."""
    broken = []
    for path in [README] + sorted(DOCS.glob("*.md")):
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+://|^#|^mailto:", target):
                continue
            file = target.split("#")[0]
            if file and not (path.parent / file).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, f"broken relative links: {broken}"


def test_every_docs_page_is_in_the_mkdocs_nav():
    nav = re.findall(r"^\s*-\s*[^:]+:\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), flags=re.M)
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == pages, f"mkdocs.yml nav {sorted(nav)} vs docs/ {pages}"
