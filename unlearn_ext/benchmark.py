"""``unlearn-ext benchmark``: TOFU's protocol (arXiv 2401.06121), offline, end to end.

1. Generate a TOFU-style benchmark (:mod:`unlearn_ext.data.synthetic`, seeded) and train a
   byte-level BPE tokenizer on its text.
2. Fine-tune the *target*, a small Llama built from a config (:mod:`unlearn_ext.models.tiny`),
   on every author plus the real-world stand-ins (world facts, real authors), so that the
   utility sets hold knowledge the model has.
3. For each forget split, fine-tune a *retain* model the same way without the forget
   authors: what a model that never saw them looks like.
4. Run each method from the target on the split's forget set (retain set: the split's
   retain authors), through the same code path as ``unlearn-ext unlearn``: the methods
   registry, the loss head, the trainer.
5. Evaluate every model with :func:`unlearn_ext.eval.evaluate` — forget quality against the
   split's retain model, model utility on retain / real authors / world facts, Min-K %
   membership AUC against the holdout authors — and write ``benchmark.json``,
   ``benchmark.md`` and ``benchmark.png`` (forget quality against model utility).

Every method gets the same unlearning budget (learning rate, epochs, batch size, seed,
retain sampling); method options are the papers' defaults, with the exceptions listed in
:func:`method_options` (each says why). Fine-tuned models are kept under
``<out>/models`` with a fingerprint of what made them: a later run with the same settings
(e.g. other ``--methods``) loads them instead of training again.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .data import QACollator
from .data.synthetic import generate_benchmark, write_benchmark
from .data.tofu import HOLDOUT_OF, RETAIN_OF
from .eval import evaluate, summary_row
from .eval.report import machine, markdown_table, plot_tradeoff, write_json, write_text
from .methods import Finetune, Models, freeze, get_method, make_head
from .models.tiny import SIZES, build_tiny_llama, corpus_texts, train_tokenizer
from .trainer import TrainConfig, TrainData, train

SPLITS = ("forget01", "forget05", "forget10")
DEFAULT_METHODS = ("ga", "graddiff", "npo", "npo_rt", "simnpo", "rkld", "undial")
STAND_INS = ("world_facts", "real_authors")  # taught to every fine-tuned model (utility sets)


@dataclass(frozen=True)
class Scale:
    """Data, model and training settings of one benchmark scale (``--scale-arg`` overrides any)."""
    num_authors: int            # authors in the benchmark (TOFU: 200); forget splits take 1/5/10 % of them
    questions_per_author: int   # TOFU: 20
    vocab_size: int             # of the BPE tokenizer trained on the benchmark's text
    model: str                  # a size of unlearn_ext.models.tiny.SIZES
    max_length: int             # tokens per example
    finetune_lr: float          # fine-tuning of the target and retain models (warmup, linear decay)
    finetune_epochs: float
    finetune_batch_size: int
    unlearn_lr: float           # every method, the same
    unlearn_epochs: float       # passes over the forget set
    unlearn_batch_size: int     # forget examples per step (and as many retain examples)
    eval_batch_size: int
    warmup_ratio: float = 0.05  # fine-tuning only; unlearning runs decay linearly from the start

    def finetuning_settings(self) -> dict:
        """What a fine-tuned model depends on (not the unlearning or evaluation settings)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not k.startswith(("unlearn_", "eval_"))}

    def with_overrides(self, values: dict[str, str]) -> "Scale":
        fields = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"--scale-arg: unknown setting {', '.join(unknown)}; settings: {', '.join(fields)}")
        parsed = {}
        for key, text in values.items():
            kind = type(getattr(self, key))
            try:
                parsed[key] = kind(text)
            except ValueError:
                raise ValueError(f"--scale-arg {key}: expected {kind.__name__}, got {text!r}") from None
        return dataclasses.replace(self, **parsed)


SCALES = {
    # 40 authors x 20 questions, a 0.8M-parameter Llama (+0.26M embeddings): each of the four
    # fine-tunings takes about 4 minutes on one core, every unlearning run and evaluation
    # seconds; 27 minutes in all (benchmarks/results/tofu_cpu). Run it with OMP_NUM_THREADS=1
    # on a shared machine: two threads contending with other jobs were several times slower.
    "cpu": Scale(num_authors=40, questions_per_author=20, vocab_size=2048, model="cpu", max_length=128,
                 finetune_lr=1e-3, finetune_epochs=30, finetune_batch_size=16,
                 unlearn_lr=1e-4, unlearn_epochs=10, unlearn_batch_size=8, eval_batch_size=64),
    # TOFU's size (200 authors, forget01/05/10 = 2/10/20 authors) on a 75M-parameter Llama:
    # plausible on one H100 in well under an hour (not run here: no GPU on this project's machines).
    "gpu": Scale(num_authors=200, questions_per_author=20, vocab_size=8192, model="gpu", max_length=128,
                 finetune_lr=3e-4, finetune_epochs=20, finetune_batch_size=32,
                 unlearn_lr=3e-5, unlearn_epochs=10, unlearn_batch_size=32, eval_batch_size=128),
}


