"""Reading what a user hands over: YAML run configurations and JSON/JSONL example files.

Errors are ``ValueError``/``FileNotFoundError`` naming the file (and the line or record),
so the command line can print them as one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .data.tofu import check_records, parse_records


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of option names (as on the command line, with ``_`` or ``-``) to values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def read_records(path: str | Path, fields: tuple[str, ...] = ("question", "answer")) -> list[dict]:
    """Records of a JSON file (a list of objects) or a JSON-lines file (one object per line,
    as TOFU ships them, whatever the suffix), each checked for ``fields`` (strings, except
    ``label``; see :func:`unlearn_ext.data.tofu.check_records`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = parse_records(os.fspath(path))
    check_records(records, path, fields)
    return records
