"""Headless Chromium for the viewer tests: Debian's chromium + chromedriver through selenium, WebGL2
by SwiftShader (software), every network request outside the page refused and recorded."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")


def missing() -> Optional[str]:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "Chromium or chromedriver not found (Debian: apt-get install chromium chromium-driver; .ci/run installs them)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 1000) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="volseg-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM  # type: ignore[assignment]
    for flag in ("--headless=new", "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--ignore-gpu-blocklist", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
                 # no network at all: every host resolves nowhere and any proxy use fails
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                 f"--window-size={width},{height}", f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def requested_urls(driver, document: str = "") -> List[str]:
    """Every URL that documents whose address starts with ``document`` asked the network stack
    for since the last call (performance log; the browser's own new-tab page is not the page)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent" and msg["params"].get("documentURL", "").startswith(document):
            urls.append(msg["params"]["request"]["url"])
    return urls


def wait_ready(driver, timeout: float = 120.0) -> str:
    """Wait until the viewer says ready or error; returns the state."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.5).until(
        lambda d: d.execute_script("const r = document.getElementById('volseg-viewer'); return r && r.dataset.state !== 'loading';")
    )
    return driver.execute_script("return document.getElementById('volseg-viewer').dataset.state;")


def canvas_png(driver, path: Path) -> object:
    """Screenshot of the viewer's canvas as an RGB numpy array [row, col, 3] (also saved to ``path``)."""
    import io

    import numpy as np
    from matplotlib.image import imread
    from selenium.webdriver.common.by import By

    png = driver.find_element(By.CSS_SELECTOR, "#volseg-viewer canvas").screenshot_as_png
    Path(path).write_bytes(png)
    return (np.asarray(imread(io.BytesIO(png), format="png"))[..., :3] * 255).round().astype(int)
