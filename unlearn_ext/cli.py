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
    flag_kind: str = "value"  # value | bool (--x / --no-x) | list (repeatable KEY=VALUE) | positional (1 or more)

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def add_to(self, parser):
        doc = f"{self.help} (default: {self.default})" if self.default not in (None, "") else self.help
        if self.flag_kind == "bool":
            parser.add_argument(f"--{self.name}", dest=self.dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=doc)
        elif self.flag_kind == "positional":
            parser.add_argument(self.dest, nargs="+", metavar=self.dest.upper(), help=doc)
        elif self.flag_kind == "list":
            parser.add_argument(f"--{self.name}", dest=self.dest, action="append", metavar="KEY=VALUE",
                                default=argparse.SUPPRESS, help=doc)
        else:
            parser.add_argument(f"--{self.name}", dest=self.dest, default=argparse.SUPPRESS, metavar=self.dest.upper(),
                                choices=self.choices, help=doc)

    def convert(self, value):
        if self.flag_kind in ("list", "positional") or value is None:
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
    Opt("output", help="output directory: manifest.json, log.jsonl, model/ (and checkpoints/ while the run goes); "
                       "must be empty unless --resume or --overwrite (required)"),
    Opt("overwrite", _bool, False, "replace the run in a non-empty --output (its files are deleted first)",
        flag_kind="bool"),
    Opt("resume", _bool, False, "continue from the newest checkpoint in --output", flag_kind="bool"),
    Opt("max-length", int, 512, "tokens per example (prompt + answer); longer answers are cut"),
    Opt("fused", _bool, None, "loss path: fused-linear (no [N, V] logits) or materialised logits; "
                              "default: fused (under torchrun / accelerate launch too)", flag_kind="bool"),
    Opt("backend", default=None, help="loss kernel backend: torch, cpu, cuda or triton (default: fastest available)"),
    Opt("lr", float, 1e-5, "peak learning rate of AdamW"),
    Opt("lr-schedule", default="linear", choices=("constant", "linear", "cosine"),
        help="learning rate after the warmup: constant, linear decay to 0 or cosine decay to 0"),
    Opt("warmup-steps", int, None, "steps of linear warmup; overrides --warmup-ratio"),
    Opt("warmup-ratio", float, 0.0, "fraction of the steps with a linear warmup"),
    Opt("weight-decay", float, 0.01, "AdamW weight decay (matrices only)"),
    Opt("epochs", float, 5.0, "passes over the forget (finetune: training) examples"),
    Opt("max-steps", int, None, "optimizer steps; overrides --epochs"),
    Opt("batch-size", int, 4, "examples per process per micro-batch"),
    Opt("grad-accum", int, 1, "micro-batches per optimizer step"),
    Opt("max-grad-norm", _optional_float, 1.0, "gradient clipping norm; 0 or none: no clipping"),
    Opt("train-layers", default=None, help="which transformer blocks train: all, top:N (the N highest), bottom:N "
                                           "or A-B (from 0 at the input); default: every parameter; with --lora-r: "
                                           "the adapters go only into those blocks"),
    Opt("gradient-checkpointing", _bool, False, "recompute each block's activations in the backward pass "
                                                "(less memory, one more forward pass of time)", flag_kind="bool"),
    Opt("bf16", _bool, None, "bf16 autocast; default: on where the GPU supports it, off on CPU", flag_kind="bool"),
    Opt("seed", int, 0, "seed of every random draw (data order, retain sampling, initialisations)"),
    Opt("log-every", int, 1, "steps between log lines in log.jsonl"),
    Opt("save-every", int, 0, "steps between checkpoints to resume from; 0: none"),
    Opt("checkpoint-limit", int, 2, "how many recent checkpoints a running run keeps; 0: all"),
    Opt("keep-checkpoints", _bool, False, "keep the checkpoints (weights and optimizer state, with one at the "
                                          "last step) when the run completes; default: delete them",
        flag_kind="bool"),
    Opt("save-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype of the saved model; auto: the dtype the --model directory is stored in"),
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
FINETUNE_OPTS = RUN_OPTS + SCALE_OPTS + [
    Opt("data", help="JSON/JSONL file of {question, answer} records to train on (required)")]
