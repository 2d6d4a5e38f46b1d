"""The 3D viewer: what a case is packed into (crop, uint8/uint16, exact values and geometry), the
size cap on a 512x512x300 case and on a report, a page that asks nothing of the network, and the
volseg view command. Screenshots in headless Chromium are in test_viewer_browser.py."""

import base64
import gzip
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volseg import viz
from volseg.cli import main
from volseg.evaluation import evaluate, write_report
from volseg.viz.niivue import NiivueScript

SPACING = (0.8, 0.8, 2.0)  # (x, y, z) mm


def _nifti(b64: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(b64)))


def _big_ct():
    """512x512x300 CT in HU (int16): air, a body of 40 HU with a gradient, a 'liver' box inside."""
    z, y, x = 300, 512, 512
    img = np.full((z, y, x), -1000, dtype=np.int16)
    img[20:280, 60:450, 50:460] = 40
    img[20:280, 60:450, 50:460] += (np.arange(410, dtype=np.int16) // 4)[None, None, :]
    pred = np.zeros(img.shape, dtype=np.uint8)
    pred[100:160, 100:220, 60:200] = 1  # near the body's edge, so the margin takes in some air
    pred[120:130, 140:160, 100:120] = 2
    return img, pred


@pytest.fixture(scope="module")
def big_case():
    img, pred = _big_ct()
    image = sitk.GetImageFromArray(img)
    image.SetSpacing(SPACING)
    image.SetOrigin((-200.0, -180.0, 30.0))
    return image, img, pred


def test_a_512x512x300_case_is_cropped_to_the_foreground_and_stored_exactly(big_case):
    image, img, pred = big_case
    case = viz.pack_case("big", image, pred, pred, margin_mm=10.0)
    # box [z 100:160, y 100:220, x 60:200] + 10 mm: 5 slices in z, 13 voxels in x and y
    assert case.crop == ((47, 213), (87, 233), (95, 165)) and case.step == 1
    assert case.shape == (213 - 47, 233 - 87, 165 - 95)
    assert case.ct and case.label_values == (1, 2) and "cropped to 166x146x70 of 512x512x300" in case.note
    scan, lab = _nifti(case.image), _nifti(case.pred)
    assert scan.get_data_dtype() == np.uint16 and lab.get_data_dtype() == np.uint8
    want = img[95:165, 87:233, 47:213].transpose(2, 1, 0)  # [x, y, z] as NIfTI stores it
    np.testing.assert_array_equal(scan.get_fdata(), want)  # HU back exactly through scl_slope/inter
    np.testing.assert_array_equal(np.asarray(lab.dataobj), pred[95:165, 87:233, 47:213].transpose(2, 1, 0))
    # the crop's first voxel sits where it sat in the scan (RAS = LPS with x, y negated)
    lps = np.array(image.TransformIndexToPhysicalPoint((47, 87, 95)))
    np.testing.assert_allclose(scan.affine[:3, 3], lps * [-1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(np.abs(np.diag(scan.affine)[:3]), SPACING, atol=1e-6)
    # the size cap: scan + prediction + truth of this case in a viewer page, well under 25 MB
    assert case.nbytes < 2_000_000 < viz.MAX_PAGE_BYTES


def test_a_case_over_its_share_is_subsampled_then_refused():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 30, (40, 64, 64)).astype(np.float32)  # noise: barely compresses
    lab = np.ones(img.shape, dtype=np.uint8)  # foreground everywhere: nothing to crop
    whole = viz.pack_case("noisy", img, lab)
    assert whole.step == 1 and whole.note.startswith("whole volume") and "quantised" in whole.note
    small = viz.pack_case("noisy", img, lab, max_bytes=whole.nbytes // 3)
    assert small.step == 2 and small.nbytes <= whole.nbytes // 3 and "every 2th voxel" in small.note
    assert small.shape == (32, 32, 20)
    with pytest.raises(viz.ViewerError, match="noisy: [0-9]+ kB even at every 4th voxel, over its 1 kB share"):
        viz.pack_case("noisy", img, lab, max_bytes=1000)


def test_bad_layers_are_refused_in_one_line():
    img = np.zeros((8, 9, 10), dtype=np.int16)
    with pytest.raises(viz.ViewerError, match=r"layers differ in size .*'prediction': \(10, 9, 7\)"):
        viz.pack_case("c", img, np.zeros((7, 9, 10), dtype=np.uint8))
    with pytest.raises(viz.ViewerError, match="whole numbers; found fractions"):
        viz.pack_case("c", img, np.full((8, 9, 10), 0.5, dtype=np.float32))
    with pytest.raises(viz.ViewerError, match="nothing to show"):
        viz.pack_case("c")


@pytest.fixture
def stub_script(monkeypatch):
    """A stand-in for NiiVue's script, larger than the real one (2.2 MB), so size tests need no npm."""
    stub = NiivueScript("/* niivue stub */ window.niivue = {Niivue: null};" + " " * 3_000_000, "0.0-stub", "stub")
    monkeypatch.setattr("volseg.viz.page.niivue_script", lambda: stub)
    monkeypatch.setattr("volseg.viz.niivue_script", lambda: stub)
    return stub


def _evaluated_run(tmp_path, n=3):
    run, images, preds, truths = tmp_path / "run", tmp_path / "images", tmp_path / "preds", tmp_path / "truths"
    run.mkdir()
    (run / "dataset.json").write_text('{"labels": {"0": "background", "1": "liver", "2": "tumour"}}', encoding="utf-8")
    rng = np.random.default_rng(1)
    for i in range(n):
        img = rng.normal(0, 200, (24, 48, 48)).astype(np.int16) - 300
        truth = np.zeros(img.shape, dtype=np.uint8)
        truth[6:18, 10:30 + i, 12:36] = 1
        truth[9:12, 15:20, 15:20] = 2
        pred = truth.copy()
        pred[6:8] = 0
        for arr, folder, dtype in ((img, images, None), (pred, preds, None), (truth, truths, None)):
            folder.mkdir(exist_ok=True)
            im = sitk.GetImageFromArray(arr if dtype is None else arr.astype(dtype))
            im.SetSpacing((1.0, 1.0, 2.5))
            sitk.WriteImage(im, str(folder / f"case_{i}.nii.gz"))
    evaluate(preds, truths, output=run / "eval", images=images, labels={1: "liver", 2: "tumour"})
    return run


@pytest.mark.slow
def test_report_embeds_each_case_under_the_size_cap(tmp_path, stub_script):
    run = _evaluated_run(tmp_path)
    page = write_report(run, n_cases=1).read_text(encoding="utf-8")
    assert len(page) <= viz.MAX_PAGE_BYTES and page.count("<script>") == 2
    assert page.index("<h2>Worst cases</h2>") < page.index("<h2>Viewer</h2>") < page.index("id=volseg-viewer")
    data = re.search(r"<script type=application/json id=volseg-viewer-data>(.*?)</script>", page, re.S).group(1)
    import json

    data = json.loads(data)
    assert sorted(c["name"] for c in data["cases"]) == ["case_0", "case_1", "case_2"]
    assert data["labels"] == [{"value": 1, "name": "liver", "color": [31, 119, 180]}, {"value": 2, "name": "tumour", "color": [255, 127, 14]}]
    assert all(c["image"] and c["pred"] and c["truth"] for c in data["cases"])
    # a tight cap: the static part stays, the viewer sheds cases with a note, the page fits
    static = len(write_report(run, n_cases=0, viewer=False, output=tmp_path / "static.html").read_text(encoding="utf-8"))
    cap = static + len(stub_script.text) + 60_000 + 3_000
    tight = write_report(run, n_cases=0, output=tmp_path / "tight.html", max_bytes=cap).read_text(encoding="utf-8")
    assert len(tight) <= cap and "left out" in tight
    # picked cases, in the order given; a name not evaluated is refused with the known ones
    picked = write_report(run, n_cases=0, output=tmp_path / "one.html", cases=["case_2"]).read_text(encoding="utf-8")
    assert '"name":"case_2"' in picked and '"name":"case_0"' not in picked
    with pytest.raises(Exception, match="--cases case_9: not in the evaluation; its cases are case_"):
        write_report(run, n_cases=0, output=tmp_path / "x.html", cases=["case_9"])


def test_report_page_loads_nothing_from_outside(tmp_path, stub_script):
    page = write_report(_evaluated_run(tmp_path, n=1)).read_text(encoding="utf-8")
    # outside the script bodies (NiiVue's code holds URLs in strings it never fetches here),
    # nothing points elsewhere: no src/href to a URL, no @import, no external script or link
    markup = re.sub(r"<script[^>]*>.*?</script>", "<script></script>", page, flags=re.S)
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[a-z]+:""", markup, re.I)
    assert "<link" not in markup and "@import" not in markup and "<script src" not in page


def test_report_without_niivue_says_so_and_keeps_the_rest(tmp_path, monkeypatch):
    def unavailable():
        raise viz.ViewerError("the 3D viewer needs NiiVue's script: install npm (test)")

    monkeypatch.setattr("volseg.viz.niivue_script", unavailable)
    page = write_report(_evaluated_run(tmp_path, n=1)).read_text(encoding="utf-8")
    assert "No interactive viewer: the 3D viewer needs NiiVue&#x27;s script" in page and "<h2>Worst cases</h2>" in page


def test_volseg_view_writes_a_page_and_refuses_bad_input(tmp_path, stub_script, capsys):
    img = sitk.GetImageFromArray(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8))
    sitk.WriteImage(img, str(tmp_path / "scan.nii.gz"))
    lab = sitk.GetImageFromArray((np.arange(6 * 7 * 8).reshape(6, 7, 8) % 3).astype(np.uint8))
    sitk.WriteImage(lab, str(tmp_path / "mask.nii.gz"))
    assert main(["view", str(tmp_path / "scan.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz")]) == 0
    out = tmp_path / "scan_view.html"
    assert f"viewer: {out}" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert '"name":"label 1"' in page and '"name":"label 2"' in page and "NiiVue 0.0-stub" in page
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 7, 8), np.uint8)), str(tmp_path / "other.nii.gz"))
    assert main(["view", str(tmp_path / "scan.nii.gz"), "--mask", str(tmp_path / "other.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layers differ in size" in err and "(8, 7, 5)" in err


def test_niivue_script_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("VOLSEG_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "niivue.umd.js"
    fake.write_text('(function(){ /* niivue */ var x = {name:"@niivue/niivue",version:"9.9.9"}; window.niivue = {Niivue: 1}; })();', encoding="utf-8")
    monkeypatch.setenv("VOLSEG_NIIVUE_JS", str(fake))
    assert viz.niivue_script().version == "9.9.9"
    fake.write_text("console.log('something else')", encoding="utf-8")
    with pytest.raises(viz.ViewerError, match="is not NiiVue's UMD build"):
        viz.niivue_script()
    monkeypatch.setenv("VOLSEG_NIIVUE_JS", str(tmp_path / "nope.js"))
    with pytest.raises(viz.ViewerError, match="nope.js: no such file"):
        viz.niivue_script()
    monkeypatch.delenv("VOLSEG_NIIVUE_JS")
    monkeypatch.setattr("shutil.which", lambda name: None)  # no npm, nothing cached
    with pytest.raises(viz.ViewerError, match=r"install npm .* or set VOLSEG_NIIVUE_JS"):
        viz.niivue_script()


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("npm") is None, reason="npm is not installed")
def test_niivue_script_comes_from_npm_once(tmp_path, monkeypatch):
    monkeypatch.setenv("VOLSEG_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("VOLSEG_NIIVUE_JS", raising=False)
    script = viz.niivue_script()
    assert script.version == viz.NIIVUE_VERSION and "Niivue" in script.text and len(script.text) > 1_000_000
    cached = tmp_path / "niivue" / viz.NIIVUE_VERSION / "niivue.umd.js"
    assert script.source == str(cached) and cached.is_file()
    monkeypatch.setattr("shutil.which", lambda name: None)  # the second time needs no npm
    assert viz.niivue_script().text == script.text


def test_a_label_value_without_a_name_is_still_shown(stub_script, caplog):
    lab = np.zeros((6, 8, 8), dtype=np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    lab[4, 5, 5] = 7
    html = viz.viewer_section([viz.pack_case("c", None, lab)], {1: "liver"}, stub_script)
    assert '{"value":7,"name":"label 7 (unnamed)","color":' in html and "label value 7 is in the masks" in caplog.text
