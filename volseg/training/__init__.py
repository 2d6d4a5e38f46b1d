"""Training: the ignite engine (:mod:`.engine`), cached data (:mod:`.data`), its handlers
(:mod:`.handlers`) and the self-describing run folder (:mod:`.run_folder`)."""

from .engine import train
from .handlers import TrainingDivergedError
from .run_folder import RunFolderError, RunLockedError

__all__ = ["train", "RunFolderError", "RunLockedError", "TrainingDivergedError"]