UNLEARN_OPTS = RUN_OPTS + SCALE_OPTS + [
    Opt("method", help="unlearning method (required; see below)"),
    Opt("forget", help="JSON/JSONL file of {question, answer} records to forget (required)"),
    Opt("retain", help="JSON/JSONL file of records to retain (required by methods with a retain term)"),
    Opt("retain-batch-size", int, None, "retain examples per micro-batch, drawn without replacement within an "
                                        "epoch of the retain set (default: --batch-size)"),
    Opt("method-arg", help="a method option, e.g. --method-arg beta=0.2 (repeatable; YAML: method_args mapping)",
        flag_kind="list"),
    Opt("eval-every", int, 0, "evaluate forget and retain answer probabilities and truth ratios every N steps "
                              "(and at steps 0 and last) into eval.jsonl and eval.png; 0: never"),
    Opt("eval-set", help="an evaluation set for --eval-every, ROLE:NAME=FILE with ROLE forget, retain, options or "
                         "holdout (repeatable; default: forget=--forget, retain=--retain)", flag_kind="list"),
    Opt("keep-best", _bool, False, "with --eval-every: save the best evaluation's model in best/ (the lowest forget "
                                   "probability keeping the retain probability >= 0.9 x step 0's)",
        flag_kind="bool"),
    Opt("cache-frozen", default="auto", choices=("auto", "memory", "disk", "off"),
        help="frozen models (reference, teachers) run once before training, not every step: their answer "
             "log-probs / hidden states kept in device memory, or memory-mapped in OUTPUT/frozen_cache; "
             "auto: memory when it fits --cache-memory-mb, else disk"),
    Opt("cache-memory-mb", float, 1024.0, "device memory the frozen cache may take under --cache-frozen auto"),
]
ROLE_OPTS = [
    Opt("forget", help="a forget set NAME=FILE (repeatable): probability, ROUGE-L, truth ratio, forget quality",
        flag_kind="list"),
    Opt("retain", help="a retain set NAME=FILE (repeatable): counts in model utility", flag_kind="list"),
    Opt("options", help="a multiple-choice set NAME=FILE (TOFU's real authors / world facts; repeatable): "
                        "probability among the perturbed options, counts in model utility", flag_kind="list"),
    Opt("holdout", help="a holdout set NAME=FILE (never trained on; repeatable): membership-inference AUC against "
                        "the forget set", flag_kind="list"),
]
EVAL_OPTS = MODEL_OPTS + [
    Opt("config", help="YAML file of options; command-line options override it"),
    *ROLE_OPTS,
    Opt("set", help="a set NAME=FILE whose role comes from its name (older form; repeatable; YAML: sets mapping): "
                    "'forget…', 'holdout…', 'real_authors…'/'world_facts…', anything else = retain",
        flag_kind="list"),
    Opt("retain-result", help="JSON result of `eval` on the retain-only model (same forget set, with perturbed "
                              "answers): enables forget quality"),
    Opt("generate", _bool, True, "greedy generation for ROUGE-L (off: probabilities and truth ratios only)",
        flag_kind="bool"),
    Opt("batch-size", int, 16, "evaluation batch size"),
    Opt("max-new-tokens", int, 200, "greedy answers stop at the end-of-sequence token or after this many tokens "
                                    "(open-unlearning's TOFU setting)"),
    Opt("output", help="write the JSON result here (default: print it; the table then goes to stderr)"),
    Opt("progress", _bool, True, "show a progress bar", flag_kind="bool"),
]
COMPARE_OPTS = [
    Opt("results", help="JSON results of `eval`: the first is the baseline, each other is compared with it",
        flag_kind="positional"),
    Opt("plot", help="draw the change per set and per question into this PNG file"),
    Opt("questions", _bool, True, "print the change per question too", flag_kind="bool"),
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
            "eval": ("model",), "benchmark": ("out",), "compare": ("results",)}
YAML_ALIASES = {"method_args": "method_arg", "sets": "set", "scale_args": "scale_arg", "eval_sets": "eval_set"}


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


def _check_model_dir(values: dict) -> Path:
    model_dir = Path(values["model"])
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"--model {model_dir}: not a local model directory (no config.json); "
                       "models are never downloaded")
    tok_dir = Path(values.get("tokenizer") or model_dir)
    if not tok_dir.is_dir():
        raise CLIError(f"--tokenizer {tok_dir}: no such directory")
    return model_dir


