"""Training: the ignite engine and the self-describing run folder."""

from .engine import train

__all__ = ["train"]
