"""``make demo``'s wiring (unlearn_ext/demo.py) on a tiny Llama that memorised fictitious
facts, through the demo's model and data seams: SmolLM2 itself is exercised by
``make demo`` (minutes), not here."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_lm import FORGET, RETAIN, make_tokenizer, one_thread, trained_llama  # noqa: F401

from unlearn_ext import demo

SETS = {"forget": FORGET, "keep": RETAIN[:6], "general": RETAIN[6:]}
CONFIGS = Path(__file__).parents[1] / "configs"


def test_demo_forgets_keeps_and_reports(tmp_path, capsys):
    model, tokenizer = trained_llama(), make_tokenizer()
    report = demo.main(["--out", str(tmp_path), "--no-progress", "--steps", "12", "--lr", "1e-2",
                        "--train-layers", "1", "--max-new-tokens", "12"],
                       load=lambda cache_dir: (model, tokenizer, {"model": "tiny"}), sets=SETS)
    rows = {r["set"]: r for r in report["rows"]}
    assert list(rows) == list(SETS)
    assert rows["forget"]["prob_before"] > 0.5 and rows["forget"]["prob_after"] < rows["forget"]["prob_before"] / 4
    assert rows["keep"]["prob_after"] > 0.8 * rows["keep"]["prob_before"]
    unlearning = report["unlearning"]
    assert unlearning["method"] == "npo_rt" and unlearning["head"] == "fused" and unlearning["steps"] == 12
    assert unlearning["trained_blocks"] == "last 1 of 2"
    # Only the last block moved: the first and the embeddings are as trained.
    fresh = trained_llama()
    for name, p in model.named_parameters():
        same = p.detach().equal(dict(fresh.named_parameters())[name].detach())
        assert same != name.startswith("model.layers.1."), name

    saved = json.loads((tmp_path / "demo_report.json").read_text())
    assert saved["rows"] == report["rows"]
    text = (tmp_path / "demo_report.md").read_text()
    assert text in capsys.readouterr().out  # printed as written
    for name, records in SETS.items():
        assert f"## {name}" in text
        for r in records:
            assert f"| {r['question']} |" in text
    after = saved["after"]["sets"]["forget"]["per_example"]
    assert after["generation"] != saved["before"]["sets"]["forget"]["per_example"]["generation"]


def test_train_layers_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="train_layers"):
        demo.unlearn(trained_llama(), make_tokenizer(), FORGET, RETAIN, seed=0, progress=False, train_layers=3)


def test_demo_runs_another_method_and_saves_its_model(tmp_path, capsys):
    """--method and --method-arg pick the method (here GradDiff, retain weight 2); --save-model
    writes the unlearned model, which loads as it was (files readable: umask, not 0600)."""
    import os
    import stat

    import torch
    from transformers import AutoModelForCausalLM
    model, tokenizer = trained_llama(), make_tokenizer()
    report = demo.main(["--out", str(tmp_path / "out"), "--no-progress", "--steps", "4", "--lr", "1e-2",
                        "--train-layers", "1", "--max-new-tokens", "4", "--method", "graddiff", "--method-arg",
                        "retain_weight=2", "--save-model", str(tmp_path / "model")],
                       load=lambda cache_dir: (model, tokenizer, {"cache_dir": "/nowhere", "description": "tiny"}),
                       sets=SETS)
    assert report["unlearning"]["method"] == "graddiff" and report["unlearning"]["method.retain_weight"] == "2"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(saved.named_parameters())[name]), name
    assert (tmp_path / "model/tokenizer.json").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "model/model.safetensors").st_mode) == 0o666 & ~mask
    out = capsys.readouterr().out
    assert "Model: tiny, from /nowhere" in out and f"unlearned model in {tmp_path / 'model'}" in out


def test_a_bad_method_option_fails_before_the_model_loads():
    def load(cache_dir):
        raise AssertionError("the model was loaded")
    with pytest.raises(ValueError, match="has no option 'gamma'"):
        demo.main(["--method", "npo", "--method-arg", "gamma=1", "--no-progress"], load=load, sets=SETS)


@pytest.mark.parametrize("method,out", [("npo_rt", "runs/demo"), ("simnpo", "runs/demo/simnpo")])
def test_make_demo_takes_a_method(method, out):
    """`make demo METHOD=<name>`: the demo with that method (dry run: the command make would run)."""
    import pathlib
    import shutil
    import subprocess
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = pathlib.Path(__file__).parents[1]
    args = ["make", "-n", "--no-print-directory", "demo"] + ([f"METHOD={method}"] if method != "npo_rt" else [])
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under make test
    done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert f"-m unlearn_ext.demo --config configs/{method}.yaml --out {out}" in done.stdout.splitlines()[-1]


def test_a_config_sets_the_method_its_options_lr_and_trained_blocks_and_flags_override_it(tmp_path):
    """--config: the method's recommended settings (method, method_args, lr, train_layers) from
    a run configuration; its TOFU-scale schedule keys are not the demo's; a flag wins."""
    config = tmp_path / "graddiff.yaml"
    config.write_text("# c\nmethod: graddiff\nmethod_args:\n  retain_weight: 3.0\nlr: 2e-2\ntrain_layers: all\n"
                      "epochs: 10\nbatch_size: 8\ngrad_accum: 4\n")
    runs = []

    def load(cache_dir):
        return trained_llama(), make_tokenizer(), {"model": "tiny"}
    for extra in ([], ["--lr", "1e-2", "--method-arg", "forget_weight=0.5", "--train-layers", "1"]):
        report = demo.main(["--config", str(config), "--out", str(tmp_path / str(len(runs))), "--no-progress",
                            "--steps", "2", "--max-new-tokens", "2", *extra], load=load, sets=SETS)
        runs.append(report["unlearning"])
    first, second = runs
    assert first["config"] == str(config) and first["method"] == "graddiff" and first["lr"] == 2e-2
    assert first["method.retain_weight"] == 3.0 and first["trained_blocks"] == "all" and first["steps"] == 2
    assert first["batch_size"] == demo.BATCH_SIZE
    assert second["lr"] == 1e-2 and second["trained_blocks"] == "last 1 of 2"
    assert second["method.retain_weight"] == 3.0 and second["method.forget_weight"] == "0.5"