def load_model_and_tokenizer(values: dict):
    """The model (with EUL's unlearning layers when the directory has them) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import adapters
    model_dir = _check_model_dir(values)
    dtype = getattr(torch, values["dtype"])
    config = None
    if adapters.has_unlearning_layers(model_dir):
        config = adapters.backbone_config(model_dir)
        model = adapters.from_pretrained_with_layers(model_dir, local_files_only=True, dtype=dtype, config=config)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    tok_dir = values.get("tokenizer") or model_dir
    # The backbone's config: an EUL directory's own config.json refers to its loader module.
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True,
                                              **({"config": config} if config is not None and tok_dir == model_dir
                                                 else {}))
    return model, tokenizer


def stored_dtype(model_dir: str | Path) -> str | None:
    """The dtype a model directory's config.json says its weights are stored in."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def _train_config(values: dict, desc: str):
    from .trainer import TrainConfig
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    save_dtype = stored_dtype(values["model"]) if values["save_dtype"] == "auto" else values["save_dtype"]
    given = {k: v for k, v in values.items() if k in names and k != "save_dtype"}
    return TrainConfig(output_dir=values["output"], save_dtype=save_dtype, desc=desc, verbose=True, **given)


def _quiet_unless_progress(values: dict) -> None:
    """--no-progress silences transformers' loading and saving bars too."""
    if not values["progress"]:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def _check_output(values: dict) -> None:
    """Before anything is loaded: the output directory may be written."""
    from .run_dir import check_output_dir
    check_output_dir(values["output"], resume=values["resume"], overwrite=values["overwrite"])


def _run_manifest(command: str, values: dict, data: dict[str, str | None]) -> dict:
    return {"command": command, "argv": sys.argv, "model": str(Path(values["model"]).resolve()),
            "tokenizer": values.get("tokenizer"), "dtype": values["dtype"],
            "data": {k: str(Path(v).resolve()) if v else None for k, v in data.items()}}


def _save_tokenizer(tokenizer, output: str) -> None:
    from accelerate import PartialState

    from .file_modes import follow_umask
    if PartialState().is_main_process:
        tokenizer.save_pretrained(Path(output) / "model")
        follow_umask(Path(output) / "model")


# ---- commands --------------------------------------------------------------------------------------


def run_finetune(values: dict) -> int:
    from .config import read_records
    from .data import QACollator
    from .methods import Finetune, Models, make_head
    from .trainer import TrainData, train
    _check_output(values)
    _quiet_unless_progress(values)
    examples = read_records(values["data"])
    _check_model_dir(values)
    config = _train_config(values, desc="finetune")
    model, tokenizer = load_model_and_tokenizer(values)
    method = Finetune(head=make_head(values["fused"], values["backend"]))
    train(method, Models(student=model), TrainData(examples, collate=QACollator(tokenizer, values["max_length"])),
          config, manifest=_run_manifest("finetune", values, {"data": values["data"]}))
    _save_tokenizer(tokenizer, values["output"])
    return 0


def _eval_during_training(values: dict, forget, retain, tokenizer, method):
    """--eval-every's evaluator: the --eval-set sets, else the forget and retain data."""
    if not values["eval_every"]:
        if values["keep_best"] or values["eval_set"]:
            raise CLIError("--keep-best and --eval-set need --eval-every N")
        return None
    from .config import read_records
    from .eval.dynamics import EvalDuringTraining
    sets, kinds = {}, {}
    for key, path in _pairs(values["eval_set"], "eval-set").items():
        role, sep, name = key.partition(":")
        if not sep or role not in ("forget", "retain", "options", "holdout") or not name:
            raise CLIError(f"--eval-set expects ROLE:NAME=FILE with ROLE forget, retain, options or holdout, "
                           f"got {key}={path}")
        sets[name], kinds[name] = read_records(path), role
    if not sets:
        sets, kinds = {"forget": forget}, {"forget": "forget"}
        if retain:
            sets["retain"], kinds["retain"] = retain, "retain"
    try:
        return EvalDuringTraining(sets, tokenizer, every=values["eval_every"], kinds=kinds,
                                  backend=getattr(method.head, "backend", None))
    except ValueError as e:
        raise CLIError(f"--eval-every: {e}") from None


