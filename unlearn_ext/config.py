"""Reading what a user hands over: YAML run configurations and JSON/JSONL example files.

Errors are ``ValueError``/``FileNotFoundError`` naming the file (and the line or record),
so the command line can print them as one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


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
    ``label``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"data file {path} is empty")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"data file {path} is neither a JSON list nor JSON lines: {e}") from None
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, record {i}: expected an object, got {type(record).__name__}")
        for name in fields:
            if name not in record:
                raise ValueError(f"{path}, record {i}: missing field {name!r}")
            if name != "label" and not isinstance(record[name], str):
                raise ValueError(f"{path}, record {i}: field {name!r} must be a string")
    return records
