"""A run's ``train.log``: attached for one training call and detached when it ends."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

__all__ = ["run_log"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[logging.Handler]:
    """Write volseg's log records of this block to ``path`` (appending: a resumed run continues
    its log). The handler goes on the ``volseg`` logger for the block alone and is closed after
    it, so a second training in the same process writes only to its own log. Where no level is
    set (a Python user who configured no logging) INFO records would never be created, so the
    logger is lowered to INFO for the block and its own level restored after it."""
    logger = logging.getLogger("volseg")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
