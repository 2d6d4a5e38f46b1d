"""The run folder: the contract between training (which writes it) and inference (which reads
it). :mod:`.files` reads and writes config, plan, split and checkpoints (safely), :mod:`.lock`
keeps one writer, :mod:`.layout` knows cross-validation parents, validation predictions and the
learned postprocessing rule."""

from .errors import RunFolderError, RunLockedError
from .files import checkpoint_path, load_checkpoint, read_config, read_plan, stored_split, write_run_files
from .layout import (
                     CV_FILE,
                     POSTPROCESSING,
                     VAL_PREDICTIONS,
                     expand_runs,
                     fold_dirs,
                     is_cv_parent,
                     read_postprocessing,
                     runs_of,
                     validation_pairs,
                     write_postprocessing,
)
from .lock import RunLock

__all__ = ["RunFolderError", "RunLockedError", "RunLock", "checkpoint_path", "load_checkpoint", "read_config", "read_plan",
           "stored_split", "write_run_files", "CV_FILE", "POSTPROCESSING", "VAL_PREDICTIONS", "expand_runs", "fold_dirs",
           "is_cv_parent", "read_postprocessing", "runs_of", "validation_pairs", "write_postprocessing"]
