"""``unlearn-ext benchmark`` end to end at a tiny scale (10 authors x 4 questions, one
epoch of everything; about 20 s on one core): the protocol runs through the command line, writes its JSON,
Markdown table and plot, and the three agree with each other and with the metrics."""
from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from tiny_lm import one_thread  # noqa: F401  (autouse: tiny models run fastest on one thread)

from unlearn_ext import benchmark, cli
from unlearn_ext.eval import forget_quality, model_utility
from unlearn_ext.eval.report import _format

TINY = {"num_authors": 10, "questions_per_author": 4, "vocab_size": 400, "max_length": 96, "finetune_lr": 3e-3,
        "finetune_epochs": 1, "finetune_batch_size": 8, "unlearn_lr": 1e-3, "unlearn_epochs": 1,
        "unlearn_batch_size": 4, "eval_batch_size": 32}
METHODS = ("ga", "npo_rt")


def run_cli(out, capsys, *extra):
    argv = ["benchmark", "--out", out, "--splits", "forget10", "--methods", "ga", "--no-progress",
            *[a for k, v in TINY.items() for a in ("--scale-arg", f"{k}={v}")], *extra]
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    scale = benchmark.SCALES["cpu"].with_overrides({k: str(v) for k, v in TINY.items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tiny_lm.one_thread, which is function-scoped and not yet active here
    try:
        result = benchmark.run_benchmark(scale, out, splits=("forget10",), methods=METHODS, progress=False,
                                         log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_writes_json_table_and_plot(report):
    out, result = report
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["rows"] == result["rows"] and saved["machine"] == result["machine"]
    assert [r["method"] for r in saved["rows"]] == ["retain", "finetuned", *METHODS]
    assert saved["head"] == "fused" and saved["scale"]["num_authors"] == TINY["num_authors"]
    for name in ("tokenizer", "target", "retain90"):
        assert (out / "models" / name).is_dir(), name
    assert (out / "data" / "forget10_perturbed.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("benchmark.json", "benchmark.md", "benchmark.png"):  # ordinary files, not private temporaries
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


def test_rows_follow_from_the_detailed_results(report):
    """Every headline number is the metric recomputed from the per-example details."""
    out, result = report
    details = json.loads((out / "benchmark.json").read_text())["details"]["forget10"]["results"]
    retain_ratios = details["retain"]["sets"]["forget"]["per_example"]["truth_ratio_raw"]
    assert len(retain_ratios) == TINY["questions_per_author"]  # forget10 of 10 authors: one author
    for row in result["rows"]:
        res = details[row["method"]]
        ratios = res["sets"]["forget"]["per_example"]["truth_ratio_raw"]
        expected = 1.0 if row["method"] == "retain" else forget_quality(ratios, retain_ratios)["forget_quality"]
        assert row["forget_quality"] == pytest.approx(expected)
        utility = model_utility(res["sets"][s][m] for s in ("retain", "real_authors", "world_facts")
                                for m in ("prob", "rouge", "truth_ratio"))
        assert row["model_utility"] == pytest.approx(utility)
        assert 0 <= row["model_utility"] <= 1 and 0 <= row["forget_quality"] <= 1
        assert 0 <= row["mia_auc"] <= 1
        assert (row["unlearn_s"] is None) == (row["method"] in ("retain", "finetuned"))
    # Unlearning moved the model: every method changed the forget probabilities.
    before = details["finetuned"]["sets"]["forget"]["per_example"]["prob"]
    for name in METHODS:
        assert details[name]["sets"]["forget"]["per_example"]["prob"] != before, name


def test_markdown_table_matches_the_rows(report):
    out, result = report
    text = (out / "benchmark.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(benchmark.TABLE_COLUMNS)
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    assert len(body) == len(result["rows"])
    for cells, row in zip(body, result["rows"]):
        assert cells == [_format(row.get(c)) for c in header]
        assert not any(c == "nan" for c in cells)
    assert result["machine"] in text and "forget10" in text


def test_second_run_reuses_the_models_through_the_cli(report, capsys):
    out, first = report
    code, printed = run_cli(out, capsys)
    assert code == 0
    assert printed.count("(loaded from") == 2  # target and retain90: same settings, not trained again
    again = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [r["method"] for r in again] == ["retain", "finetuned", "ga"]
    for a, b in zip(again, first["rows"]):  # seeded: the same numbers
        assert a["method"] == b["method"]
        for key in ("forget_quality", "model_utility", "forget.prob"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (a["method"], key)


def test_bad_arguments_fail_before_any_training(tmp_path, capsys):
    for extra, message in [(("--methods", "ga,nope"), "unknown method 'nope'"),
                           (("--splits", "forget50"), "unknown split 'forget50'"),
                           (("--scale-arg", "epochs=3"), "unknown setting epochs"),
                           (("--scale-arg", "num_authors=many"), "expected int")]:
        code = cli.main(["benchmark", "--out", str(tmp_path / "o"), *extra])
        assert code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists()
