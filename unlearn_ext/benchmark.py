"""``unlearn-ext benchmark``: TOFU's protocol (arXiv 2401.06121), offline, end to end.

1. Generate a TOFU-style benchmark (:mod:`unlearn_ext.data.synthetic`, seeded).
2. Fine-tune the *target* on every author. Scales ``cpu``/``gpu``: a small Llama built from
   a config (:mod:`unlearn_ext.models.tiny`) with a BPE tokenizer trained on the benchmark's
   text, taught the real-world stand-ins (world facts, real authors) too, so that the
   utility sets hold knowledge it has. Scale ``smol``: SmolLM2-135M-Instruct
   (:mod:`unlearn_ext.models.smollm2`, its own tokenizer and chat template) as the
   pretrained base, as TOFU fine-tunes Llama-2-7B-chat: the utility sets then probe what it
   brought from pre-training.
3. For each forget split, fine-tune a *retain* model the same way without the forget
   authors: what a model that never saw them looks like.
4. Run each method from the target on the split's forget set (retain set: the split's
   retain authors), through the same code path as ``unlearn-ext unlearn``: the methods
   registry, the loss head, the trainer; with ``unlearn_eval_every`` the forget and retain
   answer probabilities are evaluated during the run (:mod:`unlearn_ext.eval.dynamics`).
5. Evaluate every model with :func:`unlearn_ext.eval.evaluate` — forget quality against the
   split's retain model, model utility on retain / real authors / world facts, Min-K %
   membership AUC against the holdout authors — and write ``benchmark.json``,
   ``benchmark.md`` and ``benchmark.png`` (:mod:`unlearn_ext.benchmark_report`).

Tuning (``--grid``, on at scale ``smol``): per method and split, a coordinate search as
papers tune: first the learning rate × (0.3, 1, 3) at the method's default options, then
the method's main knob (``KNOBS``) over its values at the learning rate chosen so far.
``SELECTION`` picks a setting: the best forget quality among the settings whose model
utility is at least 0.9 × the target's; ``<out>/configs/<method>.yaml`` holds it as a run
configuration for ``unlearn-ext unlearn --config`` (:mod:`unlearn_ext.benchmark_configs`).
Without ``--grid`` every method runs once, at its defaults (the papers' settings, except
those :func:`method_options` lists) and the scale's learning rate.

Every stage is cached on disk with a fingerprint of what made it (``<out>/models/<name>``
for fine-tuned models; ``<out>/evals/<split>/<name>.json`` for their evaluations;
``<out>/runs/<split>/<method>/<setting>/result.json`` for one unlearning run and its
evaluation): a run killed at any point continues where it stopped, and a later run with
other ``--methods`` or splits reuses what it shares. Reports are rewritten after every stage.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .data import QACollator
from .data.synthetic import generate_benchmark, write_benchmark
from .data.tofu import HOLDOUT_OF, RETAIN_OF
from .eval import evaluate, forget_quality_against
from .eval.dynamics import EvalDuringTraining
from .eval.report import machine, write_json
from .methods import Finetune, Models, freeze, get_method, make_head
from .models.tiny import SIZES, build_tiny_llama, corpus_texts, train_tokenizer
from .trainer import TrainConfig, TrainData, train

SPLITS = ("forget01", "forget05", "forget10")
RUN_ORDER = ("forget10", "forget05", "forget01")  # the largest split first: its results say the most
DEFAULT_METHODS = ("ga", "graddiff", "npo", "npo_rt", "simnpo", "rkld", "undial", "rmu", "idkdpo")
STAND_INS = ("world_facts", "real_authors")  # taught to models trained from scratch (utility sets)
PRETRAINED = ("smollm2",)  # Scale.model values that are pretrained bases rather than tiny.SIZES


@dataclass(frozen=True)
class Scale:
    """Data, model and training settings of one benchmark scale (``--scale-arg`` overrides any)."""
    num_authors: int            # authors in the benchmark (TOFU: 200); forget splits take 1/5/10 % of them
    questions_per_author: int   # TOFU: 20
    vocab_size: int             # of the BPE tokenizer trained on the benchmark's text (tiny models only)
    model: str                  # a size of unlearn_ext.models.tiny.SIZES, or "smollm2" (pretrained base)
    max_length: int             # tokens per example
    finetune_lr: float          # fine-tuning of the target and retain models (warmup, linear decay)
    finetune_epochs: float
    finetune_batch_size: int
    unlearn_lr: float           # every method's (the grid's centre)
    unlearn_epochs: float       # passes over the forget set
    unlearn_batch_size: int     # forget examples per step (and as many retain examples)
    eval_batch_size: int
    warmup_ratio: float = 0.05  # fine-tuning only; unlearning runs decay linearly from the start
    num_perturbed: int = 5      # wrong answers per author question (TOFU: 5); fewer: cheaper evaluations
    teach_stand_ins: bool = True  # fine-tune on the real-world stand-ins (a model from scratch knows none)
    eval_utility_questions: int = 0  # questions of real_authors / world_facts evaluated (spread); 0: all
    unlearn_eval_every: int = 0  # steps between evaluations during unlearning (dynamics); 0: none
    finetune_save_every: int = 0  # steps between checkpoints of a fine-tuning (a killed one resumes); 0: none
    grid: bool = False          # tune each method (learning rate, then its main knob) instead of its defaults

    def finetuning_settings(self) -> dict:
        """What a fine-tuned model depends on (not the unlearning, evaluation or grid settings)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not k.startswith(("unlearn_", "eval_")) and k not in ("grid", "finetune_save_every")}

    def with_overrides(self, values: dict[str, str]) -> "Scale":
        fields = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"--scale-arg: unknown setting {', '.join(unknown)}; settings: {', '.join(fields)}")
        parsed = {}
        for key, text in values.items():
            kind = type(getattr(self, key))
            try:
                parsed[key] = _parse_bool(text) if kind is bool else kind(text)
            except ValueError:
                raise ValueError(f"--scale-arg {key}: expected {kind.__name__}, got {text!r}") from None
        return dataclasses.replace(self, **parsed)


