"""The unlearn-ext command: help, one-line errors, YAML with flag overrides, end to end,
through ``cli.main`` (the console script's own entry point) on tiny Llamas."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_lm import FORGET, RETAIN, make_tokenizer, one_thread, tiny_llama  # noqa: F401

from unlearn_ext import cli
from unlearn_ext.methods import METHODS

pytestmark = pytest.mark.as_users_run  # no test-only switches (tests/conftest.py)


def _with_perturbed(records):
    """TOFU-style records: a paraphrase and two perturbed answers each (for truth ratios)."""
    answers = [r["answer"] for r in records]
    return [{**r, "paraphrased_answer": r["answer"], "perturbed_answer": [answers[(i + 1) % len(answers)],
                                                                          answers[(i + 2) % len(answers)]]}
            for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    tiny_llama().to(torch.bfloat16).save_pretrained(root / "model_bf16")  # a model stored in bf16
    make_tokenizer().save_pretrained(root / "model_bf16")
    (root / "forget.jsonl").write_text("\n".join(json.dumps(r) for r in FORGET))  # TOFU's layout
    (root / "retain.json").write_text(json.dumps(RETAIN))  # a JSON list works too
    (root / "forget_perturbed.json").write_text(json.dumps(_with_perturbed(FORGET)))
    (root / "retain_perturbed.json").write_text(json.dumps(_with_perturbed(RETAIN)))
    return root


def _unlearn(files, out, *extra, method="ga"):
    return ["unlearn", "--method", method, "--model", files / "model", "--forget", files / "forget.jsonl",
            "--retain", files / "retain.json", "--output", out, "--max-steps", 2, "--batch-size", 2, "--lr", "1e-3",
            "--no-progress", *extra]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_documents_every_option(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for opt in cli.COMMANDS[command][0]:
        assert (opt.dest.upper() if opt.flag_kind == "positional" else f"--{opt.name}") in text, opt.name
    if command == "unlearn":
        for name, method in METHODS.items():
            assert f"  {name}: " in text
            for field in method.Options.__dataclass_fields__:
                assert f"    {field} (default" in text


@pytest.mark.parametrize("argv,message", [
    (["unlearn", "--bogus"], "unrecognized arguments: --bogus"),
    (["unlearn", "--method", "ga"], "missing --model, --output, --forget"),
    (["unlearn", "--method", "nope", "--model", "{root}/model", "--forget", "{root}/forget.jsonl", "--output", "{root}/o"],
     "unknown method 'nope'"),
    (["unlearn", "--method", "npo", "--method-arg", "beta=high", "--model", "{root}/model", "--forget",
      "{root}/forget.jsonl", "--output", "{root}/o"], "option 'beta'"),
    (["unlearn", "--method", "npo", "--method-arg", "gamma=1", "--model", "{root}/model", "--forget",
      "{root}/forget.jsonl", "--output", "{root}/o"], "has no option 'gamma'"),
    (["unlearn", "--method", "ga", "--model", "{root}/missing", "--forget", "{root}/forget.jsonl", "--output",
      "{root}/o"], "not a local model directory"),
    (["unlearn", "--method", "ga", "--model", "{root}/model", "--forget", "{root}/missing.json", "--output",
      "{root}/o"], "data file"),
    (["unlearn", "--method", "graddiff", "--model", "{root}/model", "--forget", "{root}/forget.jsonl", "--output",
      "{root}/o"], "needs --retain"),
    (["finetune", "--lr", "fast", "--model", "{root}/model", "--data", "{root}/forget.jsonl", "--output", "{root}/o"],
     "option --lr"),
    (["finetune", "--config", "{root}/nope.yaml"], "config file"),
    ([], "choose a command"),
])
def test_bad_input_gets_one_line_and_status_2(capsys, files, argv, message):
    code, out, err = run(capsys, *[a.format(root=files) for a in argv])
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_console_script_prints_no_traceback(files):
    done = subprocess.run([sys.executable, "-m", "unlearn_ext.cli", "unlearn", "--method", "ga", "--model",
                           str(files / "nowhere"), "--forget", str(files / "forget.jsonl"), "--output",
                           str(files / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("unlearn-ext: error:") and "Traceback" not in done.stderr


def test_yaml_config_with_flags_overriding(capsys, files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"method": "npo_rt", "model": str(files / "model"),
                                      "forget": str(files / "forget.jsonl"), "retain": str(files / "retain.json"),
                                      "max-steps": 3, "lr": "1e-3", "batch_size": 2, "progress": False,
                                      "method_args": {"beta": 0.5, "retain_weight": 2}}))
    code, _, err = run(capsys, "unlearn", "--config", config, "--output", tmp_path / "out", "--max-steps", 1,
                       "--method-arg", "beta=0.25", "--no-fused")
    assert code == 0, err
    log = [json.loads(line) for line in (tmp_path / "out/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and log[0]["lr"] == pytest.approx(1e-3)
    saved = json.loads((tmp_path / "out/manifest.json").read_text())
    assert saved["train_config"]["batch_size"] == 2 and saved["run"]["method"] == "npo_rt"
    assert saved["run"]["method_options"]["beta"] == 0.25 and saved["run"]["method_options"]["retain_weight"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    code, _, err = run(capsys, "unlearn", "--config", bad)
    assert code == 2 and "unknown option learning_rate" in err


def test_finetune_then_unlearn_with_eul_then_eval(capsys, files, tmp_path):
    code, _, err = run(capsys, "finetune", "--model", files / "model", "--data", files / "retain.json", "--output",
                       tmp_path / "ft", "--max-steps", 2, "--batch-size", 2, "--no-progress")
    assert code == 0, err
    tuned = tmp_path / "ft/model"
    assert (tuned / "config.json").is_file() and (tuned / "tokenizer.json").is_file()
    code, _, err = run(capsys, "unlearn", "--method", "eul", "--model", tuned, "--forget", files / "forget.jsonl",
                       "--retain", files / "retain.json", "--output", tmp_path / "eul", "--max-steps", 2,
                       "--batch-size", 2, "--lr", "1e-2", "--no-progress")
    assert code == 0, err
    model, _ = cli.load_model_and_tokenizer({"model": str(tmp_path / "eul/model"), "tokenizer": None,
                                             "dtype": "float32"})
    assert hasattr(model, "unlearning_layers")  # the saved adapters come back with the model
    code, out, err = run(capsys, "eval", "--model", tmp_path / "eul/model", "--set", f"forget={files / 'forget.jsonl'}",
                         "--no-generate", "--no-progress")
    assert code == 0, err
    assert "forget" in json.loads(out)["sets"]
    assert "| forget | forget | 4 |" in err  # the table goes to stderr when the JSON goes to stdout


@pytest.mark.parametrize("path", sorted(cli.Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    command = "finetune" if path.name.startswith("finetune") else "unlearn"
    flags = {"config": str(path), "model": "m", "output": "o", **({"data": "d"} if command == "finetune" else
                                                                  {"forget": "f"})}
    values = cli.resolve(command, cli.COMMANDS[command][0], flags)
    if command == "unlearn":
        METHODS[values["method"]].make_options(cli._pairs(values["method_arg"], "method-arg"))


# ---- a run's footprint and identity -----------------------------------------------------------------


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_finished_run_keeps_its_model_in_the_stored_dtype_and_no_training_state(capsys, files, tmp_path):
    """The bf16-stored model trains in float32 (--dtype's default) and is saved in bf16; the
    checkpoint written to resume from (--save-every 1) is deleted when the run completes;
    every file follows the umask (safetensors alone writes 0600)."""
    before = os.umask(0o022)
    try:
        code, _, err = run(capsys, "unlearn", "--method", "ga", "--model", files / "model_bf16", "--forget",
                           files / "forget.jsonl", "--output", tmp_path / "run", "--max-steps", 2, "--batch-size", 2,
                           "--save-every", 1, "--no-progress")
    finally:
        os.umask(before)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.jsonl", "manifest.json", "model"]
    weights = load_file(str(tmp_path / "run/model/model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "run/model/config.json").read_text())["dtype"] == "bfloat16"
    for path in [tmp_path / "run/model", *(tmp_path / "run/model").iterdir()]:
        assert _mode(path) == (0o755 if path.is_dir() else 0o644), path


def test_keep_checkpoints_keeps_the_last_one_and_save_dtype_overrides(capsys, files, tmp_path):
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "run", "--keep-checkpoints", "--save-dtype", "float16"))
    assert code == 0, err
    step = tmp_path / "run/checkpoints/step_2"
    assert sorted(p.name for p in step.iterdir()) == ["optimizer.safetensors", "state.json", "trainable.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    assert all(_mode(p) == 0o666 & ~mask for p in step.iterdir())  # not safetensors' 0600
    assert {t.dtype for t in load_file(str(tmp_path / "run/model/model.safetensors")).values()} == {torch.float16}


def test_a_non_empty_output_is_refused_unless_resume_or_overwrite(capsys, files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, *_unlearn(files, out))
    assert code == 2 and "is not empty: pass --resume" in err and len(err.strip().splitlines()) == 1
    (out / "notes.txt").unlink()
    code, _, err = run(capsys, *_unlearn(files, out))
    assert code == 0, err
    first = (out / "model/model.safetensors").read_bytes()
    code, _, err = run(capsys, *_unlearn(files, out, "--lr", "1e-2"))  # the old run's checkpoints are gone, still refused
    assert code == 2 and "not empty" in err
    assert (out / "model/model.safetensors").read_bytes() == first
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, *_unlearn(files, out, "--lr", "1e-2", "--overwrite"))
    assert code == 0, err
    assert (out / "model/model.safetensors").read_bytes() != first
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    code, _, err = run(capsys, *_unlearn(files, out, "--resume", "--overwrite"))
    assert code == 2 and "exclude each other" in err


def test_manifest_start_line_and_summary_without_progress_bar(capsys, files, tmp_path):
    code, out, err = run(capsys, *_unlearn(files, tmp_path / "run", method="npo_rt"))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("unlearn npo_rt: 2 steps, global batch 2, lr 0.001 (linear, warmup 0), head fused")
    assert lines[-1].startswith("done: 2 steps in ") and "final loss " in lines[-1] and "peak memory cpu_rss" in lines[-1]
    assert lines[-1].endswith(f"model in {tmp_path / 'run/model'}")
    assert "it/s" not in err  # --no-progress: no bar, neither ours nor transformers'
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["command"] == "unlearn" and manifest["model"] == str((files / "model").resolve())
    assert manifest["data"] == {"forget": str(files / "forget.jsonl"), "retain": str(files / "retain.json")}
    run_ = manifest["run"]
    assert run_["method"] == "npo_rt" and run_["head"] == "fused" and run_["backend"] in ("cpu", "torch")
    assert run_["method_options"] == {"beta": 0.1, "forget_weight": 1.0, "retain_weight": 1.0, "masking": "answer"}
    assert set(manifest["versions"]) >= {"torch", "transformers", "unlearn_ext"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert "git_commit" in manifest and manifest["train_config"]["lr"] == 1e-3
    summary = manifest["summary"]
    assert summary["steps"] == 2 and summary["final"]["step"] == 2 and summary["model"] == str(tmp_path / "run/model")


def test_the_progress_bar_is_labelled_with_the_method(capsys, files, tmp_path):
    argv = [a for a in _unlearn(files, tmp_path / "run", method="graddiff") if a != "--no-progress"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert "unlearn graddiff: 100%" in err


# ---- training knobs -----------------------------------------------------------------------------------


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_lr_schedule_and_warmup_steps(capsys, files, tmp_path):
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "cos", "--max-steps", 5, "--lr-schedule", "cosine",
                                         "--warmup-steps", 1))
    assert code == 0, err
    import math
    assert [r["lr"] for r in _log(tmp_path / "cos")] == pytest.approx(
        [1e-3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 4)) for s in range(1, 5)])
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "const", "--lr-schedule", "constant"))
    assert code == 0, err
    assert [r["lr"] for r in _log(tmp_path / "const")] == pytest.approx([1e-3, 1e-3])
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "bad", "--lr-schedule", "step"))
    assert code == 2 and "--lr-schedule" in err


def test_train_layers_trains_only_the_chosen_blocks(capsys, files, tmp_path):
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "run", "--train-layers", "top:1", "--no-fused"))
    assert code == 0, err
    start, end = load_file(str(files / "model/model.safetensors")), load_file(str(tmp_path / "run/model/model.safetensors"))
    moved = {name for name in start if not torch.equal(start[name], end[name])}
    assert moved and all(name.startswith("model.layers.1.") for name in moved)
    assert json.loads((tmp_path / "run/manifest.json").read_text())["run"]["trainable_parameters"] == sum(
        t.numel() for n, t in start.items() if n.startswith("model.layers.1."))
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "bad", "--train-layers", "top:3"))
    assert code == 2 and "train_layers 'top:3': N must be in [1, 2]" in err
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "eul", "--train-layers", "top:1", method="eul"))
    assert code == 2 and "has no effect with method 'eul'" in err


def test_gradient_checkpointing_gives_the_same_run(capsys, files, tmp_path):
    for name, extra in (("plain", ()), ("ckpt", ("--gradient-checkpointing",))):
        code, _, err = run(capsys, *_unlearn(files, tmp_path / name, "--no-fused", *extra, method="npo_rt"))
        assert code == 0, err
    plain, ckpt = (load_file(str(tmp_path / n / "model/model.safetensors")) for n in ("plain", "ckpt"))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "ckpt/manifest.json").read_text())["train_config"]["gradient_checkpointing"]


def test_retain_batch_size(capsys, files, tmp_path):
    seen = []
    from unlearn_ext import data as data_module
    real = data_module.QACollator.__call__

    def spy(self, records):
        seen.append(len(records))
        return real(self, records)

    data_module.QACollator.__call__ = spy
    try:
        code, _, err = run(capsys, *_unlearn(files, tmp_path / "run", "--retain-batch-size", 5, "--no-fused",
                                             method="graddiff"))
    finally:
        data_module.QACollator.__call__ = real
    assert code == 0, err
    assert seen.count(5) == 2 and seen.count(2) == 2  # per step: 2 forget and 5 retain examples


# ---- evaluation during unlearning ----------------------------------------------------------------------


def test_eval_every_logs_plots_and_keeps_the_best(capsys, files, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, *_unlearn(files, out, "--max-steps", 4, "--eval-every", 2, "--keep-best",
                                              "--lr", "3e-3", method="graddiff"))
    assert code == 0, err
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all({"forget.prob", "retain.prob", "forget_prob", "retain_prob"} <= set(r) for r in records)
    assert records[-1]["forget_prob"] < records[0]["forget_prob"]  # it did forget
    assert (out / "eval.png").stat().st_size > 1000
    best = json.loads((out / "manifest.json").read_text())["summary"]["best"]
    floor = 0.9 * records[0]["retain_prob"]
    want = min((r for r in records if r["retain_prob"] >= floor), key=lambda r: r["forget_prob"])
    assert best["step"] == want["step"] > 0 and "0.9 x its value at step 0" in best["criterion"]
    assert (out / "best/model.safetensors").is_file() and f"best evaluation: step {want['step']}, model in" in stdout
    saved = load_file(str(out / "best/model.safetensors"))
    if want["step"] == 4:  # the last step: best/ is the final model
        final = load_file(str(out / "model/model.safetensors"))
        assert all(torch.equal(saved[k], final[k]) for k in final)
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "x", "--keep-best"))
    assert code == 2 and "need --eval-every" in err


def test_eval_every_with_a_method_that_trains_in_prepare(capsys, files, tmp_path):
    """RKLD fine-tunes its augmented model in prepare with the outer run's settings: the outer
    run's evaluation is not that inner run's (it failed with "eval_every and an evaluator go together")."""
    out = tmp_path / "run"
    code, _, err = run(capsys, *_unlearn(files, out, "--eval-every", 1, "--keep-best", method="rkld"))
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_keep_best_saves_nothing_when_no_step_beats_the_start(capsys, files, tmp_path):
    """lr 0 (constant): nothing moves, every evaluation equals step 0's, which stays the best."""
    code, stdout, err = run(capsys, *_unlearn(files, tmp_path / "run", "--eval-every", 1, "--keep-best", "--lr", 0,
                                              "--lr-schedule", "constant"))
    assert code == 0, err
    assert not (tmp_path / "run/best").exists()
    assert "best evaluation: step 0 (the starting model" in stdout


# ---- eval and compare ---------------------------------------------------------------------------------


def test_eval_roles_are_explicit_and_the_table_is_printed(capsys, files, tmp_path):
    code, out, err = run(capsys, "eval", "--model", files / "model", "--forget", f"mine={files / 'forget_perturbed.json'}",
                         "--retain", f"not_forget={files / 'retain_perturbed.json'}", "--holdout",
                         f"held={files / 'retain.json'}", "--output", tmp_path / "r.json", "--max-new-tokens", 4)
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert {n: s["kind"] for n, s in result["sets"].items()} == {"mine": "forget", "not_forget": "retain",
                                                                 "held": "holdout"}
    assert result["mia_auc"] is not None and result["model_utility"] is not None
    assert "| not_forget | retain | 12 |" in out and "model_utility" in out
    assert "evaluate:" in err and "/7 [" in err  # the progress bar (7 batches; how many updates show depends on speed)
    assert max(len(g.split()) for g in result["sets"]["mine"]["per_example"]["generation"]) <= 4


@pytest.mark.parametrize("content,message", [
    ({"sets": {}}, "has 0 forget sets"),
    ({"sets": {"mine": {"kind": "forget", "per_example": {}}}}, "lacks per_example.truth_ratio_raw"),
    ({"sets": {"other": {"kind": "forget", "per_example": {"truth_ratio_raw": [1.0] * 4}}}}, "forget sets differ"),
    ([1, 2], "has no 'sets'"),
])
def test_retain_result_is_checked_before_the_model_loads(capsys, files, tmp_path, content, message):
    (tmp_path / "ref.json").write_text(json.dumps(content))
    code, _, err = run(capsys, "eval", "--model", files / "no_model_here", "--forget",
                       f"mine={files / 'forget_perturbed.json'}", "--retain-result", tmp_path / "ref.json")
    assert code == 2 and message in err and "not a local model directory" not in err
    assert "sets.NAME.kind" in err or "differ" in err
    assert len(err.strip().splitlines()) == 1


def test_every_set_is_checked_before_the_model_loads(capsys, files, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{**FORGET[0], "perturbed_answer": ["a"]},
                                                   {**FORGET[1], "perturbed_answer": ["a", "b"]}]))
    code, _, err = run(capsys, "eval", "--model", files / "no_model_here", "--retain", f"r={files / 'retain.json'}",
                       "--forget", f"f={tmp_path / 'bad.json'}")
    assert code == 2 and "'perturbed_answer' list of one length" in err
    code, _, err = run(capsys, "eval", "--model", files / "model")
    assert code == 2 and "give at least one set" in err


