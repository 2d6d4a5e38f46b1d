"""NiiVue's browser script, taken from the npm registry's ``@niivue/niivue`` package at run time.

The report and ``volseg view`` embed NiiVue (BSD-2-Clause, https://github.com/niivue/niivue) so
their pages work offline. The script is never part of this repository: the first call runs
``npm pack @niivue/niivue@NIIVUE_VERSION`` (npm's own client, one download of ~3 MB), takes the
package's single-file UMD build (``dist/niivue.umd.js``, which defines the global ``niivue``)
and keeps it in the cache folder (``$VOLSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/volseg``, else
``~/.cache/volseg``). ``$VOLSEG_NIIVUE_JS`` names a ``niivue.umd.js`` to use instead (machines
without npm: copy the file from an ``npm pack`` made elsewhere).

Why not the copy inside ``ipyniivue``: its ``static/widget.js`` bundles the same NiiVue, but
only as an anywidget module that talks to a Jupyter widget model; NiiVue's own classes are not
exported from it, so a plain page cannot drive it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

from ..data.io import atomic_write

log = logging.getLogger(__name__)

#: the NiiVue release ipyniivue 2.4.4 bundles, so the notebook widget and the report agree
NIIVUE_VERSION = "0.65.0"
NPM_PACKAGE = "@niivue/niivue"
_MEMBER = "package/dist/niivue.umd.js"

__all__ = ["NIIVUE_VERSION", "NiivueScript", "ViewerError", "niivue_script", "cache_dir"]


class ViewerError(RuntimeError):
    """The viewer cannot be built: no NiiVue script, or inputs it cannot show."""


class NiivueScript(NamedTuple):
    text: str  #: the UMD script, defines ``window.niivue``
    version: str  #: NiiVue's version, e.g. ``"0.65.0"``
    source: str  #: where it came from (a file path), for the page's footer and logs


def cache_dir() -> Path:
    """The folder volseg caches downloaded assets in (see the module docstring)."""
    if os.environ.get("VOLSEG_CACHE_DIR"):
        return Path(os.environ["VOLSEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "volseg"


def _version_in(text: str) -> str:
    # the UMD build carries its own package.json fields; the first 'version:"x.y.z"' after
    # NiiVue's package name is its release
    m = re.search(r'name:"@niivue/niivue",version:"([0-9][^"]*)"', text) or re.search(r'version:"([0-9]+\.[0-9]+\.[0-9]+)"', text)
    return m.group(1) if m else "unknown"


def _check(text: str, where: str) -> None:
    if "niivue" not in text[:2000] or "Niivue" not in text:
        raise ViewerError(f"{where} is not NiiVue's UMD build (dist/niivue.umd.js of {NPM_PACKAGE}); expected a script that defines window.niivue.")


def _npm_pack(version: str) -> bytes:
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerError(
            f"the 3D viewer needs NiiVue's script: install npm (Node.js) so volseg can fetch {NPM_PACKAGE}@{version} once "
            f"into {cache_dir()}, or set VOLSEG_NIIVUE_JS to a niivue.umd.js file."
        )
    with tempfile.TemporaryDirectory(prefix="volseg-npm-") as tmp:
        # few, short retries: offline, npm would otherwise wait minutes before giving up
        cmd = [npm, "pack", f"{NPM_PACKAGE}@{version}", "--pack-destination", tmp, "--silent", "--fetch-retries=1", "--fetch-timeout=60000"]
        log.info("fetching %s@%s with npm pack (once; cached in %s)", NPM_PACKAGE, version, cache_dir())
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ViewerError(f"npm pack {NPM_PACKAGE}@{version} failed: {exc}.") from exc
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ViewerError(f"npm pack {NPM_PACKAGE}@{version} failed (exit {done.returncode}): {last[0]}; set VOLSEG_NIIVUE_JS to a niivue.umd.js file to skip npm.")
        with tarfile.open(tarballs[0], "r:gz") as tar:
            meta = json.load(tar.extractfile("package/package.json"))  # type: ignore[arg-type]
            if meta.get("version") != version:
                raise ViewerError(f"npm gave {NPM_PACKAGE} {meta.get('version')!r}, expected {version}.")
            member = tar.extractfile(_MEMBER)
            if member is None:
                raise ViewerError(f"{NPM_PACKAGE}@{version} has no {_MEMBER}.")
            return member.read()


def niivue_script(version: str = NIIVUE_VERSION) -> NiivueScript:
    """NiiVue's UMD script: from ``$VOLSEG_NIIVUE_JS``, else the cache, else ``npm pack`` (then
    cached). Raises :class:`ViewerError` (one line naming what to do) when none is available."""
    env = os.environ.get("VOLSEG_NIIVUE_JS")
    if env:
        path = Path(env)
        if not path.is_file():
            raise ViewerError(f"VOLSEG_NIIVUE_JS={env}: no such file; expected NiiVue's dist/niivue.umd.js.")
        text = path.read_text(encoding="utf-8")
        _check(text, f"VOLSEG_NIIVUE_JS={env}")
        return NiivueScript(text, _version_in(text), str(path))
    cached = cache_dir() / "niivue" / version / "niivue.umd.js"
    if not cached.is_file():
        data = _npm_pack(version)
        with atomic_write(cached) as tmp:
            tmp.write_bytes(data)
    text = cached.read_text(encoding="utf-8")
    _check(text, str(cached))
    return NiivueScript(text, version, str(cached))