def _parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


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
    # SmolLM2-135M-Instruct fine-tuned on 30 authors x 10 questions (forget01/05/10 = 1/2/3
    # authors), sized on 2 cores from measured costs (README, "The benchmark"): a training
    # step of batch 8 ~3.3 s, one evaluation ~2 min.
    "smol": Scale(num_authors=30, questions_per_author=10, vocab_size=0, model="smollm2", max_length=128,
                  finetune_lr=1e-4, finetune_epochs=8.0, finetune_batch_size=8,
                  unlearn_lr=1e-5, unlearn_epochs=5.0, unlearn_batch_size=8, eval_batch_size=32,
                  num_perturbed=3, teach_stand_ins=False, eval_utility_questions=30, unlearn_eval_every=5,
                  finetune_save_every=50, grid=True),
}


def method_options(name: str, split: str, scale: Scale) -> dict:
    """Options that differ from a method's defaults (the papers' TOFU settings for 7B models)."""
    if name == "simnpo" and split == "forget10":
        return {"beta": 4.5, "forget_weight": 0.125}  # SimNPO's own forget10 setting (defaults: forget05)
    if name == "rkld":
        # The paper builds the augmented model at its fine-tuning learning rate (1e-5 for both).
        return {"augment_lr": scale.finetune_lr}
    return {}


# ---- the grid -------------------------------------------------------------------------------------

LR_FACTORS = (0.3, 1.0, 3.0)  # x the method's learning rate
# The learning rate a method starts from, relative to the scale's: RMU trains three MLPs
# toward a fixed vector, and WMDP runs it at 5e-5 where the others' papers use 1e-5.
METHOD_LR = {"rmu": 5.0}
# RMU's factors reach 30x (1.5e-3): on SmolLM2 it left the forget answers where they were at
# 1.5e-5-1.5e-4 (probability 0.986, as the target's), and the demo first forgot at 1e-3.
METHOD_LR_FACTORS = {"rmu": (0.3, 1.0, 3.0, 10.0, 30.0)}
# Each method's main knob and the values tried (the default, from the options, is one of them).
KNOBS = {
    "graddiff": ("retain_weight", (1.0, 2.0, 5.0)),
    "npo": ("beta", (0.05, 0.1, 0.5)),
    "npo_rt": ("beta", (0.05, 0.1, 0.5)),
    "simnpo": ("beta", (1.5, 2.5, 4.5)),
    "rkld": ("alpha", (3.0, 8.0, 20.0)),
    "undial": ("gamma", (3.0, 10.0, 30.0)),
    # RMU: the retain weight α, not c: c is set from the activations (2 x their norm; WMDP's absolute
    # 2-20 lie inside them and forget nothing), and on the demo α = 1200 held the forget term back.
    "rmu": ("retain_weight", (100.0, 400.0, 1200.0)),
    "idkdpo": ("beta", (0.05, 0.1, 0.5)),
}
UTILITY_FLOOR = 0.9
SELECTION = (f"the best forget quality among the settings whose model utility is >= {UTILITY_FLOOR} x the "
             "target's (ties, as at the KS test's floor: the lower forget-set answer probability); when none is, "
             "the setting with the highest utility")


