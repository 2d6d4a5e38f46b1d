"""DICOM-SEG and RTSTRUCT outputs land on exactly the voxels of the mask, in every orientation
and slice order; the bad inputs end in one line; dciodvfy finds no errors in what is written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from volseg.cli import main
from volseg.data.io import read_image

from .dicom_phantom import ORIENTATIONS, phantom, write_series

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

NAMES = {0: "background", 1: "liver", 2: "lesion box"}


def _on_read_grid(folder: Path, orientation: str):
    """(the image volseg reads from the series, the phantom's labels on that grid)."""
    img, labels = phantom(orientation)
    write_series(img, folder, orientation)
    got = read_image(folder)
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(img)
    return got, sitk.GetArrayFromImage(sitk.Resample(lab, got, sitk.Transform(), sitk.sitkNearestNeighbor))


def _slice_of(ds, image) -> int:
    """The slice of ``image`` a source file lies on, from its position (not its file name or order)."""
    return image.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]


def decode_seg(path: Path, folder: Path, image, names) -> np.ndarray:
    """The SEG decoded by highdicom, frame by frame through the source SOP Instance UIDs, back
    onto ``image``'s ``[z, y, x]`` grid as label values."""
    seg = hd.seg.segread(path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    by_number = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    value_of = {name: v for v, name in names.items()}
    pix = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True, assert_missing_frames_are_empty=True)
    out = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.int32)
    for ds, frame in zip(sources, pix):
        out[_slice_of(ds, image)] = np.vectorize(lambda n: value_of[by_number[n]] if n else 0)(frame)
    return out


