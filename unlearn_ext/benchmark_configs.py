"""Each method's setting selected by the benchmark's grid, as a run configuration for
``unlearn-ext unlearn --config``: ``<out>/configs/<method>.yaml``.

The values are the largest split's selection (``RUN_ORDER``: forget10 first, the split with
the most forget answers to judge by); the other splits' selections are comments. The file
holds every option in which the benchmark's run differs from the command line's defaults,
so the command in its first line repeats that run on the benchmark's own target and data
(``tests/test_benchmark.py`` checks the losses step by step)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from .data.tofu import RETAIN_OF
from .eval.report import write_text


def _method_args(name: str, options: dict) -> dict:
    """The options that differ from the method's defaults (``head`` is the command line's)."""
    from .methods import get_method
    defaults = json.loads(json.dumps(dataclasses.asdict(get_method(name).make_options({}))))
    return {k: v for k, v in options.items() if k != "head" and defaults.get(k) != v}


def config_text(name: str, state: dict, details: dict) -> str | None:
    """The YAML configuration of ``name``'s selected setting, or None if no split selected one."""
    from .benchmark import RUN_ORDER, SELECTION
    chosen = [(split, state["splits_done"][split]["runs"][name][details[split]["selected"][name]])
              for split in RUN_ORDER if name in details.get(split, {}).get("selected", {})]
    if not chosen:
        return None
    split, run = chosen[0]
    scale = state["scale"]
    target = {s: state["splits_done"][s]["finetuned"] for s, _ in chosen}
    runs_of = {s: len(state["splits_done"][s]["runs"][name]) for s, _ in chosen}
    lines = [f"# unlearn-ext unlearn --config THIS_FILE --model OUT/models/target --tokenizer OUT/models/tokenizer "
             f"--forget OUT/data/{split}.json --retain OUT/data/{RETAIN_OF[split]}.json --output runs/{name}",
             f"# Selected by the grid of `unlearn-ext benchmark` (model {scale.model}, {scale.num_authors} authors x "
             f"{scale.questions_per_author} questions, seed {state['seed']}).",
             f"# Rule: {SELECTION}.",
             *(f"# {s}: {r['setting']} -> forget quality {r['summary']['forget_quality']:.3g}, model utility "
               f"{r['summary']['model_utility']:.3g} (the target's: {target[s]['forget_quality']:.3g}, "
               f"{target[s]['model_utility']:.3g}; {runs_of[s]} settings run)"
               for s, r in chosen),
             f"# The values: {split}'s selection; the schedule: the benchmark's."]
    lr = float(f"{run['summary']['lr']:.6g}")  # 1e-5 x 3 is 3.0000000000000004e-05
    body = {"method": name, "method_args": _method_args(name, run["options"]), "lr": lr,
            "epochs": scale.unlearn_epochs, "batch_size": scale.unlearn_batch_size, "max_length": scale.max_length,
            "seed": state["seed"]}
    if not body["method_args"]:
        del body["method_args"]
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


def write_configs(state: dict, details: dict, out: Path) -> None:
    """One file per method that has a selection (with the grid on: without it the
    "selection" is the defaults)."""
    if not state["scale"].grid:
        return
    for name in state["methods"]:
        text = config_text(name, state, details)
        if text is not None:
            write_text(text, out / "configs" / f"{name}.yaml")