@dataclass(frozen=True)
class Setting:
    """One point of a method's grid: its learning rate and options (beyond the defaults)."""
    lr: float
    options: tuple[tuple[str, object], ...] = ()

    def label(self) -> str:
        return "lr" + f"{self.lr:.3g}" + "".join(f"_{k}{v:g}" if isinstance(v, float) else f"_{k}{v}"
                                                  for k, v in self.options)

    def describe(self) -> str:
        return ", ".join([f"lr {self.lr:.3g}", *(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in self.options)])


def default_setting(name: str, split: str, scale: Scale) -> Setting:
    return Setting(scale.unlearn_lr * METHOD_LR.get(name, 1.0), tuple(sorted(method_options(name, split, scale).items())))


def knob_default(name: str, split: str, scale: Scale):
    option = KNOBS[name][0]
    values = method_options(name, split, scale)
    if option in values:
        return values[option]
    cls = get_method(name)
    return getattr(cls.make_options({}), option)


def select(entries: Sequence[dict], target_utility: float | None) -> dict:
    """``SELECTION`` over ``entries`` (each with ``forget_quality``, ``model_utility`` and
    ``forget.prob``). Ties are common: with 30 forget answers the KS p-value takes few
    values, and every setting that leaves the truth ratios all on one side of the retain
    model's gets the same floor (2.9e-4); of those, the one that forgot more is taken (the
    higher utility would pick the setting that did least)."""
    floor = UTILITY_FLOOR * (target_utility or 0.0)
    eligible = [e for e in entries if (e["model_utility"] or 0.0) >= floor]
    if eligible:
        return max(eligible, key=lambda e: (e["forget_quality"], -e["forget.prob"]))
    return max(entries, key=lambda e: e["model_utility"] or 0.0)


# ---- stages cached on disk -----------------------------------------------------------------------


def _normalised(obj):
    return json.loads(json.dumps(obj))


def cached(path: Path, fingerprint: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """``compute()``'s result, stored at ``path`` with ``fingerprint``; read back instead
    when ``path`` holds a result of the same fingerprint. Returns (result, was it cached)."""
    fingerprint = _normalised(fingerprint)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = None
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
            return saved["result"], True
    result = compute()
    write_json({"fingerprint": fingerprint, "result": result}, path)  # atomic: a kill leaves no half file
    return result, False


def _fingerprint_matches(directory: Path, fingerprint: dict) -> bool:
    path = directory / "fingerprint.json"
    return (path.is_file() and json.loads(path.read_text()) == _normalised(fingerprint)
            and (directory / "config.json").is_file())


def model_fingerprint(examples: Sequence[dict], scale: Scale, seed: int) -> dict:
    return {"settings": scale.finetuning_settings(), "seed": seed, "examples": len(examples),
            "first": examples[0], "last": examples[-1]}


def finetuned(name: str, examples: Sequence[dict], tokenizer, scale: Scale, *, seed: int, out: Path, head,
              progress: bool, base=None, log: Callable[[str], None] = print):
    """A model fine-tuned on ``examples`` — from ``base`` (a pretrained model, copied) or
    freshly initialised — saved as ``<out>/models/<name>``; loaded from there instead when a
    run with the same settings made it. With ``finetune_save_every`` the fine-tuning itself
    keeps checkpoints in ``<out>/train/<name>`` and a killed one resumes from the newest."""
    from transformers import AutoModelForCausalLM
    directory = out / "models" / name
    fingerprint = model_fingerprint(examples, scale, seed)
    if _fingerprint_matches(directory, fingerprint):
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True), True
    if base is not None:
        model = copy.deepcopy(base).requires_grad_(True).train()
    else:
        model = build_tiny_llama(tokenizer, scale.model, seed=seed, max_position_embeddings=scale.max_length)
    run_dir = out / "train" / name if scale.finetune_save_every else None
    resume = run_dir is not None and _fingerprint_matches_file(run_dir / "fingerprint.json", fingerprint) \
        and any((run_dir / "checkpoints").glob("*"))
    config = TrainConfig(lr=scale.finetune_lr, epochs=scale.finetune_epochs, batch_size=scale.finetune_batch_size,
                         warmup_ratio=scale.warmup_ratio, weight_decay=0.0, seed=seed, progress=progress,
                         desc=f"fine-tune {name}", output_dir=str(run_dir) if run_dir else None,
                         save_every=scale.finetune_save_every, resume=resume, overwrite=run_dir is not None and not resume)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "fingerprint.json").write_text(json.dumps(_normalised(fingerprint), indent=1))
        if resume:
            log(f"  (fine-tune {name}: resuming from the newest checkpoint in {run_dir})")

    def report(step, record):  # a line now and then: the run is hours long on a shared machine
        if step % 25 == 0:
            log(f"  fine-tune {name}: step {step}, epoch {record['epoch']:.2f}, loss {record['loss']:.3f}, "
                f"{record['elapsed_s']:.0f} s")
    model = train(Finetune(head=head), Models(student=model),
                  TrainData(examples, collate=QACollator(tokenizer, scale.max_length)), config, callbacks=[report])
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "fingerprint.json").write_text(json.dumps(_normalised(fingerprint), indent=1))
    if run_dir is not None:
        shutil.rmtree(run_dir / "model", ignore_errors=True)  # the same weights as directory; logs stay
    return model, False