def run_unlearn(values: dict) -> int:
    from .config import read_records
    from .data import QACollator
    from .methods import Models, freeze, get_method, make_head
    from .trainer import TrainData, train
    cls = get_method(values["method"])
    method = cls(cls.make_options(_pairs(values["method_arg"], "method-arg")),
                 head=make_head(values["fused"], values["backend"]))
    _check_output(values)
    _quiet_unless_progress(values)
    forget = read_records(values["forget"])
    retain = read_records(values["retain"]) if values["retain"] else None
    if method.needs_retain() and retain is None:
        raise CLIError(f"method {cls.name!r} needs --retain (or set its retain weight to 0)")
    _check_model_dir(values)
    config = _train_config(values, desc=f"unlearn {cls.name}")
    model, tokenizer = load_model_and_tokenizer(values)
    evaluator = _eval_during_training(values, forget, retain, tokenizer, method)
    # With LoRA the trainer's reference is the student with adapters disabled: no copy.
    reference = freeze(copy.deepcopy(model)) if method.needs_reference() and not values["lora_r"] else None
    train(method, Models(student=model, reference=reference),
          TrainData(forget, retain, QACollator(tokenizer, values["max_length"])), config, evaluator=evaluator,
          manifest=_run_manifest("unlearn", values, {"forget": values["forget"], "retain": values["retain"]}))
    _save_tokenizer(tokenizer, values["output"])
    return 0


def eval_sets(values: dict) -> tuple[dict[str, str], dict[str, str]]:
    """{name: file} and {name: role} from --forget/--retain/--options/--holdout and --set."""
    from .eval import kind_of
    files, kinds = {}, {}
    for role in ("forget", "retain", "options", "holdout", "set"):
        for name, path in _pairs(values[role], role).items():
            if name in files:
                raise CLIError(f"--{role} {name}=…: a set named {name!r} is given twice")
            files[name], kinds[name] = path, kind_of(name) if role == "set" else role
    if not files:
        raise CLIError(f"{PROG} eval: give at least one set (--forget NAME=FILE, --retain …, --options …, "
                       "--holdout …, or --set NAME=FILE)")
    return files, kinds


def run_eval(values: dict) -> int:
    from .config import read_records
    from .eval import evaluate
    from .eval.evaluate import check_retain_reference, check_sets
    from .eval.report import eval_table
    _quiet_unless_progress(values)
    files, kinds = eval_sets(values)
    sets = {name: read_records(path) for name, path in files.items()}
    check_sets(sets, kinds)
    retain_reference = None
    if values["retain_result"]:
        path = Path(values["retain_result"])
        if not path.is_file():
            raise CLIError(f"--retain-result {path}: no such file")
        try:
            retain_reference = json.loads(path.read_text())
            check_retain_reference(retain_reference, sets, kinds)
        except (json.JSONDecodeError, ValueError) as e:
            raise CLIError(f"--retain-result {path}: {e}") from None
    if values["output"] and Path(values["output"]).is_dir():
        raise CLIError(f"--output {values['output']} is a directory; give a file name")
    model, tokenizer = load_model_and_tokenizer(values)
    result = evaluate(model.eval(), tokenizer, sets, kinds=kinds, retain_reference=retain_reference,
                      generate=values["generate"], batch_size=values["batch_size"],
                      max_new_tokens=values["max_new_tokens"], progress=values["progress"])
    result["model"] = str(Path(values["model"]).resolve())
    table = eval_table(result)
    if values["output"]:
        from .eval.report import write_json
        write_json(result, values["output"])
        print(table + f"\nwritten: {values['output']}")
    else:
        print(table, file=sys.stderr)
        print(json.dumps(result, indent=1))
    return 0


def run_compare(values: dict) -> int:
    from .eval.compare import compare, compare_text, plot_compare
    results = {}
    for path in values["results"]:
        if not Path(path).is_file():
            raise CLIError(f"compare: {path}: no such file")
        try:
            results[path] = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"compare: {path} is not JSON ({e})") from None
    if len(results) < 2:
        raise CLIError("compare: give a baseline result and at least one result to compare with it")
    try:
        changes = compare(results)
    except ValueError as e:
        raise CLIError(f"compare: {e}") from None
    print(compare_text(changes, questions=values["questions"]))
    if values["plot"]:
        plot_compare(changes, values["plot"])
        print(f"written: {values['plot']}")
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
    "compare": (COMPARE_OPTS, "compare `eval` results: the change of each set's metrics and of each question's "
                              "answer probability against the first result", run_compare, None),
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
