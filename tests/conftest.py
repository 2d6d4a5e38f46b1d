"""Shared fixtures: tiny synthetic datasets and one tiny trained run per session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

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
