"""Read TOFU-format splits from a local directory: the real TOFU files or our generated ones.

TOFU's files (``forget10.json``, ``retain90.json``, ``forget10_perturbed.json``,
``retain_perturbed.json``, ``real_authors_perturbed.json``, ``world_facts_perturbed.json``,
``holdout10.json``, …) hold one JSON object per line despite the ``.json`` suffix; a JSON
array of objects and ``.jsonl`` files are read as well. Nothing is fetched: download the
files once (e.g. with ``huggingface-cli download locuslab/TOFU --repo-type dataset
--local-dir DIR``) or generate them with :func:`unlearn_ext.data.synthetic.write_benchmark`.
"""
from __future__ import annotations

import json
import os

FORGET_SPLITS = ("forget01", "forget05", "forget10")
# Which retain/holdout split goes with each forget split (TOFU's pairing).
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
# Fields each record must have (TOFU names); perturbed_answer is a list of strings.
QA_FIELDS = ("question", "answer")
PERTURBED_FIELDS = ("question", "answer", "perturbed_answer")


def _split_path(root: str | os.PathLike, name: str) -> str:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"TOFU data directory {os.fspath(root)!r} does not exist")
    for suffix in (".json", ".jsonl"):
        path = os.path.join(root, name + suffix)
        if os.path.isfile(path):
            return path
    present = sorted(f.rsplit(".", 1)[0] for f in os.listdir(root) if f.endswith((".json", ".jsonl")))
    raise FileNotFoundError(f"no split {name!r} ({name}.json or {name}.jsonl) in {os.fspath(root)!r}; "
                            f"splits there: {', '.join(present) or 'none'}")


def parse_records(path: str) -> list:
    """The JSON values of a JSON array file or a JSON-lines file; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path} is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({e})") from None
    return records


def check_records(records: list, path: str | os.PathLike, fields: tuple[str, ...]) -> None:
    """Every record an object with ``fields``: strings, except ``perturbed_answer`` (a
    non-empty list of strings) and ``label`` (any JSON value)."""
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}, record {i}: expected a JSON object, got {type(r).__name__}")
        for field in fields:
            if field not in r:
                raise ValueError(f"{path}, record {i}: missing field {field!r} (has {sorted(r)})")
            value = r[field]
            if field == "perturbed_answer":
                if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                    raise ValueError(f"{path}, record {i}: 'perturbed_answer' must be a non-empty list of strings")
            elif field != "label" and not isinstance(value, str):
                raise ValueError(f"{path}, record {i}: {field!r} must be a string, got {type(value).__name__}")


def load_split(root: str | os.PathLike, name: str, fields: tuple[str, ...] | None = None) -> list[dict]:
    """The records of split ``name`` under ``root`` as a list of dicts (all their fields).

    ``fields``: the fields every record must have; default: ``question``, ``answer``, and
    for ``*_perturbed`` splits ``perturbed_answer`` too. Raises ``FileNotFoundError``
    naming the splits that are there, or ``ValueError`` naming the file, line/record and
    field at fault.
    """
    path = _split_path(root, name)
    records = parse_records(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected JSON lines or a JSON array of objects")
    if fields is None:
        fields = PERTURBED_FIELDS if name.endswith("_perturbed") else QA_FIELDS
    check_records(records, path, fields)
    return records


def load_tofu(root: str | os.PathLike, forget_split: str = "forget10") -> dict[str, list[dict]]:
    """Everything one unlearning run needs, keyed by role:

    ``forget`` / ``retain`` (training QA), ``forget_eval`` (``<forget>_perturbed``),
    ``retain_eval`` (``retain_perturbed``), ``real_authors``, ``world_facts`` (their
    ``_perturbed`` files) and ``holdout`` (for membership inference).
    """
    if forget_split not in RETAIN_OF:
        raise ValueError(f"forget_split must be one of {FORGET_SPLITS}, got {forget_split!r}")
    return {
        "forget": load_split(root, forget_split),
        "retain": load_split(root, RETAIN_OF[forget_split]),
        "forget_eval": load_split(root, f"{forget_split}_perturbed", PERTURBED_FIELDS + ("paraphrased_answer",)),
        "retain_eval": load_split(root, "retain_perturbed", PERTURBED_FIELDS + ("paraphrased_answer",)),
        "real_authors": load_split(root, "real_authors_perturbed"),
        "world_facts": load_split(root, "world_facts_perturbed"),
        "holdout": load_split(root, HOLDOUT_OF[forget_split]),
    }