def _fingerprint_matches_file(path: Path, fingerprint: dict) -> bool:
    try:
        return json.loads(path.read_text()) == _normalised(fingerprint)
    except (OSError, json.JSONDecodeError):
        return False


def unlearned(method_name: str, setting: Setting, target, forget, retain, tokenizer, scale: Scale, *, seed: int,
              head, progress: bool, evaluator: EvalDuringTraining | None = None):
    """The target after ``method_name`` on ``forget``: as ``unlearn-ext unlearn`` runs it.
    Returns (model, options used, the training log)."""
    cls = get_method(method_name)
    method = cls(cls.make_options(dict(setting.options)), head=head)
    student = copy.deepcopy(target).requires_grad_(True).train()
    reference = freeze(copy.deepcopy(target)) if method.needs_reference() else None
    config = TrainConfig(lr=setting.lr, epochs=scale.unlearn_epochs, batch_size=scale.unlearn_batch_size,
                         seed=seed, progress=progress, desc=f"{method_name} {setting.label()}")
    log: list[dict] = []

    def after_step(step, record):
        log.append(record)
        if evaluator is not None and step % evaluator.every == 0:
            evaluator(student, step)
    # The dynamics are evaluated from a callback (on the student the trainer updates in place),
    # not through TrainConfig.eval_every: a method that trains a model of its own in prepare
    # (RKLD's augmented model) reuses this config, and its inner run has no evaluator.
    if evaluator is not None:
        evaluator(student, 0)
    model = train(method, Models(student=student, reference=reference),
                  TrainData(forget, retain, QACollator(tokenizer, scale.max_length)), config, callbacks=[after_step])
    if evaluator is not None and evaluator.records[-1]["step"] != log[-1]["step"]:
        evaluator(model, log[-1]["step"])  # the last step, as the trainer's own evaluation does
    return model, {**dataclasses.asdict(method.options), "head": method.head.name}, log


# ---- the protocol ---------------------------------------------------------------------------------


def _spread(records: Sequence[dict], count: int) -> list[dict]:
    """``count`` records spread evenly over ``records`` (all when count is 0 or more)."""
    if count <= 0 or count >= len(records):
        return list(records)
    return [records[math.floor(i * len(records) / count)] for i in range(count)]


def eval_sets(splits: dict, split: str, scale: Scale) -> dict[str, list[dict]]:
    """The sets every model of a split is evaluated on, named so that their roles follow
    (``unlearn_ext.eval.kind_of``) and table columns are the same for every split."""
    n = scale.eval_utility_questions
    return {"forget": splits[f"{split}_perturbed"], "retain": splits["retain_perturbed"],
            "real_authors": _spread(splits["real_authors_perturbed"], n),
            "world_facts": _spread(splits["world_facts_perturbed"], n),
            "holdout": splits[HOLDOUT_OF[split]]}


