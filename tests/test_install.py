"""A plain, non-editable install works from any directory: shipped configs are package data.

The checkout is installed with pip (no network, no build isolation, no dependencies: torch and
the rest come from this environment) into a ``--target`` folder, and the installed ``volseg``
runs from another working directory with only that folder on ``PYTHONPATH``, so nothing can be
read from the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "volseg", "configs")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The ``--target`` folder volseg was installed into."""
    pytest.importorskip("setuptools", reason="building without isolation needs setuptools in this environment")
    tmp = tmp_path_factory.mktemp("install")
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    target = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--target", str(target), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return target


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_install_holds_every_module_and_shipped_config(site, tmp_path):
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "volseg").rglob("*.py"))
    missing = [s for s in sources if not (site / s).is_file()]
    assert not missing, f"not installed (add the subpackage to [tool.setuptools] packages in pyproject.toml): {missing}"
    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert shipped and sorted(p.name for p in (site / "volseg" / "configs").glob("*.yaml")) == shipped
    code = "import volseg, volseg.config as c; print(volseg.__file__); print(*[str(p) for p in c.shipped_configs().values()], sep='\\n')"
    res = _run(site, tmp_path / "elsewhere", "-c", code)
    assert res.returncode == 0, res.stderr
    module, *configs = res.stdout.split()
    assert Path(module).is_relative_to(site)  # the installed copy, not the checkout
    assert sorted(Path(p).name for p in configs) == shipped and all(Path(p).is_relative_to(site) for p in configs)


@pytest.mark.slow
def test_installed_config_names_from_another_directory(site, tmp_path):
    res = _run(site, tmp_path, "-m", "volseg", "model", "--config", "gpu_fullres.yaml")  # the bare name: tests/test_config.py
    assert res.returncode == 0, res.stderr
    assert "channels per level: 32, 64, 128, 256, 320" in res.stdout and "deep supervision: True" in res.stdout
    res = _run(site, tmp_path, "-m", "volseg", "model", "--config", "gpu_fulres")
    assert res.returncode == 2
    assert "'gpu_fulres'" in res.stderr and "'demo'" in res.stderr and "Did you mean 'gpu_fullres'" in res.stderr


@pytest.mark.slow
def test_installed_plan_and_demo_from_another_directory(site, tmp_path):
    res = _run(site, tmp_path, "-m", "volseg", "synth", "data", "--cases", "2", "--test-cases", "0", "--shape", "24", "24", "16")
    assert res.returncode == 0, res.stderr
    res = _run(site, tmp_path, "-m", "volseg", "plan", "data/dataset.json", "--output", "plan.yaml", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "model" in yaml.safe_load((tmp_path / "plan.yaml").read_text(encoding="utf-8"))

    sets = ["model.features=[4,8]", "data.patch_size=[16,16,16]", "train.epochs=1", "train.steps_per_epoch=1", "train.val_every=1"]
    args = ["-m", "volseg", "-q", "demo", "--output", "demo", "--cases", "3", "--test-cases", "1", "--shape", "24", "24", "16", "--device", "cpu"]
    res = _run(site, tmp_path, *args, *sum((["--set", s] for s in sets), []))
    assert res.returncode == 0, res.stderr
    assert "mean foreground Dice" in res.stdout
    resolved = yaml.safe_load((tmp_path / "demo/run/config.yaml").read_text(encoding="utf-8"))
    shipped = yaml.safe_load((ROOT / "configs/demo.yaml").read_text(encoding="utf-8"))
    assert resolved["infer"] == {**resolved["infer"], **shipped["infer"]}  # the demo's own config, not the defaults
    assert resolved["train"]["steps_per_epoch"] == 1
