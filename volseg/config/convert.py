"""dict <-> dataclass: a nested dict checked and coerced into a :class:`Config`, and back."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Optional, Tuple, Union

from .checks import ConfigError, excerpt
from .sections import Config


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin in (tuple, Tuple):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={excerpt(value)} must be a list.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name}={excerpt(value)} must have {len(args)} entries.")
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}={excerpt(value)} must be true or false.")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{name}={excerpt(value)} must be an integer.")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={excerpt(value)} must be a number.")
        if not math.isfinite(value):  # YAML reads .nan/.inf, and "nan"/"inf" strings parse above
            raise ConfigError(f"{name}={excerpt(value)} must be a finite number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={excerpt(value)} must be a string.")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {name}")  # pragma: no cover


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"section {prefix or 'root'!r} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        where = f"{prefix}.{key}" if prefix else str(key)
        raise ConfigError(f"unknown config key {where!r}; valid keys{' in ' + prefix if prefix else ''}: {names}.{hint}")
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        name = f"{prefix}.{k}" if prefix else k
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, name)
        else:
            kwargs[k] = _coerce(name, v, tp)
    return cls(**kwargs)


def from_dict(data: Optional[dict]) -> Config:
    """Build a :class:`Config` from a nested dict, rejecting unknown keys and bad values."""
    return _build(Config, data or {}, "")


def to_dict(cfg: Any) -> dict:
    """Nested plain-Python dict (tuples as lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def replace(cfg: Config, **sections: dict) -> Config:
    """Return ``cfg`` with keys of the named sections replaced, re-validated."""
    data = to_dict(cfg)
    for section, values in sections.items():
        data[section].update(values)
    return from_dict(data)
