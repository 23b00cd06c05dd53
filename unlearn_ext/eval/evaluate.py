"""``evaluate``: TOFU's evaluation of one model on a set of question/answer sets.

Each set is a list of TOFU records (``question``, ``answer``, optionally
``paraphrased_answer`` and ``perturbed_answer``) and plays one of four roles, read from its
name unless ``kinds`` says otherwise:

- ``forget`` (name contains "forget"): probability, ROUGE-L, truth ratio summarised as
  ``mean(min(R, 1/R))``; with a holdout set, the Min-K % membership-inference AUC.
- ``retain`` (anything else): probability, ROUGE-L, truth ratio ``mean(max(0, 1 − R))``.
- ``options`` (name contains "real_authors" or "world_facts"): as retain, but probability is
  ``P_true / Σ P_options`` and the truth ratio's reference is the answer itself (TOFU has no
  paraphrase there).
- ``holdout`` (name contains "holdout"): only scored for membership inference.

The truth ratio compares the perturbed answers with the paraphrased answer where the
record has one, else with the answer.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from . import metrics
from .scoring import greedy_answers, score_answers

KINDS = ("forget", "retain", "options", "holdout")
UTILITY_METRICS = ("prob", "rouge", "truth_ratio")
# `unlearn-ext eval`'s generation limit: greedy answers stop at the end-of-sequence token or
# after this many tokens. TOFU's answers are a sentence or two and open-unlearning evaluates
# TOFU with this limit, so an unlearned model's rambling (or a refusal before the facts) is
# seen whole.
MAX_NEW_TOKENS = 200


def kind_of(name: str) -> str:
    """The role a set plays, from its name (TOFU's split names work)."""
    if "holdout" in name:
        return "holdout"
    if "forget" in name:
        return "forget"
    if "real_author" in name or "world_fact" in name:
        return "options"
    return "retain"


def _perturbed(records: Sequence[Mapping], name: str) -> list[list[str]] | None:
    lists = [r.get("perturbed_answer") for r in records]
    if all(p is None for p in lists):
        return None
    sizes = {len(p) if isinstance(p, list) else -1 for p in lists}
    if len(sizes) != 1 or sizes == {0} or sizes == {-1}:
        raise ValueError(f"set {name!r}: every record needs a non-empty 'perturbed_answer' list of one length "
                         f"(found lengths {sorted(sizes)}; -1 = missing)")
    return lists


def _plan(name: str, records: Sequence[Mapping], kind: str):
    """The (question, answer) pairs to score for one set, and where each group lies."""
    if not records:
        raise ValueError(f"set {name!r} is empty")
    questions = [r["question"] for r in records]
    groups = {"answer": [r["answer"] for r in records]}
    perturbed = _perturbed(records, name) if kind != "holdout" else None
    if perturbed is not None:
        if kind != "options":  # an options set's reference is the answer itself: scored once, as "answer"
            groups["reference"] = [r.get("paraphrased_answer", r["answer"]) for r in records]
        groups["perturbed"] = [a for p in perturbed for a in p]
    pairs, spans = [], {}
    for group, answers in groups.items():
        repeat = len(answers) // len(questions)
        spans[group] = (len(pairs), len(pairs) + len(answers), repeat)
        pairs += [(questions[i // repeat], a) for i, a in enumerate(answers)]
    return questions, pairs, spans


def _evaluate_set(model, tokenizer, records, kind, plan, *, generate, batch_size, max_new_tokens, min_k,
                  backend, tick):
    questions, pairs, spans = plan
    scores = score_answers(model, tokenizer, pairs, batch_size=batch_size, min_k=min_k, backend=backend,
                           on_batch=tick)

    def group(key, field):
        start, stop, repeat = spans[key]
        values = scores[field][start:stop]
        return values.view(-1, repeat) if key == "perturbed" else values  # [B, K] / [B]

    result = {"kind": kind, "n": len(records)}
    per_example = {"question": questions, "answer_logprob": group("answer", "logprob").tolist(),
                   "answer_length": group("answer", "length").tolist()}
    if min_k is not None:
        per_example["min_k"] = group("answer", "min_k").tolist()
    if kind != "holdout":
        prob = metrics.answer_probability(group("answer", "logprob"), group("answer", "length"))
        if kind == "options" and "perturbed" in spans:
            prob = metrics.option_probability(group("answer", "logprob"), group("answer", "length"),
                                              group("perturbed", "logprob"), group("perturbed", "length"))
        per_example["prob"] = prob.tolist()
        result["prob"] = float(prob.mean())
        if "perturbed" in spans:
            reference = "reference" if "reference" in spans else "answer"
            ratios = metrics.truth_ratio(group(reference, "logprob"), group(reference, "length"),
                                         group("perturbed", "logprob"), group("perturbed", "length"))
            per_example["truth_ratio_raw"] = ratios.tolist()
            result["truth_ratio"] = metrics.truth_ratio_score(ratios, forget=kind == "forget")
        if generate:
            limit = max_new_tokens or min(128, int(group("answer", "length").max()) + 8)
            answers = greedy_answers(model, tokenizer, questions, max_new_tokens=limit, batch_size=batch_size,
                                     on_batch=tick)
            rouge = metrics.rouge_l_recall(answers, [r["answer"] for r in records])
            per_example["generation"], per_example["rouge"] = answers, rouge
            result["rouge"] = sum(rouge) / len(rouge)
    result["per_example"] = per_example
    return result


def evaluate(model, tokenizer, eval_sets: Mapping[str, Sequence[Mapping]], *, kinds: Mapping[str, str] | None = None,
             retain_reference: Mapping | None = None, generate: bool = True, batch_size: int = 16,
             max_new_tokens: int | None = None, mia_k: float = 0.4, backend: str | None = None,
             progress: bool = False) -> dict:
    """Evaluate ``model`` on every set of ``eval_sets`` ({name: records}).

    Returns a JSON-serialisable dict: ``sets`` ({name: {"kind", "n", "prob", "rouge",
    "truth_ratio", "per_example": {...}}}), ``model_utility`` (harmonic mean over the
    retain and options sets; None unless each has all three metrics), ``mia_auc``
    (Min-K % AUC, forget vs holdout; None without both), ``forget_quality`` and
    ``ks_statistic`` (None unless ``retain_reference``, an earlier ``evaluate`` result of
    the retain-only model on the same forget set, is given).

    ``generate=False`` skips greedy generation and ROUGE (much faster); greedy answers stop
    at the end-of-sequence token or after ``max_new_tokens`` (the command line: 200,
    ``MAX_NEW_TOKENS``; None here: the longest reference answer + 8 tokens, at most 128,
    which keeps the benchmark's cost, but cuts long answers short); ``mia_k`` is Min-K's
    fraction of tokens; ``backend`` picks the ``token_logprob`` kernel.
    """
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    kinds = check_sets(eval_sets, kinds)
    if retain_reference is not None:
        check_retain_reference(retain_reference, eval_sets, kinds)
    forget_names = [n for n, k in kinds.items() if k == "forget"]
    holdout_names = [n for n, k in kinds.items() if k == "holdout"]
    membership = len(forget_names) == 1 and len(holdout_names) == 1

    from tqdm.auto import tqdm
    plans = {name: _plan(name, records, kinds[name]) for name, records in eval_sets.items()}
    total = sum(math.ceil(len(pairs) / batch_size)
                + (math.ceil(len(questions) / batch_size) if generate and kinds[name] != "holdout" else 0)
                for name, (questions, pairs, _) in plans.items())
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=total, desc="evaluate", disable=not progress, leave=False) as bar:
            sets = {name: _evaluate_set(model, tokenizer, records, kinds[name], plans[name], generate=generate,
                                        batch_size=batch_size, max_new_tokens=max_new_tokens,
                                        min_k=mia_k if membership and kinds[name] in ("forget", "holdout") else None,
                                        backend=backend, tick=bar.update)
                    for name, records in eval_sets.items()}
    finally:
        model.train(was_training)

    result = {"sets": sets, "model_utility": None, "mia_auc": None, "forget_quality": None, "ks_statistic": None}
    utility_sets = [s for s in sets.values() if s["kind"] in ("retain", "options")]
    if utility_sets and all(m in s for s in utility_sets for m in UTILITY_METRICS):
        result["model_utility"] = metrics.model_utility(s[m] for s in utility_sets for m in UTILITY_METRICS)
    if membership:
        result["mia_auc"] = metrics.auc(sets[forget_names[0]]["per_example"]["min_k"],
                                        sets[holdout_names[0]]["per_example"]["min_k"])
    if retain_reference is not None:
        result.update(forget_quality_against(result, retain_reference))
    return result


def check_sets(eval_sets: Mapping[str, Sequence[Mapping]], kinds: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every set's role (from ``kinds``, else its name) and every record checked, before
    any forward pass; returns {name: role}."""
    kinds = {name: (kinds or {}).get(name) or kind_of(name) for name in eval_sets}
    for name, kind in kinds.items():
        if kind not in KINDS:
            raise ValueError(f"kind of set {name!r} must be one of {KINDS}, got {kind!r}")
        _plan(name, eval_sets[name], kind)  # raises on an empty set or inconsistent perturbed answers
    return kinds


def check_retain_reference(retain_result: Mapping, eval_sets: Mapping[str, Sequence[Mapping]],
                           kinds: Mapping[str, str]) -> None:
    """That forget quality can be computed against ``retain_result`` (an ``evaluate`` result
    of the retain-only model), before anything is evaluated: it needs ``sets.<name>.kind``
    "forget" and ``sets.<name>.per_example.truth_ratio_raw`` for the one forget set being
    evaluated (same name, same number of questions), which needs perturbed answers."""
    need = ("a JSON object with 'sets' holding exactly one forget set (sets.NAME.kind = \"forget\") whose "
            "per_example.truth_ratio_raw lists one ratio per question (an `eval` result on a forget set with "
            "perturbed_answer lists)")
    forget = [n for n, k in kinds.items() if k == "forget"]
    if len(forget) != 1:
        raise ValueError(f"forget quality needs exactly one forget set to evaluate, got {len(forget)}")
    name = forget[0]
    if any("perturbed_answer" not in r for r in eval_sets[name]):
        raise ValueError(f"forget quality needs 'perturbed_answer' lists in every record of forget set {name!r}")
    sets = retain_result.get("sets") if isinstance(retain_result, Mapping) else None
    if not isinstance(sets, Mapping):
        raise ValueError(f"the retain-model result has no 'sets': it must be {need}")
    ref = [n for n, s in sets.items() if isinstance(s, Mapping) and s.get("kind") == "forget"]
    if len(ref) != 1:
        raise ValueError(f"the retain-model result has {len(ref)} forget sets: it must be {need}")
    ratios = sets[ref[0]].get("per_example", {}).get("truth_ratio_raw")
    if not isinstance(ratios, list):
        raise ValueError(f"the retain-model result's forget set {ref[0]!r} lacks per_example.truth_ratio_raw: "
                         f"it must be {need}")
    if ref[0] != name or len(ratios) != len(eval_sets[name]):
        raise ValueError(f"forget sets differ: evaluating {name!r} ({len(eval_sets[name])} questions), the "
                         f"retain-model result has {ref[0]!r} ({len(ratios)})")


def forget_quality_against(result: Mapping, retain_result: Mapping) -> dict[str, float]:
    """Forget quality of an ``evaluate`` result against the retain-only model's result:
    the KS test on the truth ratios of their (single, same) forget set."""
    def forget_ratios(res, who):
        names = [n for n, s in res["sets"].items() if s["kind"] == "forget"]
        if len(names) != 1 or "truth_ratio_raw" not in res["sets"][names[0]]["per_example"]:
            raise ValueError(f"the {who} result needs exactly one forget set with perturbed answers")
        return names[0], res["sets"][names[0]]["per_example"]["truth_ratio_raw"]
    name, ratios = forget_ratios(result, "evaluated")
    ref_name, ref_ratios = forget_ratios(retain_result, "retain-model")
    if name != ref_name or len(ratios) != len(ref_ratios):
        raise ValueError(f"forget sets differ: {name!r} ({len(ratios)}) vs {ref_name!r} ({len(ref_ratios)})")
    return metrics.forget_quality(ratios, ref_ratios)
