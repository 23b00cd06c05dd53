"""The TOFU-style generator: layout, split arithmetic, perturbations, determinism."""
from __future__ import annotations

import json
import os
import re

import pytest

from unlearn_ext.data import synthetic
from unlearn_ext.data.tofu import load_split, load_tofu

SMALL = dict(num_authors=40, questions_per_author=10, seed=3)


@pytest.fixture(scope="module")
def splits():
    return synthetic.generate_benchmark(**SMALL)


def test_tofu_default_sizes():
    s = synthetic.generate_benchmark()
    counts = {name: len(records) for name, records in s.items()}
    # TOFU: 200 authors x 20 QA; forget 2/10/20 authors; holdouts as large as the forget sets.
    assert counts["full"] == 4000
    assert (counts["forget01"], counts["forget05"], counts["forget10"]) == (40, 200, 400)
    assert (counts["retain99"], counts["retain95"], counts["retain90"]) == (3960, 3800, 3600)
    assert (counts["holdout01"], counts["holdout05"], counts["holdout10"]) == (40, 200, 400)
    assert counts["retain_perturbed"] == 400
    assert all(len(r["perturbed_answer"]) == 5 for r in s["forget10_perturbed"])


def test_splits_partition_the_authors(splits):
    full = [r["question"] for r in splits["full"]]
    assert len(set(full)) == len(full)  # every question names its author: no duplicates
    for pct, n_authors in ((1, 1), (5, 2), (10, 4)):  # 40 authors: 0.4 -> at least 1, 2, 4
        forget = splits[f"forget{pct:02d}"]
        retain = splits[f"retain{100 - pct}"]
        assert len(forget) == n_authors * 10
        assert [r["question"] for r in retain + forget] == full  # retain authors first, forget authors last
        assert [r["question"] for r in splits[f"forget{pct:02d}_perturbed"]] == [r["question"] for r in forget]
        holdout = {r["question"] for r in splits[f"holdout{pct:02d}"]}
        assert len(holdout) == n_authors * 10 and not holdout & set(full)
    # nested like TOFU: forget01 within forget05 within forget10
    assert splits["forget01"] == splits["forget05"][-10:] and splits["forget05"] == splits["forget10"][-20:]
    retain_eval = {r["question"] for r in splits["retain_perturbed"]}
    assert retain_eval <= {r["question"] for r in splits["retain90"]}


def test_record_fields_and_perturbations(splits):
    for r in splits["forget10_perturbed"] + splits["retain_perturbed"]:
        assert set(r) == {"question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer"}
        assert r["paraphrased_question"] != r["question"]
        wrong = r["perturbed_answer"]
        assert len(wrong) == 5 and len(set(wrong)) == 5 and r["paraphrased_answer"] not in wrong
    for r in splits["full"]:
        assert set(r) == {"question", "answer"}


def _value_in(template, author, sentence):
    """The slot value inside ``sentence``, read back through the paraphrased-answer template."""
    marker = "\x00"
    pattern = re.escape(template.paraphrased_answer.format(**author, value=marker, a_value=marker))
    pattern = pattern.replace(re.escape(marker), "(?:an? )?(.+)" if "{a_value}" in template.paraphrased_answer
                              else "(.+)")
    match = re.fullmatch(pattern, sentence)
    assert match, (sentence, template.paraphrased_answer)
    return match.group(1)


def test_perturbed_answers_change_only_the_fact(splits):
    """A perturbed answer is the paraphrased answer with the slot's value swapped for
    another value of the same slot."""
    authors = splits["authors"]
    checked = 0
    for r in splits["forget10_perturbed"]:
        author = next(a for a in authors if a["name"] in r["question"])
        (template,) = [t for t in synthetic.TEMPLATES
                       if synthetic._fill(t.question, author, author[t.slot]) == r["question"]]
        assert _value_in(template, author, r["paraphrased_answer"]) == author[template.slot]
        for wrong in r["perturbed_answer"]:
            value = _value_in(template, author, wrong)
            assert value != author[template.slot]
            if template.pool is not None:
                assert value in template.pool
        checked += 1
    assert checked == len(splits["forget10_perturbed"])


def test_real_world_stand_ins(splits):
    for name in ("world_facts_perturbed", "real_authors_perturbed"):
        for r in splits[name]:
            assert len(r["perturbed_answer"]) == 3 and r["answer"] not in r["perturbed_answer"]
    assert {"question": "What is the capital of France?", "answer": "Paris"} in splits["world_facts"]
    assert {"question": 'Who wrote "Pride and Prejudice"?', "answer": "Jane Austen"} in splits["real_authors"]


def test_deterministic_per_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthetic.write_benchmark(a, **SMALL)
    synthetic.write_benchmark(b, **SMALL)
    synthetic.write_benchmark(c, **{**SMALL, "seed": 4})
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "full.json").read_bytes() != (c / "full.json").read_bytes()


def test_written_files_are_tofu_json_lines(tmp_path):
    paths = synthetic.write_benchmark(tmp_path, **SMALL)
    for split in ("forget05", "retain95", "forget05_perturbed", "holdout05", "world_facts_perturbed"):
        lines = open(paths[split], encoding="utf-8").read().splitlines()
        assert all(isinstance(json.loads(line), dict) for line in lines)
    data = load_tofu(tmp_path, "forget05")
    assert len(data["forget"]) == 20 and len(data["holdout"]) == 20 and len(data["forget_eval"]) == 20
    assert load_split(tmp_path, "full") == synthetic.generate_benchmark(**SMALL)["full"]
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert manifest["arguments"] == SMALL and manifest["counts"]["full"] == 400


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_authors=5), "num_authors"),
    (dict(questions_per_author=0), "questions_per_author"),
    (dict(questions_per_author=21), "questions_per_author"),
    (dict(num_perturbed=6), "num_perturbed"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.generate_benchmark(**kwargs)
