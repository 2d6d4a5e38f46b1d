"""The checks every config section uses: the error type and its value checks."""

from __future__ import annotations

import difflib
import math
import reprlib
from typing import Any, Sequence

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel, _short.maxlist, _short.maxtuple, _short.maxdict = 2, 5, 5, 5


def excerpt(value: Any) -> str:
    """A short ``repr`` of ``value`` for an error message: long strings and big or deeply nested
    lists are cut with ``...`` (reprlib never walks past what it shows, so a YAML alias bomb
    costs nothing here)."""
    return _short.repr(value)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the allowed values."""


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise with a did-you-mean hint."""
    if value in allowed:
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
        if close:
            hint = f" Did you mean {close[0]!r}?"
    raise ConfigError(f"{name}={excerpt(value)} is not valid; choose one of {list(allowed)}.{hint}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={excerpt(value)} must be {'>= 0' if allow_zero else '> 0'}.")


def _prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={excerpt(value)} must be a probability in [0, 1].")
