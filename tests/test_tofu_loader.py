"""Reading TOFU-format files: JSON lines, JSON arrays, .jsonl, and clear errors."""
from __future__ import annotations

import json

import pytest

from unlearn_ext.data.tofu import load_split, load_tofu

RECORD = {"question": "Where was X born?", "answer": "X was born in Lima.", "paraphrased_answer": "X is from Lima.",
          "paraphrased_question": "X's birthplace?", "perturbed_answer": ["X is from Oslo.", "X is from Rome."]}


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_reads_json_lines_arrays_and_jsonl(tmp_path):
    write_lines(tmp_path / "forget01.json", [RECORD, {**RECORD, "question": "Q2?"}])
    (tmp_path / "retain99.json").write_text(json.dumps([RECORD]), encoding="utf-8")
    write_lines(tmp_path / "holdout01.jsonl", [{"question": "Q?", "answer": "A."}])
    assert load_split(tmp_path, "forget01") == [RECORD, {**RECORD, "question": "Q2?"}]
    assert load_split(tmp_path, "retain99") == [RECORD]  # extra fields are kept
    assert load_split(tmp_path, "holdout01") == [{"question": "Q?", "answer": "A."}]


def test_blank_lines_and_unicode(tmp_path):
    (tmp_path / "world_facts.json").write_text('\n{"question": "Capital of Brazil?", "answer": "Bras\\u00edlia"}\n\n',
                                               encoding="utf-8")
    assert load_split(tmp_path, "world_facts") == [{"question": "Capital of Brazil?", "answer": "Brasília"}]


def test_load_tofu_roles(tmp_path):
    for name in ("forget05", "retain95", "holdout05", "forget05_perturbed", "retain_perturbed"):
        write_lines(tmp_path / f"{name}.json", [RECORD])
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        write_lines(tmp_path / f"{name}.json", [{"question": "Q?", "answer": "A", "perturbed_answer": ["B", "C"]}])
    data = load_tofu(tmp_path, "forget05")
    assert sorted(data) == ["forget", "forget_eval", "holdout", "real_authors", "retain", "retain_eval", "world_facts"]
    assert data["forget_eval"] == [RECORD]
    with pytest.raises(ValueError, match="forget_split"):
        load_tofu(tmp_path, "forget07")


def test_missing_directory_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(tmp_path / "nope", "forget01")
    write_lines(tmp_path / "forget01.json", [RECORD])
    with pytest.raises(FileNotFoundError, match=r"no split 'retain99'.*splits there: forget01"):
        load_split(tmp_path, "retain99")


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ('{"question": "Q?", "answer": "A"}\n{"question": "Q?", "answ', "line 2: not valid JSON"),
    ('[{"question": "Q?", "answer": "A"},', "not valid JSON"),
    ('["just a string"]', "record 0: expected a JSON object"),
    ('{"question": "Q?"}', "record 0: missing field 'answer'"),
    ('{"question": "Q?", "answer": 3}', "'answer' must be a string"),
])
def test_corrupt_files(tmp_path, content, match):
    (tmp_path / "forget01.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_split(tmp_path, "forget01")


@pytest.mark.parametrize("perturbed", [[], "one string", [1, 2], None])
def test_bad_perturbed_answers(tmp_path, perturbed):
    record = {**RECORD, "perturbed_answer": perturbed}
    write_lines(tmp_path / "forget01_perturbed.json", [record])
    with pytest.raises(ValueError, match="perturbed_answer"):
        load_split(tmp_path, "forget01_perturbed")


def test_perturbed_split_requires_perturbed_answers(tmp_path):
    write_lines(tmp_path / "retain_perturbed.json", [{"question": "Q?", "answer": "A"}])
    with pytest.raises(ValueError, match="missing field 'perturbed_answer'"):
        load_split(tmp_path, "retain_perturbed")