def method_options(name: str, split: str, scale: Scale) -> dict:
    """Options that differ from a method's defaults (the papers' TOFU settings for 7B models)."""
    if name == "simnpo" and split == "forget10":
        return {"beta": 4.5, "forget_weight": 0.125}  # SimNPO's own forget10 setting (defaults: forget05)
    if name == "rkld":
        # The paper builds the augmented model at its fine-tuning learning rate (1e-5 for both).
        return {"augment_lr": scale.finetune_lr}
    return {}


# ---- models ---------------------------------------------------------------------------------------


def _fingerprint_matches(directory: Path, fingerprint: dict) -> bool:
    path = directory / "fingerprint.json"
    return path.is_file() and json.loads(path.read_text()) == fingerprint and (directory / "config.json").is_file()


def finetuned(name: str, examples: Sequence[dict], tokenizer, scale: Scale, *, seed: int, out: Path, head,
              progress: bool):
    """A freshly initialised model fine-tuned on ``examples``, saved as ``<out>/models/<name>``;
    loaded from there instead when a run with the same settings made it."""
    from transformers import AutoModelForCausalLM
    directory = out / "models" / name
    fingerprint = {"settings": scale.finetuning_settings(), "seed": seed, "examples": len(examples),
                   "first": examples[0], "last": examples[-1]}
    if _fingerprint_matches(directory, fingerprint):
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True), True
    model = build_tiny_llama(tokenizer, scale.model, seed=seed, max_position_embeddings=scale.max_length)
    config = TrainConfig(lr=scale.finetune_lr, epochs=scale.finetune_epochs, batch_size=scale.finetune_batch_size,
                         warmup_ratio=scale.warmup_ratio, weight_decay=0.0, seed=seed, progress=progress,
                         desc=f"fine-tune {name}")
    model = train(Finetune(head=head), Models(student=model),
                  TrainData(examples, collate=QACollator(tokenizer, scale.max_length)), config)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
    return model, False


def unlearned(method_name: str, split: str, target, forget, retain, tokenizer, scale: Scale, *, seed: int, head,
              progress: bool):
    """The target after ``method_name`` on ``forget``: as ``unlearn-ext unlearn`` runs it."""
    cls = get_method(method_name)
    options = method_options(method_name, split, scale)
    method = cls(cls.make_options(options), head=head)
    student = copy.deepcopy(target).requires_grad_(True).train()
    reference = freeze(copy.deepcopy(target)) if method.needs_reference() else None
    config = TrainConfig(lr=scale.unlearn_lr, epochs=scale.unlearn_epochs, batch_size=scale.unlearn_batch_size,
                         seed=seed, progress=progress, desc=f"{split} {method_name}")
    model = train(method, Models(student=student, reference=reference),
                  TrainData(forget, retain, QACollator(tokenizer, scale.max_length)), config)
    return model, {**dataclasses.asdict(method.options), "head": method.head.name}


# ---- the protocol ---------------------------------------------------------------------------------


def _eval_sets(splits: dict, split: str) -> dict[str, list[dict]]:
    """The sets every model of a split is evaluated on, named so that their roles follow
    (``unlearn_ext.eval.kind_of``) and table columns are the same for every split."""
    return {"forget": splits[f"{split}_perturbed"], "retain": splits["retain_perturbed"],
            "real_authors": splits["real_authors_perturbed"], "world_facts": splits["world_facts_perturbed"],
            "holdout": splits[HOLDOUT_OF[split]]}


