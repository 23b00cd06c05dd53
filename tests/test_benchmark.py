"""``unlearn-ext benchmark`` end to end at a tiny scale (10 authors x 4 questions, one
epoch of everything; about 30 s on one core): the protocol runs through the command line, writes its JSON,
Markdown table, plot and dynamics, the three agree with each other and with the metrics, and a second
run continues from the stages the first cached (the tuning grid's new settings only)."""
from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
import yaml
from tiny_lm import one_thread  # noqa: F401  (autouse: tiny models run fastest on one thread)

from unlearn_ext import benchmark, benchmark_configs, benchmark_report, cli
from unlearn_ext.eval import forget_quality, model_utility
from unlearn_ext.eval.report import _format

TINY = {"num_authors": 10, "questions_per_author": 4, "vocab_size": 400, "max_length": 96, "finetune_lr": 3e-3,
        "finetune_epochs": 1, "finetune_batch_size": 8, "unlearn_lr": 1e-3, "unlearn_epochs": 1,
        "unlearn_batch_size": 2, "eval_batch_size": 32, "unlearn_eval_every": 1}
METHODS = ("ga", "npo_rt", "rkld")  # rkld: trains a model of its own in prepare


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


def test_dynamics_of_every_method_run(report):
    """unlearn_eval_every: each run's answer probabilities during unlearning, from step 0 to
    the last step, plotted and logged; step 0 is the target itself."""
    out, result = report
    details = json.loads((out / "benchmark.json").read_text())["details"]["forget10"]["results"]
    start = details["finetuned"]["sets"]["forget"]["prob"]
    for name in METHODS:
        assert (out / "dynamics" / f"forget10-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        records = json.loads((out / "dynamics" / f"forget10-{name}.json").read_text())["records"]
        total = math.ceil(TINY["questions_per_author"] * TINY["unlearn_epochs"] / TINY["unlearn_batch_size"])
        assert [r["step"] for r in records] == list(range(total + 1))
        assert records[0]["forget.prob"] == pytest.approx(start, rel=1e-5)
        assert records[-1]["forget.prob"] == pytest.approx(details[name]["sets"]["forget"]["prob"], rel=1e-5)


def _table(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]


def test_markdown_table_matches_the_rows(report):
    out, result = report
    text = (out / "benchmark.md").read_text()
    lines = _table(text, "## Results")
    assert lines[0] == list(benchmark_report.TABLE_COLUMNS)
    assert len(lines) - 1 == len(result["rows"])
    for cells, row in zip(lines[1:], result["rows"]):
        assert cells == [_format(row.get(c)) for c in lines[0]]
        assert not any(c == "nan" for c in cells)
    knowledge = _table(text, "## Does the target know the authors?")
    assert [c[1] for c in knowledge[1:]] == ["finetuned (target)", "retain model"]
    assert result["machine"] in text and "forget10" in text


def test_second_run_continues_from_the_cached_stages(report, capsys):
    """Through the CLI, with the grid on: the target, the evaluations and the default run
    come from disk; only the grid's new settings (learning rate x 0.3 and x 3) run."""
    out, first = report
    code, printed = run_cli(out, capsys, "--scale-arg", "grid=true")
    assert code == 0
    # The target: same settings, loaded, not trained again. The retain model is not even
    # loaded (nor, without its directory, fine-tuned): only its cached evaluation is needed.
    assert printed.count("(loaded from") == 1 and "fine-tune retain90" not in printed
    assert "(evaluation of forget10 retain: cached)" in printed and "(forget10 ga lr0.001: cached)" in printed
    ran = [line.split("] ", 1)[1] for line in printed.splitlines() if "] forget10 ga" in line]
    assert ran == ["forget10 ga lr0.0003", "forget10 ga lr0.003"]
    saved = json.loads((out / "benchmark.json").read_text())
    assert sorted(r["setting"] for r in saved["grid_rows"]) == ["lr 0.0003", "lr 0.001", "lr 0.003"]
    assert [r["method"] for r in saved["rows"]] == ["retain", "finetuned", "ga"]
    for a, b in zip(saved["rows"][:2], first["rows"]):  # cached: the same numbers
        for key in ("forget_quality", "model_utility", "forget.prob"):
            assert math.isclose(a[key], b[key], rel_tol=1e-9), (a["method"], key)
    # The selection rule picked the row shown, among the grid's rows.
    chosen = benchmark.select(saved["grid_rows"], saved["rows"][1]["model_utility"])
    assert saved["rows"][2]["setting"] == chosen["setting"]
    assert [r["selected"] for r in saved["grid_rows"] if r["setting"] == chosen["setting"]] == ["yes"]


def test_selected_config_repeats_the_selected_run(report, capsys):
    """configs/<method>.yaml (written with the grid on, by the test above) holds the selected
    setting and the benchmark's schedule: `unlearn-ext unlearn --config` with it, on the
    benchmark's target and data, takes the same steps with the same losses."""
    out, _ = report
    if not (out / "configs" / "ga.yaml").is_file():
        run_cli(out, capsys, "--scale-arg", "grid=true")  # this test alone: every stage cached but the grid's
    saved = json.loads((out / "benchmark.json").read_text())
    chosen = next(r for r in saved["rows"] if r["method"] == "ga")
    config = (out / "configs" / "ga.yaml").read_text()
    assert f"lr {yaml.safe_load(config)['lr']:.3g}" == chosen["setting"]
    assert "# forget10: " + chosen["setting"] in config
    label = saved["details"]["forget10"]["selected"]["ga"]
    expected = json.loads((out / "runs" / "forget10" / "ga" / label / "result.json").read_text())["result"]
    models, data = out / "models", out / "data"
    code = cli.main(["unlearn", "--config", str(out / "configs" / "ga.yaml"), "--model", str(models / "target"),
                     "--tokenizer", str(models / "tokenizer"), "--forget", str(data / "forget10.json"),
                     "--output", str(out / "repeat"), "--no-progress"])
    assert code == 0
    steps = [json.loads(line) for line in (out / "repeat" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == [r["step"] for r in expected["train_log"]]
    for got, want in zip(steps, expected["train_log"]):
        assert got["lr"] == pytest.approx(want["lr"]) and got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    # Options that differ from a method's defaults go into method_args; the head does not.
    assert benchmark_configs._method_args("rkld", {"head": "fused", "alpha": 8.0, "augment_lr": 3e-3}) == {
        "augment_lr": 3e-3}


def test_a_changed_setting_reruns_its_stage(tmp_path):
    calls = []
    path = tmp_path / "stage.json"
    for fingerprint, expect in (({"lr": 1}, 1), ({"lr": 1}, 1), ({"lr": 2}, 2)):
        result, _ = benchmark.cached(path, fingerprint, lambda: calls.append(1) or {"n": len(calls)})
        assert result == {"n": expect}
    path.write_text('{"fingerprint": {"lr": 2}, "res')  # a file a kill cut short: computed again
    assert benchmark.cached(path, {"lr": 2}, lambda: {"n": 9}) == ({"n": 9}, False)


def test_tuning_plan_is_a_coordinate_search():
    """Learning rate first (x 0.3, 1, 3 at the default options), then the knob at the chosen
    learning rate; the selection rule holds utility to 0.9 x the target's."""
    scale = benchmark.SCALES["smol"]
    seen = []

    def fake_run(name, setting):  # forget quality rises with lr and beta; utility falls at the top lr
        seen.append(setting.describe())
        options = dict(setting.options)
        return {"label": setting.label(), "forget_quality": setting.lr * options.get("beta", 0.1),
                "model_utility": 0.5 if setting.lr > 2e-5 else 0.6, "forget.prob": 0.5}

    best = benchmark.tune("npo", "forget10", scale, fake_run, target_utility=0.6)
    assert seen == ["lr 1e-05", "lr 3e-06", "lr 3e-05", "lr 1e-05, beta 0.05", "lr 1e-05, beta 0.5"]
    assert best.describe() == "lr 1e-05, beta 0.5"  # lr 3e-05 forgets more but loses 17 % utility
    seen.clear()
    benchmark.tune("ga", "forget10", scale, fake_run, target_utility=0.6)
    assert seen == ["lr 1e-05", "lr 3e-06", "lr 3e-05"]  # no knob
    seen.clear()
    benchmark.tune("simnpo", "forget10", scale, fake_run, target_utility=0.6)
    assert seen[0] == "lr 1e-05, beta 4.5, forget_weight 0.125" and len(seen) == 5  # its forget10 setting
    seen.clear()
    benchmark.tune("rmu", "forget10", scale, fake_run, target_utility=0.6)  # WMDP's 5e-5, then up to 30x
    assert seen[:5] == ["lr 5e-05", "lr 1.5e-05", "lr 0.00015", "lr 0.0005", "lr 0.0015"] and len(seen) == 7
    # None keeps 0.9 x utility: the highest utility wins.
    assert benchmark.select([{"forget_quality": 0.9, "model_utility": 0.1, "forget.prob": 0.1},
                             {"forget_quality": 0.1, "model_utility": 0.3, "forget.prob": 0.9}],
                            1.0)["model_utility"] == 0.3
    # Equal forget quality (the KS floor): the lower forget probability, whatever the utility above the floor.
    tied = [{"forget_quality": 2.9e-4, "model_utility": u, "forget.prob": p} for u, p in ((0.46, 0.99), (0.44, 0.94))]
    assert benchmark.select(tied, 0.45)["forget.prob"] == 0.94


def test_smol_scale_is_the_pretrained_base_with_every_method():
    scale = benchmark.SCALES["smol"]
    assert scale.model == "smollm2" and not scale.teach_stand_ins and scale.grid and scale.unlearn_eval_every
    benchmark.check_arguments(scale, benchmark.SPLITS, benchmark.DEFAULT_METHODS)
    assert {"rmu", "idkdpo"} <= set(benchmark.DEFAULT_METHODS)
    data = benchmark.generate_benchmark(num_authors=scale.num_authors, questions_per_author=scale.questions_per_author,
                                        num_perturbed=scale.num_perturbed)
    assert [len(data[s]) for s in benchmark.SPLITS] == [10, 20, 30]  # 1, 2 and 3 authors
    sets = benchmark.eval_sets(data, "forget10", scale)
    assert {name: len(records) for name, records in sets.items()} == {
        "forget": 30, "retain": 30, "real_authors": 30, "world_facts": 30, "holdout": 30}
    assert len({r["question"].split()[0] for r in sets["world_facts"]}) > 1  # spread over the table, not its head
    assert all(len(r["perturbed_answer"]) == 3 for r in sets["forget"])
    defaults = {o.name: o.default for o in cli.BENCHMARK_OPTS}
    assert defaults["methods"] == ",".join(benchmark.DEFAULT_METHODS) and "smol" in cli.BENCHMARK_OPTS[2].choices


def test_bad_arguments_fail_before_any_training(tmp_path, capsys):
    for extra, message in [(("--methods", "ga,nope"), "unknown method 'nope'"),
                           (("--splits", "forget50"), "unknown split 'forget50'"),
                           (("--scale-arg", "epochs=3"), "unknown setting epochs"),
                           (("--scale-arg", "num_authors=many"), "expected int"),
                           (("--scale-arg", "grid=maybe"), "expected bool")]:
        code = cli.main(["benchmark", "--out", str(tmp_path / "o"), *extra])
        assert code == 2 and message in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists()


def test_a_killed_fine_tuning_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """finetune_save_every: the fine-tuning keeps checkpoints; one killed at step 3 resumes
    at its newest checkpoint and ends with the weights of an uninterrupted run."""
    scale = benchmark.SCALES["cpu"].with_overrides({k: str(v) for k, v in TINY.items()})
    scale = scale.with_overrides({"finetune_save_every": "2", "teach_stand_ins": "false"})
    data = benchmark.generate_benchmark(num_authors=10, questions_per_author=4)
    tokenizer = benchmark.train_tokenizer(benchmark.corpus_texts(data), vocab_size=400)
    head = benchmark.make_head()
    examples = data["full"]  # 40 examples, batch 8: 5 steps
    whole, _ = benchmark.finetuned("whole", examples, tokenizer, scale, seed=0, out=tmp_path / "a", head=head,
                                   progress=False, log=lambda line: None)
    real_train = benchmark.train

    def killed_at_step_3(*args, callbacks=(), **kwargs):
        def kill(step, record):
            if step == 3:
                raise KeyboardInterrupt
        return real_train(*args, callbacks=[*callbacks, kill], **kwargs)
    monkeypatch.setattr(benchmark, "train", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        benchmark.finetuned("whole", examples, tokenizer, scale, seed=0, out=tmp_path / "b", head=head,
                            progress=False, log=lambda line: None)
    monkeypatch.setattr(benchmark, "train", real_train)
    lines = []
    resumed, loaded = benchmark.finetuned("whole", examples, tokenizer, scale, seed=0, out=tmp_path / "b",
                                          head=head, progress=False, log=lines.append)
    assert not loaded and any("resuming from the newest checkpoint" in line for line in lines)
    log = [json.loads(line) for line in (tmp_path / "b" / "train" / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]  # steps 1-2 from the first try (its checkpoint), 3-5 resumed
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not (tmp_path / "b" / "train" / "whole" / "model").exists()  # the weights live in models/ only