def dynamics_sets(sets: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """What is evaluated during unlearning: answer probabilities only (no perturbed
    answers, no generation), on the forget and retain authors and 20 world facts."""
    def qa(records):
        return [{"question": r["question"], "answer": r["answer"]} for r in records]
    return {"forget": qa(sets["forget"]), "retain": qa(sets["retain"]), "world_facts": qa(_spread(sets["world_facts"], 20))}


def _sets_fingerprint(sets: dict[str, list[dict]]) -> dict:
    return {name: [len(records), records[0]["question"], records[-1]["question"]] for name, records in sets.items()}


def _eval_settings(scale: Scale) -> dict:
    return {k: v for k, v in dataclasses.asdict(scale).items() if k.startswith("eval_")}


def load_base(scale: Scale, seed: int, data: dict, out: Path):
    """(base model or None, tokenizer): SmolLM2 and its tokenizer for a pretrained scale,
    else a BPE tokenizer trained on the benchmark's text."""
    if scale.model == "smollm2":
        from .models.smollm2 import load_smollm2
        base, tokenizer, _ = load_smollm2()
    else:
        base, tokenizer = None, train_tokenizer(corpus_texts(data), vocab_size=scale.vocab_size)
    tokenizer.save_pretrained(out / "models" / "tokenizer")
    return base, tokenizer


def check_arguments(scale: Scale, splits: Sequence[str], methods: Sequence[str]) -> None:
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    for name in methods:
        get_method(name)  # an unknown name fails now, not after the fine-tuning
    if scale.model not in SIZES and scale.model not in PRETRAINED:
        raise ValueError(f"model {scale.model!r} is neither a size of {', '.join(SIZES)} nor one of "
                         f"{', '.join(PRETRAINED)}")
    if scale.unlearn_eval_every < 0:
        raise ValueError(f"unlearn_eval_every must be >= 0, got {scale.unlearn_eval_every}")


def run_benchmark(scale: Scale, out: str | os.PathLike, *, splits: Sequence[str] = SPLITS,
                  methods: Sequence[str] = DEFAULT_METHODS, seed: int = 0, fused: bool | None = None,
                  backend: str | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Run the whole protocol, stage by stage (each cached); return the report (also
    written to ``out``, after every stage)."""
    from . import benchmark_report
    check_arguments(scale, splits, methods)
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

    data_args = dict(num_authors=scale.num_authors, questions_per_author=scale.questions_per_author, seed=seed,
                     num_perturbed=scale.num_perturbed)
    data = generate_benchmark(**data_args)
    write_benchmark(out / "data", **data_args)
    base, tokenizer = load_base(scale, seed, data, out)
    stand_ins = [r for name in STAND_INS for r in data[name]] if scale.teach_stand_ins else []
    state = {"scale": scale, "seed": seed, "splits": [s for s in SPLITS if s in splits], "methods": list(methods),
             "head": head.name, "backend": backend or "default", "machine": machine(), "timings_s": timings,
             "sizes": {name: len(records) for name, records in data.items()}, "parameters": None, "splits_done": {}}

    def finetune(name, authors):
        examples = authors + stand_ins
        model, loaded = timed(f"fine-tune {name}", lambda: finetuned(
            name, examples, tokenizer, scale, seed=seed, out=out, head=head, progress=progress, base=base, log=log))
        if loaded:
            log(f"  (loaded from {out / 'models' / name}: same settings)")
        return model.eval(), model_fingerprint(examples, scale, seed)

    def score(split, label, make_model, model_fp, sets):
        """``make_model()`` is called only if the evaluation is not cached: a retain model
        whose evaluation was kept need not be fine-tuned (or loaded) again."""
        fingerprint = {"model": model_fp, "sets": _sets_fingerprint(sets), "eval": _eval_settings(scale),
                       "backend": backend}
        result, hit = cached(out / "evals" / split / f"{label}.json", fingerprint, lambda: timed(
            f"evaluate {split} {label}", lambda: evaluate(make_model(), tokenizer, sets,
                                                          batch_size=scale.eval_batch_size, backend=backend,
                                                          progress=progress)))
        if hit:
            log(f"  (evaluation of {split} {label}: cached)")
        return result

    def write():
        state["total_s"] = round(time.perf_counter() - started, 1)
        return benchmark_report.write_report(state, out)

    target, target_fp = finetune("target", data["full"])
    state["parameters"] = sum(p.numel() for p in target.parameters())
    for split in (s for s in RUN_ORDER if s in splits):
        sets = eval_sets(data, split, scale)
        retain = RETAIN_OF[split]
        retain_fp = model_fingerprint(data[retain] + stand_ins, scale, seed)
        reference = score(split, "retain", lambda: finetune(retain, data[retain])[0], retain_fp, sets)
        finetuned_result = {**score(split, "finetuned", lambda: target, target_fp, sets)}
        finetuned_result.update(forget_quality_against(finetuned_result, reference))
        done = {"retain": reference, "finetuned": finetuned_result, "runs": {}}
        state["splits_done"][split] = done
        write()

        def run(name, setting):
            fingerprint = {"target": target_fp, "split": split, "method": name, "lr": setting.lr,
                           "options": dict(setting.options), "epochs": scale.unlearn_epochs,
                           "batch_size": scale.unlearn_batch_size, "max_length": scale.max_length,
                           "eval_every": scale.unlearn_eval_every, "seed": seed, "head": head.name,
                           "backend": backend, "sets": _sets_fingerprint(sets), "eval": _eval_settings(scale)}
            directory = out / "runs" / split / name / setting.label()

            def compute():
                evaluator = (EvalDuringTraining(dynamics_sets(sets), tokenizer, every=scale.unlearn_eval_every,
                                                batch_size=scale.eval_batch_size, backend=backend)
                             if scale.unlearn_eval_every else None)
                t0 = time.perf_counter()
                model, options, train_log = unlearned(name, setting, target, data[split], data[RETAIN_OF[split]],
                                                      tokenizer, scale, seed=seed, head=head, progress=progress,
                                                      evaluator=evaluator)
                unlearn_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = evaluate(model.eval(), tokenizer, sets, batch_size=scale.eval_batch_size, backend=backend,
                                  progress=progress)
                dynamics = evaluator.records if evaluator is not None else []
                if evaluator is not None:
                    evaluator.plot(directory / "eval.png", title=f"{split} {name} ({setting.describe()})")
                return {"options": options, "setting": setting.describe(), "label": setting.label(),
                        "unlearn_s": round(unlearn_s, 2), "eval_s": round(time.perf_counter() - t0, 2),
                        "train_log": train_log, "dynamics": dynamics, "result": result}

            entry, hit = cached(directory / "result.json", fingerprint,
                                lambda: timed(f"{split} {name} {setting.label()}", compute))
            if hit:
                log(f"  ({split} {name} {setting.label()}: cached)")
            entry = {**entry, "result": {**entry["result"], **forget_quality_against(entry["result"], reference)}}
            summary = {"setting": entry["setting"], "label": entry["label"], "lr": setting.lr,
                       "unlearn_s": entry["unlearn_s"],
                       "forget_quality": entry["result"]["forget_quality"],
                       "forget.prob": entry["result"]["sets"]["forget"]["prob"],
                       "model_utility": entry["result"]["model_utility"], "directory": str(directory)}
            done["runs"].setdefault(name, {})[entry["label"]] = {**entry, "summary": summary}
            write()
            return summary

        target_utility = finetuned_result["model_utility"]
        for name in methods:  # every method at its defaults first: the first complete table
            run(name, default_setting(name, split, scale))
        if scale.grid:
            for name in methods:
                tune(name, split, scale, run, target_utility)
    report = write()
    log(f"[{report['total_s']:7.1f}s] written: {out / 'benchmark.md'}, benchmark.json, benchmark.png")
    return report


def tune(name: str, split: str, scale: Scale, run: Callable[[str, Setting], dict], target_utility) -> Setting:
    """The coordinate search: learning rate x ``LR_FACTORS`` (``METHOD_LR_FACTORS``) at the default options, then
    the knob's values at the chosen learning rate; returns the selected setting."""
    default = default_setting(name, split, scale)
    tried = {default: run(name, default)}
    for factor in METHOD_LR_FACTORS.get(name, LR_FACTORS):
        setting = dataclasses.replace(default, lr=default.lr * factor)
        if setting not in tried:
            tried[setting] = run(name, setting)
    best = next(s for s, r in tried.items() if r is select(list(tried.values()), target_utility))
    if name in KNOBS:
        option, values = KNOBS[name]
        for value in values:
            options = dict(best.options)
            options[option] = value
            if option not in dict(best.options) and value == knob_default(name, split, scale):
                continue  # that is the default setting, already run
            setting = Setting(best.lr, tuple(sorted(options.items())))
            if setting not in tried:
                tried[setting] = run(name, setting)
        best = next(s for s, r in tried.items() if r is select(list(tried.values()), target_utility))
    return best