@pytest.mark.parametrize("text,message", [("method: nope\n", "unknown method 'nope'"),
                                          ("method: npo\nmethod_args: [1]\n", "method_args must be a mapping"),
                                          ("method: npo\nlr: -1\n", "lr must be positive"),
                                          ("method: npo\nmethod_args:\n  gamma: 1\n", "has no option 'gamma'")])
def test_a_bad_config_fails_before_the_model_loads(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)

    def load(cache_dir):
        raise AssertionError("the model was loaded")
    with pytest.raises(ValueError, match=message):
        demo.main(["--config", str(config), "--no-progress"], load=load, sets=SETS)


def test_a_method_flag_that_contradicts_the_config_is_an_error(tmp_path):
    config = tmp_path / "npo.yaml"
    config.write_text("method: npo\n")
    with pytest.raises(SystemExit):
        demo.main(["--config", str(config), "--method", "ga", "--no-progress"], load=None, sets=SETS)


def test_the_demos_built_in_settings_are_npo_rts_config():
    """`python -m unlearn_ext.demo` without --config runs what `make demo` runs."""
    values = demo.read_config(str(CONFIGS / "npo_rt.yaml"))
    assert (values["method"], float(values["lr"]), values.get("train_layers", demo.TRAIN_LAYERS)) == \
        (demo.METHOD, demo.LR, f"top:{demo.TRAIN_LAYERS}")
    assert values.get("method_args", {}) == {"beta": 0.1, "forget_weight": 1.0, "retain_weight": 1.0}
