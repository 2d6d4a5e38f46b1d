"""Shared fixtures: tiny synthetic datasets and one tiny trained run per session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import SimpleITK as sitk

TINY = [
    "model.features=[4,8]",
    "model.norm=instance",
    "data.patch_size=[24,24,16]",
    "data.samples_per_volume=2",
    "data.val_fraction=0.25",
    "train.epochs=2",
    "train.steps_per_epoch=2",
    "train.batch_size=2",
    "train.val_every=1",
    "infer.overlap=0.25",
]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from volseg.data.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("tiny_data"), cases=4, test_cases=2, shape=(32, 32, 24), seed=3)


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    from volseg.config import load_config
    from volseg.training import train

    logging.getLogger("volseg").setLevel(logging.INFO)
    return train(tiny_dataset, load_config(None, TINY), tmp_path_factory.mktemp("runs") / "run3d", device="cpu")


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.2", positions=None) -> None:
    """A minimal CT series, one file per slice (SimpleITK's GDCM writer); the series UID tag
    tells GDCM which series a file belongs to. ``positions``: each slice's ImagePositionPatient
    (default: the image's own grid), to write irregular series."""
    folder.mkdir(exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    tags = [("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", series_uid),
            ("0020|0037", "\\".join(str(v) for v in d[0::3] + d[1::3]))]  # the row and column axes: the matrix's columns
    for i in range(image.GetDepth()):
        sl = image[:, :, i]
        for k, v in tags:
            sl.SetMetaData(k, v)
        pos = image.TransformIndexToPhysicalPoint((0, 0, i)) if positions is None else positions[i]
        sl.SetMetaData("0020|0032", "\\".join(str(v) for v in pos))
        sl.SetMetaData("0020|0013", str(i))
        sl.SetMetaData("0008|0018", f"{series_uid}.{i}")
        writer.SetFileName(str(folder / f"{series_uid[-1]}_{i:03d}.dcm"))
        writer.Execute(sl)
