"""Typed, frozen configuration.

A config is a tree of frozen dataclasses (``Config`` -> sections -> keys). YAML files and
``--set section.key=value`` overrides both go through :func:`from_dict`, which rejects unknown
keys (naming the valid ones), coerces values to the declared type and checks ranges. The run
folder stores the *resolved* config (:func:`to_dict`), never the raw file.

The modules, each one job: :mod:`~volseg.config.checks` (``ConfigError`` and the value checks),
:mod:`~volseg.config.sections` (the section dataclasses and their defaults, the only defaults),
:mod:`~volseg.config.convert` (dict <-> dataclass) and :mod:`~volseg.config.loading` (YAML
files, ``--set`` overrides, shipped configs). Every name is importable from here.
"""

from __future__ import annotations

from .checks import ConfigError, check_choice, excerpt
from .convert import from_dict, replace, to_dict
from .loading import apply_overrides, find_config, load_config, shipped_configs
from .sections import ACTS, NORMS, VARIANTS, AugmentConfig, Config, DataConfig, InferConfig, ModelConfig, TrainConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "AugmentConfig",
    "TrainConfig",
    "InferConfig",
    "Config",
    "load_config",
    "shipped_configs",
    "find_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "check_choice",
    "excerpt",
    "replace",
    "VARIANTS",
    "NORMS",
    "ACTS",
]
