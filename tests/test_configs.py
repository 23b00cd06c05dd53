"""Every registered method has a config (configs/<name>.yaml) that the command line reads
into valid options of that method."""
import json
from pathlib import Path

import pytest

from unlearn_ext import cli
from unlearn_ext.methods import METHODS

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_a_config_that_parses_into_valid_options(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.is_file(), f"configs/{name}.yaml is missing"
    values = cli.resolve("unlearn", cli.COMMANDS["unlearn"][0],
                         {"config": str(path), "model": "m", "output": "o", "forget": "f"})
    assert values["method"] == name
    cls = METHODS[name]
    method = cls(cls.make_options(cli._pairs(values["method_arg"], "method-arg")))  # checks every option's choices
    assert values["lr"] > 0
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#") and "lr" in text  # where the numbers come from, in a comment
    assert method.options is not None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_config_gives_the_demo_its_method_options_lr_and_blocks(name):
    """`make demo METHOD=<name>` reads configs/<name>.yaml (unlearn_ext.demo.read_config):
    the same method, valid options, a learning rate, a block spec SmolLM2's 30 blocks allow."""
    from unlearn_ext import demo
    from unlearn_ext.train_layers import block_range
    values = demo.read_config(str(CONFIGS / f"{name}.yaml"))
    assert values["method"] == name and float(values["lr"]) > 0
    METHODS[name].make_options(values.get("method_args") or {})
    spec = values.get("train_layers")
    if spec is not None:
        assert len(block_range(spec, 30)) > 0


@pytest.mark.parametrize("path", sorted((CONFIGS / "tofu_smol").glob("*.yaml")), ids=lambda p: p.stem)
def test_benchmark_selected_configs_parse_and_match_the_benchmark(path):
    """configs/tofu_smol/<method>.yaml: the smol benchmark's selection (written by the
    benchmark, benchmarks/tofu_smol_collect.sh) for one method, with the schedule of
    benchmarks/results/tofu_smol: it parses, and its setting is the one the report selected."""
    values = cli.resolve("unlearn", cli.COMMANDS["unlearn"][0],
                         {"config": str(path), "model": "m", "output": "o", "forget": "f"})
    assert values["method"] == path.stem
    cls = METHODS[path.stem]
    cls.make_options(cli._pairs(values["method_arg"], "method-arg"))
    report = json.loads((CONFIGS.parent / "benchmarks" / "results" / "tofu_smol" / "benchmark.json").read_text())
    row = next(r for r in report["rows"] if r["method"] == path.stem and r["split"] == "forget10")
    assert row["setting"].startswith(f"lr {values['lr']:.3g}")
    assert values["epochs"] == report["scale"]["unlearn_epochs"]
    assert values["batch_size"] == report["scale"]["unlearn_batch_size"]