def rasterise_rtstruct(path: Path, folder: Path, image, name: str) -> np.ndarray:
    """One ROI's contours filled at the voxel centres (even-odd rule), each point mapped to the
    grid by its patient coordinates; a contour off a slice fails the test."""
    from matplotlib.path import Path as Polygon

    ds = pydicom.dcmread(path)
    sop_slice = {s.SOPInstanceUID: _slice_of(s, image) for s in (pydicom.dcmread(f, stop_before_pixels=True) for f in folder.iterdir())}
    number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == name)
    roi = next(r for r in ds.ROIContourSequence if r.ReferencedROINumber == number)
    shape = sitk.GetArrayViewFromImage(image).shape
    out = np.zeros(shape, bool)
    rows, cols = np.mgrid[: shape[1], : shape[2]]
    centres = np.column_stack([cols.ravel(), rows.ravel()])
    for c in getattr(roi, "ContourSequence", []):
        pts = np.array(c.ContourData, dtype=float).reshape(-1, 3)
        idx = np.array([image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in pts])
        k = sop_slice[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
        assert np.allclose(idx[:, 2], k, atol=1e-2), (idx[:, 2].min(), idx[:, 2].max(), k)
        inside = Polygon(idx[:, :2]).contains_points(centres).reshape(shape[1:])
        out[k] ^= inside
    return out


def dciodvfy_errors(path: Path):
    """dciodvfy's Error lines (its Warnings are not failures); None when it is not installed."""
    if shutil.which("dciodvfy") is None:
        return None
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice; both empty counts as 1 (an empty label has no contours, and that is right)."""
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2 * np.count_nonzero(a & b) / total if total else 1.0


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_seg_and_rtstruct_land_on_the_mask_voxels(orientation, tmp_path):
    from volseg.data.io.dicom_seg import write_dicom_seg
    from volseg.data.io.rtstruct import write_rtstruct

    folder = tmp_path / "series"
    image, labels = _on_read_grid(folder, orientation)
    assert set(np.unique(labels)) == {0, 1, 2}
    seg = write_dicom_seg(labels, image, folder, tmp_path / "case_seg.dcm", NAMES)
    rt = write_rtstruct(labels, image, folder, tmp_path / "case_rtstruct.dcm", NAMES)

    assert np.array_equal(decode_seg(seg, folder, image, NAMES), labels)
    for value in (1, 2):
        got = rasterise_rtstruct(rt, folder, image, NAMES[value])
        assert _dice(got, labels == value) >= 0.98, (NAMES[value], _dice(got, labels == value))

    src = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    for path in (seg, rt):
        ds = pydicom.dcmread(path)
        assert ds.PatientID == src.PatientID and ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert dciodvfy_errors(path) in (None, []), dciodvfy_errors(path)
    s = pydicom.dcmread(seg)
    assert s.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert [d.SegmentLabel for d in s.SegmentSequence] == ["liver", "lesion box"]
    assert s.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED CT liver
    refs = {i.ReferencedSOPInstanceUID for i in s.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in folder.iterdir()}
    r = pydicom.dcmread(rt)
    assert [x.ROIName for x in r.StructureSetROISequence] == ["liver", "lesion box"]
    assert r.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == src.FrameOfReferenceUID


def test_a_series_without_study_or_frame_of_reference_is_refused(tmp_path):
    from volseg.data.io import ImageReadError
    from volseg.data.io.dicom_seg import write_dicom_seg

    img, labels = phantom("axial")
    write_series(img, tmp_path / "s", attrs={"FrameOfReferenceUID": None})
    image = read_image(tmp_path / "s")
    with pytest.raises(ImageReadError, match="has no FrameOfReferenceUID"):
        write_dicom_seg(labels, image, tmp_path / "s", tmp_path / "x_seg.dcm", NAMES)
    assert not (tmp_path / "x_seg.dcm").exists()


def _threshold_predictor(monkeypatch):
    """The run's predictor with its network replaced by a fixed rule (HU > 0: the run's first
    label, HU > 200: its last), so the DICOM tests do not depend on what a tiny training learned."""
    from volseg.inference.predictor import Predictor

    def predict(self, images, source="", probabilities=False, prepared=None):
        hu = sitk.GetArrayFromImage(images[0])
        values = self.plan.label_values
        return {"labels": np.where(hu > 200, values[-1], np.where(hu > 0, values[1], 0)).astype(np.uint8), "timing": {}}

    monkeypatch.setattr(Predictor, "predict", predict)


def test_infer_writes_seg_rtstruct_and_statistics_that_match_the_nifti(tiny_run, tmp_path, monkeypatch, capsys):
    import nibabel as nib

    _threshold_predictor(monkeypatch)
    for o in ("feet-first", "oblique"):
        write_series(phantom(o)[0], tmp_path / "in" / o, o)
    out = tmp_path / "out"
    rc = main(["infer", str(tmp_path / "in" / "feet-first"), str(tmp_path / "in" / "oblique"), "--model", str(tiny_run), "--output", str(out),
               "--device", "cpu", "--format", "nifti,dicom-seg,rtstruct", "--statistics"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    names = dict(enumerate(json.loads((tiny_run / "plan.json").read_text())["label_names"]))
    values = json.loads((tiny_run / "plan.json").read_text())["label_values"]
    names = {values[i]: n for i, n in names.items()}
    for o in ("feet-first", "oblique"):
        folder = tmp_path / "in" / o
        image = read_image(folder)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{o}_seg.nii.gz")))
        assert mask.any()
        assert np.array_equal(decode_seg(out / f"{o}_seg.dcm", folder, image, names), mask)
        for v in values[1:]:
            assert _dice(rasterise_rtstruct(out / f"{o}_rtstruct.dcm", folder, image, names[v]), mask == v) >= 0.98
        stats = json.loads((out / f"{o}_stats.json").read_text())
        # the source pixels under the mask, rescaled by hand from the files (pydicom), slice by position
        hu = np.zeros(mask.shape)
        for f in folder.iterdir():
            ds = pydicom.dcmread(f)
            hu[_slice_of(ds, image)] = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000
        for v in values[1:]:
            s = stats["labels"][names[v]]
            assert s["voxels"] == np.count_nonzero(mask == v) and s["volume_ml"] == pytest.approx(s["voxels"] * voxel_ml)
            if s["voxels"]:
                assert s["intensity"]["mean"] == pytest.approx(hu[mask == v].mean())
        assert nib.load(str(out / f"{o}_seg.nii.gz")).shape == mask.shape[::-1]
    table = (out / "statistics.csv").read_text().splitlines()
    assert table[0].startswith("case,label,name,voxels,volume_ml,mean") and len(table) == 1 + 2 * (len(values) - 1)


def test_dicom_output_for_a_nifti_input_is_refused_up_front(tiny_run, tiny_dataset, tmp_path, capsys):
    scan = sorted((tiny_dataset.parent / "imagesTs").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    rc = main(["infer", str(scan), "--model", str(tiny_run), "--output", str(out), "--device", "cpu", "--format", "nifti,rtstruct"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs DICOM series inputs" in err and str(scan) in err and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_an_unknown_format_is_one_line(tiny_run, tmp_path, capsys):
    rc = main(["infer", str(tmp_path), "--model", str(tiny_run), "--format", "nifti,dicomseg"])
    err = capsys.readouterr().err
    assert rc == 2 and "dicomseg" in err and "dicom-seg" in err and "Traceback" not in err, err


def test_a_series_without_attributes_fails_its_scan_in_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    _threshold_predictor(monkeypatch)
    write_series(phantom("axial")[0], tmp_path / "in", attrs={"StudyInstanceUID": ""})
    rc = main(["infer", str(tmp_path / "in"), "--model", str(tiny_run), "--output", str(tmp_path / "out"), "--device", "cpu", "--format", "nifti,dicom-seg"])
    err = capsys.readouterr().err
    assert rc == 1 and "has no StudyInstanceUID" in err and "Traceback" not in err, err
    assert not list((tmp_path / "out").glob("in_seg*"))
