"""The unlearn-ext command: help, one-line errors, YAML with flag overrides, end to end."""
import importlib.util
import json
import subprocess
import sys

import pytest
import yaml
from tiny_lm import FORGET, RETAIN, make_tokenizer, one_thread, tiny_llama  # noqa: F401

from unlearn_ext import cli
from unlearn_ext.methods import METHODS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "forget.jsonl").write_text("\n".join(json.dumps(r) for r in FORGET))  # TOFU's layout
    (root / "retain.json").write_text(json.dumps(RETAIN))  # a JSON list works too
    return root


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
        assert f"--{opt.name}" in text, opt.name
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
    saved = json.loads((tmp_path / "out/train_config.json").read_text())
    assert saved["batch_size"] == 2 and saved["method"] == "npo_rt"
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
                         "--no-generate")
    if importlib.util.find_spec("unlearn_ext.eval") is None:
        assert code == 2 and "evaluation module not installed" in err
    else:
        assert code == 0, err
        assert "forget" in json.loads(out)["sets"]


@pytest.mark.parametrize("path", sorted(cli.Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    command = "finetune" if path.name.startswith("finetune") else "unlearn"
    flags = {"config": str(path), "model": "m", "output": "o", **({"data": "d"} if command == "finetune" else
                                                                  {"forget": "f"})}
    values = cli.resolve(command, cli.COMMANDS[command][0], flags)
    if command == "unlearn":
        METHODS[values["method"]].make_options(cli._pairs(values["method_arg"], "method-arg"))