def run_benchmark(scale: Scale, out: str | os.PathLike, *, splits: Sequence[str] = SPLITS,
                  methods: Sequence[str] = DEFAULT_METHODS, seed: int = 0, fused: bool | None = None,
                  backend: str | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Run the whole protocol; return the report (also written to ``out``)."""
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    for name in methods:
        get_method(name)  # an unknown name fails now, not after the fine-tuning
    if scale.model not in SIZES:
        raise ValueError(f"model size {scale.model!r} is not one of {', '.join(SIZES)}")
    out = Path(out)
    started = time.perf_counter()
    head = make_head(fused, backend)
    timings: dict[str, float] = {}

    def timed(label, fn):
        log(f"[{time.perf_counter() - started:7.1f}s] {label}")
        t0 = time.perf_counter()
        result = fn()
        timings[label] = round(time.perf_counter() - t0, 2)
        return result

    data_args = dict(num_authors=scale.num_authors, questions_per_author=scale.questions_per_author, seed=seed)
    data = generate_benchmark(**data_args)
    write_benchmark(out / "data", **data_args)
    tokenizer = train_tokenizer(corpus_texts(data), vocab_size=scale.vocab_size)
    tokenizer.save_pretrained(out / "models" / "tokenizer")
    stand_ins = [r for name in STAND_INS for r in data[name]]

    def finetune(name, authors):
        model, loaded = timed(f"fine-tune {name}", lambda: finetuned(
            name, authors + stand_ins, tokenizer, scale, seed=seed, out=out, head=head, progress=progress))
        if loaded:
            log(f"  (loaded from {out / 'models' / name}: same settings)")
        return model.eval()

    def score(label, model, sets, reference=None):
        return timed(f"evaluate {label}", lambda: evaluate(
            model, tokenizer, sets, retain_reference=reference, batch_size=scale.eval_batch_size, backend=backend,
            progress=progress))

    target = finetune("target", data["full"])
    rows, details = [], {}
    for split in splits:
        sets = _eval_sets(data, split)
        retain_model = finetune(RETAIN_OF[split], data[RETAIN_OF[split]])
        reference = score(f"{split} retain model", retain_model, sets)
        results = {"retain": reference, "finetuned": score(f"{split} target", target, sets, reference)}
        options = {}
        for name in methods:
            model, options[name] = timed(f"{split} {name}", lambda: unlearned(
                name, split, target, data[split], data[RETAIN_OF[split]], tokenizer, scale, seed=seed, head=head,
                progress=progress))
            results[name] = score(f"{split} {name}", model, sets, reference)
        for name, result in results.items():
            forget_quality = result["forget_quality"] if name != "retain" else 1.0  # KS test against itself
            rows.append({**summary_row(name, result, split=split), "forget_quality": forget_quality,
                         "unlearn_s": timings.get(f"{split} {name}")})
        details[split] = {"method_options": options, "results": results}

    report = {"scale": dataclasses.asdict(scale), "seed": seed, "splits": list(splits), "methods": list(methods),
              "head": head.name, "backend": backend or "default", "machine": machine(),
              "total_s": round(time.perf_counter() - started, 1), "timings_s": timings,
              "sizes": {name: len(records) for name, records in data.items()},
              "parameters": sum(p.numel() for p in target.parameters()), "rows": rows}
    write_report(report, details, out)
    log(f"[{report['total_s']:7.1f}s] written: {out / 'benchmark.md'}, benchmark.json, benchmark.png")
    return report


# ---- the report -----------------------------------------------------------------------------------

TABLE_COLUMNS = ("split", "method", "forget_quality", "model_utility", "forget.prob", "forget.rouge",
                 "forget.truth_ratio", "retain.prob", "retain.rouge", "real_authors.prob", "world_facts.prob",
                 "mia_auc", "unlearn_s")


def markdown_report(report: dict) -> str:
    s = report["scale"]
    methods = ", ".join(report["methods"])
    lines = [
        "# unlearn-ext benchmark", "",
        f"TOFU's protocol on a generated TOFU-style benchmark: {s['num_authors']} fictitious authors x "
        f"{s['questions_per_author']} questions (seed {report['seed']}); a Llama of "
        f"{report['parameters'] / 1e6:.2f}M parameters (size `{s['model']}`, BPE vocabulary {s['vocab_size']}) "
        "built from a config.", "",
        f"- Fine-tuning (target: every author; retain models: the retain authors; both with the real-world "
        f"stand-ins): AdamW, lr {s['finetune_lr']:g}, {s['finetune_epochs']:g} epochs, batch "
        f"{s['finetune_batch_size']}, warmup {s['warmup_ratio']:g}, linear decay.",
        f"- Unlearning, the same for every method ({methods}): AdamW, lr {s['unlearn_lr']:g}, "
        f"{s['unlearn_epochs']:g} epochs over the forget set, batch {s['unlearn_batch_size']} forget "
        f"(+ {s['unlearn_batch_size']} retain where the method has a retain term), linear decay, clipping 1.0; "
        f"loss head `{report['head']}`, kernels `{report['backend']}`. Method options: the papers' defaults, "
        "except those listed below.",
        "- forget_quality: KS-test p-value of the forget truth ratios against the split's retain model "
        "(> 0.05: indistinguishable from never trained on); model_utility: harmonic mean of probability, "
        "ROUGE-L and truth ratio on retain, real authors and world facts; mia_auc: Min-K % AUC of forget "
        "against holdout authors (0.5: indistinguishable). `finetuned` is the target before unlearning, "
        "`retain` the retain model.", "",
        markdown_table(report["rows"], TABLE_COLUMNS),
        "Method options that differ from the defaults: "
        + (", ".join(f"{split} {name}: {opts}" for split in report["splits"] for name in report["methods"]
                     if (opts := method_options(name, split, Scale(**s)))) or "none") + ".", "",
        f"Machine: {report['machine']}. Total wall time {report['total_s']:.0f} s.", "",
    ]
    return "\n".join(lines)


def write_report(report: dict, details: dict, out: Path) -> None:
    write_json({**report, "details": details}, out / "benchmark.json")
    write_text(markdown_report(report), out / "benchmark.md")
    plot_tradeoff(report["rows"], out / "benchmark.png",
                  title=f"unlearn-ext benchmark, scale {report['scale']['model']}: forget quality vs model utility")
