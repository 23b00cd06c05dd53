"""The ``unlearn-ext`` command: ``finetune``, ``unlearn --method NAME``, ``eval``, ``benchmark``.

Every option can come from a YAML file (``--config run.yaml``, keys named like the long
options, ``-`` or ``_``); options given on the command line override it. Models and
tokenizers come from local directories only (nothing is downloaded); data files hold
{"question", "answer"} records, one JSON object per line (TOFU's layout) or a JSON list.

User errors (a bad option, a missing file, an unknown method) print one line and exit
with status 2; set UNLEARN_EXT_TRACEBACK=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

PROG = "unlearn-ext"


class CLIError(Exception):
    """A user error: printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we want one line
        raise CLIError(f"{message} (see {self.prog} --help)")


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _lora_targets(value) -> tuple[str, ...]:
    from .lora import parse_targets
    return parse_targets(value)


def _optional_float(text) -> float | None:
    return None if text is None or str(text).lower() in ("none", "null", "0") else float(text)


@dataclasses.dataclass
class Opt:
    """One option: its flag, how to parse it, its default and its documentation."""
    name: str
    type: Callable = str
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    flag_kind: str = "value"  # value | bool (--x / --no-x) | list (repeatable KEY=VALUE)

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def add_to(self, parser):
        doc = f"{self.help} (default: {self.default})" if self.default not in (None, "") else self.help
        if self.flag_kind == "bool":
            parser.add_argument(f"--{self.name}", dest=self.dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=doc)
        elif self.flag_kind == "list":
            parser.add_argument(f"--{self.name}", dest=self.dest, action="append", metavar="KEY=VALUE",
                                default=argparse.SUPPRESS, help=doc)
        else:
            parser.add_argument(f"--{self.name}", dest=self.dest, default=argparse.SUPPRESS, metavar=self.dest.upper(),
                                choices=self.choices, help=doc)

    def convert(self, value):
        if self.flag_kind == "list" or value is None:
            return value
        try:
            value = self.type(value)
        except (TypeError, ValueError) as e:
            raise CLIError(f"option --{self.name}: {e}") from None
        if self.choices and value not in self.choices:
            raise CLIError(f"option --{self.name}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


MODEL_OPTS = [
    Opt("model", help="directory of the Hugging Face causal LM to start from (required)"),
    Opt("tokenizer", help="tokenizer directory (default: the model directory)"),
    Opt("dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="dtype the model's weights are loaded in"),
]
RUN_OPTS = MODEL_OPTS + [
    Opt("config", help="YAML file of options; command-line options override it"),
    Opt("output", help="output directory: checkpoints/, log.jsonl, train_config.json, model/ (required)"),
    Opt("max-length", int, 512, "tokens per example (prompt + answer); longer answers are cut"),
    Opt("fused", _bool, None, "loss path: fused-linear (no [N, V] logits) or materialised logits; "
                              "default: fused (under torchrun / accelerate launch too)", flag_kind="bool"),
    Opt("backend", default=None, help="loss kernel backend: torch, cpu, cuda or triton (default: fastest available)"),
    Opt("lr", float, 1e-5, "peak learning rate of AdamW"),
    Opt("weight-decay", float, 0.01, "AdamW weight decay (matrices only)"),
    Opt("epochs", float, 5.0, "passes over the forget (finetune: training) examples"),
    Opt("max-steps", int, None, "optimizer steps; overrides --epochs"),
    Opt("batch-size", int, 4, "examples per process per micro-batch"),
    Opt("grad-accum", int, 1, "micro-batches per optimizer step"),
    Opt("warmup-ratio", float, 0.0, "fraction of the steps with a linear warmup (then linear decay to 0)"),
    Opt("max-grad-norm", _optional_float, 1.0, "gradient clipping norm; 0 or none: no clipping"),
    Opt("bf16", _bool, None, "bf16 autocast; default: on where the GPU supports it, off on CPU", flag_kind="bool"),
    Opt("seed", int, 0, "seed of every random draw (data order, retain sampling, initialisations)"),
    Opt("log-every", int, 1, "steps between log lines in log.jsonl"),
    Opt("save-every", int, 0, "steps between checkpoints; 0: only at the end"),
    Opt("keep-checkpoints", int, 2, "how many recent checkpoints to keep; 0: all"),
    Opt("resume", _bool, False, "continue from the newest checkpoint in --output", flag_kind="bool"),
    Opt("progress", _bool, True, "show a progress bar", flag_kind="bool"),
]
# At scale: FSDP2 and LoRA (README "Distributed, LoRA").
SCALE_OPTS = [
    Opt("fsdp", _bool, None, "shard the student with FSDP2 (fully_shard per decoder layer) in multi-process runs; "
                             "default: when started by `accelerate launch --use_fsdp`", flag_kind="bool"),
    Opt("shard-frozen", _bool, False, "under FSDP, shard the frozen models' decoder layers too", flag_kind="bool"),
    Opt("lora-r", int, 0, "LoRA rank (PEFT adapters; only they train); 0: train the whole model"),
    Opt("lora-alpha", float, 16.0, "LoRA alpha (the adapters' product is scaled by alpha / r)"),
    Opt("lora-dropout", float, 0.0, "dropout on the LoRA adapters' input"),
    Opt("lora-targets", _lora_targets, None, "comma-separated module names that get adapters (YAML: a list); "
                                             "default: the attention and MLP projections "
                                             "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)"),
    Opt("merge-lora", _bool, False, "also write the model with the adapters merged to OUTPUT/model "
                                    "(the adapters alone always go to OUTPUT/adapter, PEFT format)",
        flag_kind="bool"),
]
FINETUNE_OPTS = RUN_OPTS + SCALE_OPTS + [Opt("data", help="JSON/JSONL file of {question, answer} records to train on (required)")]
UNLEARN_OPTS = RUN_OPTS + SCALE_OPTS + [
    Opt("method", help="unlearning method (required; see below)"),
    Opt("forget", help="JSON/JSONL file of {question, answer} records to forget (required)"),
    Opt("retain", help="JSON/JSONL file of records to retain (required by methods with a retain term)"),
    Opt("method-arg", help="a method option, e.g. --method-arg beta=0.2 (repeatable; YAML: method_args mapping)",
        flag_kind="list"),
]
EVAL_OPTS = MODEL_OPTS + [
    Opt("config", help="YAML file of options; command-line options override it"),
    Opt("set", help="an evaluation set NAME=FILE (repeatable; YAML: sets mapping). The name gives its role: "
                    "'forget…', 'holdout…', 'real_authors…'/'world_facts…', anything else = retain",
        flag_kind="list"),
    Opt("retain-result", help="JSON result of `eval` on the retain-only model: enables forget quality"),
    Opt("generate", _bool, True, "greedy generation for ROUGE-L (off: probabilities and truth ratios only)",
        flag_kind="bool"),
    Opt("batch-size", int, 16, "evaluation batch size"),
    Opt("max-new-tokens", int, None, "generation length (default: longest reference answer + 8)"),
    Opt("output", help="write the JSON result here (default: print it)"),
]
BENCHMARK_OPTS = [
    Opt("config", help="YAML file of options; command-line options override it"),
    Opt("out", help="output directory: benchmark.json/.md/.png, data/, models/ (required)"),
    Opt("scale", default="cpu", choices=("cpu", "gpu"),
        help="cpu: 40 authors, a 1M-parameter Llama, ~25 min on one CPU core; gpu: TOFU's 200 authors, a 75M Llama"),
    Opt("scale-arg", help="override one setting of the scale, e.g. --scale-arg unlearn_lr=3e-4 (repeatable; "
                          "YAML: scale_args mapping; see unlearn_ext.benchmark.Scale)", flag_kind="list"),
    Opt("splits", default="forget01,forget05,forget10", help="comma-separated forget splits"),
    Opt("methods", default="ga,graddiff,npo,npo_rt,simnpo,rkld,undial", help="comma-separated methods"),
    Opt("seed", int, 0, "seed of the data, the initialisations and the training order"),
    Opt("fused", _bool, None, "loss path: fused-linear or materialised logits; default: fused",
        flag_kind="bool"),
    Opt("backend", default=None, help="loss kernel backend: torch, cpu, cuda or triton (default: fastest available)"),
    Opt("progress", _bool, True, "show progress bars", flag_kind="bool"),
]
REQUIRED = {"finetune": ("model", "output", "data"), "unlearn": ("model", "output", "method", "forget"),
            "eval": ("model", "set"), "benchmark": ("out",)}
YAML_ALIASES = {"method_args": "method_arg", "sets": "set", "scale_args": "scale_arg"}


def _pairs(items, what: str) -> dict[str, str]:
    """KEY=VALUE strings (or a YAML mapping) to a dict."""
    if isinstance(items, dict):
        return {str(k): v for k, v in items.items()}
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise CLIError(f"--{what} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def resolve(command: str, opts: list[Opt], flags: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then the YAML file, then command-line flags; values converted and checked."""
    by_dest = {o.dest: o for o in opts}
    values = {o.dest: o.default for o in opts}
    if flags.get("config"):
        from .config import load_yaml
        loaded = {YAML_ALIASES.get(k, k): v for k, v in load_yaml(flags["config"]).items()}
        unknown = sorted(set(loaded) - set(by_dest))
        if unknown:
            raise CLIError(f"config file {flags['config']}: unknown option {', '.join(unknown)} for `{command}`")
        values.update(loaded)
    for dest, value in flags.items():
        if by_dest[dest].flag_kind == "list" and isinstance(values.get(dest), dict):
            values[dest] = {**values[dest], **_pairs(value, by_dest[dest].name)}  # flags add to the YAML mapping
        else:
            values[dest] = value
    values = {dest: by_dest[dest].convert(v) for dest, v in values.items()}
    missing = [f"--{by_dest[d].name}" for d in REQUIRED[command] if not values.get(d)]
    if missing:
        raise CLIError(f"{PROG} {command}: missing {', '.join(missing)} (on the command line or in --config)")
    return values


# ---- loading ---------------------------------------------------------------------------------------


def load_model_and_tokenizer(values: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import load_unlearning_layers
    model_dir = Path(values["model"])
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"--model {model_dir}: not a local model directory (no config.json); "
                       "models are never downloaded")
    tok_dir = Path(values.get("tokenizer") or model_dir)
    if not tok_dir.is_dir():
        raise CLIError(f"--tokenizer {tok_dir}: no such directory")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                 dtype=getattr(torch, values["dtype"]))
    load_unlearning_layers(model, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    return model, tokenizer


def _train_config(values: dict):
    from .trainer import TrainConfig
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(output_dir=values["output"], **{k: v for k, v in values.items() if k in names})


def _save_tokenizer(tokenizer, output: str) -> None:
    from accelerate import PartialState
    if PartialState().is_main_process:
        tokenizer.save_pretrained(Path(output) / "model")


# ---- commands --------------------------------------------------------------------------------------


def run_finetune(values: dict) -> int:
    from .config import read_records
    from .data import QACollator
    from .methods import Finetune, Models, make_head
    from .trainer import TrainData, train
    examples = read_records(values["data"])
    model, tokenizer = load_model_and_tokenizer(values)
    method = Finetune(head=make_head(values["fused"], values["backend"]))
    train(method, Models(student=model), TrainData(examples, collate=QACollator(tokenizer, values["max_length"])),
          _train_config(values))
    _save_tokenizer(tokenizer, values["output"])
    return 0


def run_unlearn(values: dict) -> int:
    from .config import read_records
    from .data import QACollator
    from .methods import Models, freeze, get_method, make_head
    from .trainer import TrainData, train
    cls = get_method(values["method"])
    method = cls(cls.make_options(_pairs(values["method_arg"], "method-arg")),
                 head=make_head(values["fused"], values["backend"]))
    forget = read_records(values["forget"])
    retain = read_records(values["retain"]) if values["retain"] else None
    if method.needs_retain() and retain is None:
        raise CLIError(f"method {cls.name!r} needs --retain (or set its retain weight to 0)")
    model, tokenizer = load_model_and_tokenizer(values)
    # With LoRA the trainer's reference is the student with adapters disabled: no copy.
    reference = freeze(copy.deepcopy(model)) if method.needs_reference() and not values["lora_r"] else None
    train(method, Models(student=model, reference=reference),
          TrainData(forget, retain, QACollator(tokenizer, values["max_length"])), _train_config(values))
    _save_tokenizer(tokenizer, values["output"])
    return 0


def run_eval(values: dict) -> int:
    try:
        from .eval import evaluate
    except ImportError:
        raise CLIError("evaluation module not installed (unlearn_ext.eval is missing from this build)") from None
    from .config import read_records
    sets = {name: read_records(path) for name, path in _pairs(values["set"], "set").items()}
    retain_reference = None
    if values["retain_result"]:
        path = Path(values["retain_result"])
        if not path.is_file():
            raise CLIError(f"--retain-result {path}: no such file")
        retain_reference = json.loads(path.read_text())
    model, tokenizer = load_model_and_tokenizer(values)
    result = evaluate(model.eval(), tokenizer, sets, retain_reference=retain_reference, generate=values["generate"],
                      batch_size=values["batch_size"], max_new_tokens=values["max_new_tokens"])
    text = json.dumps(result, indent=1)
    if values["output"]:
        Path(values["output"]).write_text(text)
    else:
        print(text)
    return 0


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise CLIError(f"--{what}: give at least one name")
    return names


def run_benchmark(values: dict) -> int:
    from . import benchmark
    scale = benchmark.SCALES[values["scale"]].with_overrides(_pairs(values["scale_arg"], "scale-arg"))
    benchmark.run_benchmark(scale, values["out"], splits=_names(values["splits"], "splits"),
                  methods=_names(values["methods"], "methods"), seed=values["seed"], fused=values["fused"],
                  backend=values["backend"], progress=values["progress"])
    return 0


def _methods_epilog() -> str:
    from .methods import METHODS
    lines = ["methods and their options (--method-arg KEY=VALUE):"]
    for name, cls in METHODS.items():
        summary = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        lines += [f"  {name}: {summary}", cls.describe()]
    return "\n".join(lines)


# Subcommands: name -> (options, help, run, epilog).
COMMANDS: dict[str, tuple[list[Opt], str, Callable[[dict], int], Callable[[], str] | None]] = {
    "finetune": (FINETUNE_OPTS, "fine-tune a model on question/answer data (NLL on answers)", run_finetune, None),
    "unlearn": (UNLEARN_OPTS, "unlearn a forget set with one of the methods", run_unlearn, _methods_epilog),
    "eval": (EVAL_OPTS, "evaluate a model with TOFU's metrics", run_eval, None),
    "benchmark": (BENCHMARK_OPTS, "TOFU's protocol offline: fine-tune, unlearn with each method, evaluate, report",
                  run_benchmark, None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="LLM unlearning with fused loss kernels: fine-tune, unlearn, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (opts, help_text, _, epilog) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog() if epilog else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for opt in opts:
            opt.add_to(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = vars(build_parser().parse_args(argv))
        command = args.pop("command")
        if command is None:
            raise CLIError(f"{PROG}: choose a command: {', '.join(COMMANDS)} (see --help)")
        opts, _, run, _ = COMMANDS[command]
        return run(resolve(command, opts, args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; the traceback on request
        if os.environ.get("UNLEARN_EXT_TRACEBACK") == "1":
            raise
        message = str(e) if isinstance(e, (CLIError, ValueError, OSError)) else f"{type(e).__name__}: {e}"
        print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
