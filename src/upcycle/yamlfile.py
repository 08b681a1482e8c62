"""Reading a YAML options file, with one-line errors naming the file and the problem."""

from __future__ import annotations

from pathlib import Path

import yaml

from upcycle.errors import ConfigError


def read_mapping(path: str | Path, label: str = "config") -> dict:
    """The mapping at the top of a YAML file; keys with dashes are given underscores."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{label} {str(path)!r}: no such file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{label} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{label} {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
