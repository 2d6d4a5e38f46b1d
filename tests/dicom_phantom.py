"""CT series written with pydicom the way scanners write them (one file per slice, rescale
slope/intercept, patient/study/frame-of-reference attributes), in any orientation and with the
files named in shuffled order, plus the phantom mask on the same grid."""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk

STUDY = "1.2.826.0.1.3680043.8.498.1"
FOR = "1.2.826.0.1.3680043.8.498.2"


def _rotation(name: str) -> np.ndarray:
    """Direction matrix (columns: the i, j, k axes in LPS) of a series orientation."""
    if name == "axial":
        return np.eye(3)
    if name == "feet-first":  # FFS axial: the row axis points right, slices stored foot to head
        return np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1]])
    if name == "sagittal":  # rows along y (posterior), columns down (-z), slices along x
        return np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])
    if name == "coronal":  # rows along x, columns down (-z), slices along y
        return np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
    if name == "oblique":
        return np.array(sitk.Euler3DTransform((0, 0, 0), 0.3, -0.2, 0.25).GetMatrix()).reshape(3, 3)
    raise ValueError(name)


ORIENTATIONS = ("axial", "feet-first", "sagittal", "coronal", "oblique")


def phantom(orientation: str, shape=(9, 20, 24), spacing=(0.7, 0.9, 2.5)) -> Tuple[sitk.Image, np.ndarray]:
    """(CT image in HU, ``[z, y, x]`` label map with values 1 (a sphere) and 2 (a box) on its
    grid); in-plane pixels are not square, so a swapped PixelSpacing shows."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    mm = [x * spacing[0], y * spacing[1], z * spacing[2]]
    sphere = (mm[0] - 7) ** 2 + (mm[1] - 8) ** 2 + (mm[2] - 10) ** 2 <= 5.5**2
    labels = np.zeros(shape, np.uint8)
    labels[sphere] = 1
    labels[2:6, 3:8, 15:21] = 2
    rng = np.random.default_rng(0)
    hu = np.where(labels == 1, 60, np.where(labels == 2, 300, -50)) + rng.integers(-20, 21, size=shape)
    img = sitk.GetImageFromArray(hu.astype(np.int16))
    img.SetSpacing(spacing)
    img.SetDirection(tuple(_rotation(orientation).ravel()))
    img.SetOrigin((-40.0, 25.0, 110.0))
    return img, labels


def write_series(img: sitk.Image, folder: Path, orientation: str = "axial", seed: int = 1, attrs: Dict[str, str] = None) -> None:
    """One CT file per slice, stored as ``(HU + 1024) / 1`` (RescaleIntercept -1024), named in
    a shuffled order; ``attrs`` overrides or (value None) removes header attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(img)
    d = np.array(img.GetDirection()).reshape(3, 3)
    series = f"1.2.826.0.1.3680043.8.498.3.{zlib.crc32(f'{orientation}{seed}'.encode())}"
    order = list(range(arr.shape[0]))
    random.Random(seed).shuffle(order)
    for n, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series}.{k + 1}"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PH001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = STUDY, "20260101", "120000", "1", "A1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series, 3, f"phantom {orientation}", k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = FOR, ""
        ds.PatientPosition = "FFS" if orientation == "feet-first" else "HFS"
        ds.Manufacturer = "test"
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([d[:, 0], d[:, 1]]).round(6)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in img.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.PixelSpacing = [img.GetSpacing()[1], img.GetSpacing()[0]]  # row spacing (along columns), column spacing
        ds.SliceThickness = img.GetSpacing()[2]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (arr[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        for key, value in (attrs or {}).items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.save_as(folder / f"IM{n:04d}", enforce_file_format=True)
