"""Errors of the run folder, the contract between training and inference."""

from ..config import ConfigError

__all__ = ["RunFolderError", "RunLockedError"]


class RunFolderError(ConfigError):
    """A file of a run folder is corrupt, unsafe or inconsistent; the message names it."""


class RunLockedError(FileExistsError):
    """Another live process holds the run folder's lock; the message names it."""