def test_compare_prints_and_plots_the_change_per_set_and_question(capsys, files, tmp_path):
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "ga", "--lr", "3e-3"))
    assert code == 0, err
    sets = ["--forget", f"forget={files / 'forget_perturbed.json'}", "--retain", f"retain={files / 'retain.json'}",
            "--no-generate", "--no-progress"]
    for name, model in (("before", files / "model"), ("after", tmp_path / "ga/model")):
        code, _, err = run(capsys, "eval", "--model", model, *sets, "--output", tmp_path / f"{name}.json")
        assert code == 0, err
    code, out, err = run(capsys, "compare", tmp_path / "before.json", tmp_path / "after.json", "--plot",
                         tmp_path / "cmp.png")
    assert code == 0, err
    before, after = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("before", "after"))
    b, a = before["sets"]["forget"]["prob"], after["sets"]["forget"]["prob"]
    assert f"| forget | forget | {b:.3f} → {a:.3f} ({a - b:+.3g})" in out
    assert FORGET[0]["question"] in out and "answer probability per question" in out
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    code, _, err = run(capsys, "compare", tmp_path / "before.json")
    assert code == 2 and "at least one result to compare" in err


# ---- EUL's saved model in plain transformers ----------------------------------------------------------


def test_eul_output_does_not_load_as_the_untouched_model(capsys, files, tmp_path):
    from transformers import AutoModelForCausalLM
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "eul", "--lr", "1e-2", method="eul"))
    assert code == 0, err
    directory = tmp_path / "eul/model"
    with pytest.raises(ValueError, match="custom code"):
        AutoModelForCausalLM.from_pretrained(directory)
    with_layers = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    ours, _ = cli.load_model_and_tokenizer({"model": str(directory), "tokenizer": None, "dtype": "float32"})
    assert hasattr(with_layers, "unlearning_layers")
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = AutoModelForCausalLM.from_pretrained(files / "model")
    with torch.no_grad():
        torch.testing.assert_close(with_layers(ids).logits, ours(ids).logits)
        assert not torch.allclose(with_layers(ids).logits, plain(ids).logits, atol=1e-4)  # the layers act


