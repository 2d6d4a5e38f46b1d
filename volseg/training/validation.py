"""The end of a training run: its validation cases segmented as ``volseg infer`` would (same
predictor, best checkpoint, each mask on its scan's own grid) but without any largest-component
step, into ``RUN/val_predictions/<case>_seg.nii.gz``, and the postprocessing rule learned from
them (:func:`volseg.postprocessing.learn_postprocessing`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

from ..data.io import read_channels, write_label_like
from ..inference import Predictor
from ..postprocessing import learn_postprocessing
from ..runfolder import VAL_PREDICTIONS

log = logging.getLogger(__name__)

__all__ = ["finish_validation", "write_validation_predictions"]


def finish_validation(run: Path, cases: Sequence, device: str = "auto") -> None:
    """Write the validation predictions and learn the run's postprocessing (nothing without
    validation cases)."""
    if not cases:
        return
    write_validation_predictions(run, cases, device)
    learn_postprocessing(run)


def write_validation_predictions(run: Union[str, Path], cases: Sequence, device: str = "auto") -> Path:
    """Segment ``cases`` (manifest cases) with the run's best checkpoint into
    ``RUN/val_predictions/``; returns that folder."""
    run = Path(run)
    out = run / VAL_PREDICTIONS
    # raw predictions: the postprocessing is learned from them
    pred = Predictor.from_run(run, device=device, overrides={"largest_component": []})
    for case in cases:
        images = [img for p in case.images for img in read_channels(p)]
        labels = pred.predict(images, source=str(case.images[0]))["labels"]
        write_label_like(labels, case.images[0], images[0], out / f"{case.name}_seg.nii.gz")
    log.info("wrote %d validation predictions to %s", len(cases), out)
    return out
