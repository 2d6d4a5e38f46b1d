"""Config files: ``--set`` overrides, the shipped configs and :func:`load_config`."""

from __future__ import annotations

import dataclasses
import difflib
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Sequence, Union

import yaml

from .checks import ConfigError, check_choice, excerpt
from .convert import from_dict
from .sections import Config

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


MAX_YAML_BYTES = 1 << 20  # a config is a page of keys; 1 MiB is far beyond any real one
MAX_YAML_DEPTH = 20  # sections, keys, lists of lists: a real config nests 3 deep
MAX_YAML_ALIASES = 50  # each alias may double what a document expands to (the "billion laughs")


def parse_yaml(text: str, where: str) -> object:
    """``yaml.safe_load(text)`` after bounding what it may build: its size, its nesting and its
    aliases are counted on PyYAML's event stream (a state machine: no recursion, nothing built)
    before the document is composed, so an alias bomb or a config nested thousands deep is
    refused in one line naming ``where`` instead of exhausting memory or the stack."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters of YAML; a config is at most {MAX_YAML_BYTES}.")
    depth = aliases = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise ConfigError(f"{where}: YAML nested more than {MAX_YAML_DEPTH} levels deep (line {event.start_mark.line + 1}); a config nests 3.")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_YAML_ALIASES:
                    raise ConfigError(f"{where}: more than {MAX_YAML_ALIASES} YAML aliases (*name); write the values out instead.")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {str(exc)[:300]}") from None


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict; values are parsed as YAML
    (``[16,32]``, ``true``, ``1e-3``) and then type-checked by :func:`from_dict`."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    sections = [f.name for f in dataclasses.fields(Config)]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {excerpt(item)} must look like section.key=value, e.g. train.epochs=10.")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key {excerpt(key)} must be section.key with a section in {sections}.")
        section, name = parts
        check_choice("config section", section, sections)
        value = parse_yaml(raw, f"override {excerpt(key.strip())}")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            data[section] = {}
        data[section][name] = value
    return data


def shipped_configs() -> Dict[str, Traversable]:
    """The configs shipped with volseg, by name (file stem, e.g. ``demo``, ``gpu_fullres``).

    Installed (``pip install .``) they are package data in ``volseg/configs/`` (pyproject.toml
    maps the package ``volseg.configs`` to the top-level ``configs/`` folder); in a source
    checkout or an editable install they are that ``configs/`` folder itself."""
    folder = files("volseg").joinpath("configs")  # installed: the package data volseg/configs/
    if not folder.is_dir():  # not installed from a wheel: the checkout beside the package
        folder = Path(__file__).resolve().parents[2] / "configs"
    if not folder.is_dir():
        return {}
    return {f.name[: -len(".yaml")]: f for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")}


def find_config(name_or_path: Union[str, Path]) -> Union[Path, Traversable]:
    """The config file ``name_or_path`` names: an existing file, else a shipped config given by
    its bare name with or without ``.yaml`` (``gpu_fullres``, ``gpu_fullres.yaml``). A file of
    that name in the working directory wins over the shipped one."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if str(name_or_path) == path.name and name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, list(shipped), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a shipped config; shipped configs: {list(shipped)}.{hint}")


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides.
    ``path`` is a file or the name of a shipped config (see :func:`find_config`)."""
    data: dict = {}
    if path is not None:
        p = find_config(path)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8.") from None
        data = parse_yaml(text, f"config file {str(p)!r}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must contain a mapping of sections.")
    data = apply_overrides(data, overrides)
    try:
        return from_dict(data)
    except ConfigError as exc:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{exc}{where}") from None