def test_resuming_a_completed_run_is_refused(capsys, files, tmp_path):
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "run"))
    assert code == 0, err
    first = (tmp_path / "run/model/model.safetensors").read_bytes()
    code, _, err = run(capsys, *_unlearn(files, tmp_path / "run", "--resume"))
    assert code == 2 and "completed" in err and "nothing to resume" in err
    assert (tmp_path / "run/model/model.safetensors").read_bytes() == first


def test_a_killed_run_resumes_with_its_evaluations(capsys, files, tmp_path, monkeypatch):
    """Stopped after step 3 (checkpoint at step 2, evaluations at 0 and 2): resuming keeps
    the evaluations up to step 2, redoes step 3's, and ends like an uninterrupted run."""
    from unlearn_ext import trainer
    argv = _unlearn(files, tmp_path / "run", "--max-steps", 4, "--eval-every", 1, "--save-every", 2,
                    "--no-fused")
    real = trainer._evaluate_now

    def stop_after_3(evaluator, student, wrapped, step, *rest):
        real(evaluator, student, wrapped, step, *rest)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_evaluate_now", stop_after_3)
    code, _, err = run(capsys, *argv)
    assert code == 130
    monkeypatch.setattr(trainer, "_evaluate_now", real)
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    code, _, err = run(capsys, *[a if a != tmp_path / "run" else tmp_path / "straight" for a in argv])
    assert code == 0, err
    for name in ("run", "straight"):
        assert not (tmp_path / name / "checkpoints").exists()
    a, b = (load_file(str(tmp_path / n / "model/model.safetensors")) for n in ("run", "straight"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
