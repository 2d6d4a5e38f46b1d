"""The viewer as a person sees it: pages rendered by headless Chromium (WebGL2 through SwiftShader)
with the network cut off, judged from screenshot pixels. Skipped only where Chromium, chromedriver
or selenium is missing (.ci/run installs them)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests import browser
from volseg import viz
from volseg.viz.niivue import cache_dir

# a browser start and a software-GL render take 10-30 s on 2 cores: slow tier (make test and CI run it)
pytestmark = [pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing())), pytest.mark.slow]

SHOTS = Path(os.environ.get("VOLSEG_SCREENSHOTS", "")) if os.environ.get("VOLSEG_SCREENSHOTS") else None
LIVER, TUMOUR = (31, 119, 180), (255, 127, 14)  # tab10, as label_table gives them


@pytest.fixture(scope="module")
def niivue():
    have = os.environ.get("VOLSEG_NIIVUE_JS") or (cache_dir() / "niivue" / viz.NIIVUE_VERSION / "niivue.umd.js").is_file()
    if not have and shutil.which("npm") is None:
        pytest.skip("no NiiVue script: npm is missing and none is cached (VOLSEG_NIIVUE_JS unset)")
    return viz.niivue_script()


@pytest.fixture(scope="module")
def page(niivue, tmp_path_factory):
    """A CT phantom: air around a body whose grey rises left to right, a 'liver' box in the
    body's low-x, low-y quarter and a small 'tumour' outside it; prediction = truth."""
    folder = tmp_path_factory.mktemp("view")
    img = np.full((30, 80, 80), -1000, dtype=np.int16)
    img[2:28, 4:76, 4:76] = np.linspace(-100, 200, 72).astype(np.int16)[None, None, :]
    lab = np.zeros(img.shape, dtype=np.uint8)
    lab[8:22, 10:40, 10:40] = 1  # low x (patient right), low y (anterior)
    lab[12:18, 50:60, 55:65] = 2
    image = sitk.GetImageFromArray(img)
    image.SetSpacing((1.0, 1.0, 2.0))
    mask = sitk.GetImageFromArray(lab)
    mask.CopyInformation(image)
    case = viz.pack_case("phantom", image, mask, mask, margin_mm=6.0)
    html = viz.viewer_section([case], {1: "liver", 2: "tumour"}, niivue)
    out = folder / "view.html"
    out.write_text(f"<!DOCTYPE html><html><head><meta charset=utf-8><style>{viz.VIEWER_CSS}</style></head><body>{html}</body></html>", encoding="utf-8")
    return out


def _shot(driver, name):
    path = (SHOTS or Path(driver.capabilities.get("chrome", {}).get("userDataDir", "/tmp"))) / f"{name}.png"
    if SHOTS:
        SHOTS.mkdir(parents=True, exist_ok=True)
    return browser.canvas_png(driver, path)


def _near(rgb, colour, grey_weight=0.5):
    """Pixels whose colour is ``colour`` blended at the overlay's opacity onto some grey."""
    rgb = rgb.astype(float)
    target = np.asarray(colour, float) * (1 - grey_weight)
    grey = (rgb - target) / grey_weight  # what lies under the overlay, if this is the overlay
    return (grey.min(axis=-1) >= -12) & (grey.max(axis=-1) - grey.min(axis=-1) <= 24) & (np.abs(rgb - rgb.mean(-1, keepdims=True)).max(-1) > 20)


def _greys(rgb):
    return (np.abs(rgb - rgb.mean(-1, keepdims=True)).max(-1) <= 3) & (rgb.mean(-1) > 8)


def test_viewer_draws_scan_and_overlay_and_toggles_a_label_offline(page):
    from selenium.webdriver.common.by import By

    with browser.chromium() as d:
        browser.requested_urls(d)  # drop the browser's own start-up requests
        d.get(page.as_uri())
        assert browser.wait_ready(d) == "ready", d.execute_script("return document.querySelector('.vs-status').textContent")
        d.find_element(By.XPATH, "//button[text()='axial']").click()
        d.execute_script("document.querySelector('.vs-opacity').value = 0.5")
        rgb = _shot(d, "axial")
        grey = _greys(rgb)
        drawn = np.argwhere(rgb.max(-1) > 8)
        (r0, c0), (r1, c1) = drawn.min(0), drawn.max(0)  # the slice's square on the black canvas
        assert grey.sum() > 0.1 * (r1 - r0) * (c1 - c0), "the scan is not drawn"
        levels = rgb[grey].mean(-1)
        assert levels.std() > 15 and len(np.unique(levels.round())) > 20, "the scan is drawn flat, not its grey gradient"
        liver = _near(rgb, LIVER)
        assert liver.sum() > 0.05 * (r1 - r0) * (c1 - c0), "no liver overlay in its colour"
        rows, cols = np.argwhere(liver).mean(0)
        # neurological display (patient left on screen left): low x (patient right) is on the
        # right, low y (anterior) at the top
        assert (rows - r0) / (r1 - r0) < 0.5 and (cols - c0) / (c1 - c0) > 0.5, (rows, cols, r0, r1, c0, c1)
        readout = d.find_element(By.CSS_SELECTOR, ".vs-readout").text
        assert "HU" in readout and "prediction:" in readout, readout
        d.find_element(By.CSS_SELECTOR, ".vs-label[data-value='1']").click()
        rgb_off = _shot(d, "axial_liver_off")
        assert _near(rgb_off, LIVER).sum() < 0.02 * liver.sum(), "the liver overlay is still drawn after toggling it off"
        assert _greys(rgb_off).sum() > grey.sum(), "where the liver was, the scan shows through"
        for view in ("coronal", "sagittal", "3D", "multiplanar + 3D"):
            d.find_element(By.XPATH, f"//button[text()='{view}']").click()
            assert _shot(d, view.replace(" ", "_").replace("+", "")).max() > 50, view
        asked = browser.requested_urls(d, document="file:")
        assert page.as_uri() in asked  # the log does record the page's own requests
        outside = [u for u in asked if not u.startswith(("file:", "data:", "blob:"))]
        assert not outside, f"the page asked the network for {outside[:5]}"
        errors = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors


def test_report_viewer_opens_offline_and_switches_cases(niivue, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.test_viewer import _evaluated_run
    from volseg.evaluation import write_report

    report = write_report(_evaluated_run(tmp_path, n=2), n_cases=0)
    with browser.chromium() as d:
        browser.requested_urls(d)
        d.get(report.as_uri())
        assert browser.wait_ready(d) == "ready", d.execute_script("return document.querySelector('.vs-status').textContent")
        first = d.execute_script("return document.getElementById('volseg-viewer').dataset.case")
        other = next(o.text for o in Select(d.find_element(By.CSS_SELECTOR, ".vs-case")).options if o.text != first)
        Select(d.find_element(By.CSS_SELECTOR, ".vs-case")).select_by_visible_text(other)
        assert browser.wait_ready(d) == "ready"
        assert d.execute_script("return document.getElementById('volseg-viewer').dataset.case") == other
        assert "liver" in d.find_element(By.CSS_SELECTOR, ".vs-labels").text  # names from the run folder
        assert _greys(_shot(d, "report_case")).sum() > 1000
        asked = browser.requested_urls(d, document="file:")
        assert report.as_uri() in asked and not [u for u in asked if not u.startswith(("file:", "data:", "blob:"))]
