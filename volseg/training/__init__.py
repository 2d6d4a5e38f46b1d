"""Training: the ignite engine (:mod:`.engine`), cached data (:mod:`.data`), its handlers
(:mod:`.handlers`), checkpoint state (:mod:`.state`), the run's log (:mod:`.logfile`) and the
validation predictions written at the end (:mod:`.validation`)."""

from .engine import train
from .handlers import TrainingDivergedError

__all__ = ["train", "TrainingDivergedError"]
