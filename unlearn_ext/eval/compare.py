"""``unlearn-ext compare BEFORE.json AFTER.json …``: what changed between ``evaluate`` results.

The first result is the baseline (usually the model before unlearning); each other one is
compared with it: per set, the change of each summary metric (probability, ROUGE-L, truth
ratio) and of the headline numbers; per question, the change of the answer probability
(and the greedy answers side by side where both have them). Sets and questions are matched
by name and by question text; a set missing from one result is an error, not a silent gap.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

from .report import HEADLINE, SUMMARY_METRICS, _atomic_write, _format


def compare(results: Mapping[str, Mapping]) -> dict:
    """``results``: {label: evaluate result}, the first the baseline. Returns
    {"baseline", "others": [...], "headline": {label: {key: (base, value)}},
    "sets": {set: {label: {metric: (base, value)}}}, "questions": {set: [{question,
    base_prob, probs: {label: p}, base_answer, answers: {label: text}}]}}."""
    labels = list(results)
    base_label, others = labels[0], labels[1:]
    base = results[base_label]
    for label, r in results.items():
        if not isinstance(r, Mapping) or not isinstance(r.get("sets"), Mapping):
            raise ValueError(f"{label} is not an `eval` result (no 'sets')")
    out = {"baseline": base_label, "others": others, "headline": {}, "sets": {}, "questions": {}}
    for label in others:
        out["headline"][label] = {k: (base.get(k), results[label].get(k)) for k in HEADLINE}
    for name, b in base["sets"].items():
        missing = [label for label in others if name not in results[label]["sets"]]
        if missing:
            raise ValueError(f"set {name!r} of {base_label} is missing from {', '.join(missing)}")
        out["sets"][name] = {label: {m: (b.get(m), results[label]["sets"][name].get(m)) for m in SUMMARY_METRICS
                                     if m in b} for label in others}
        out["sets"][name]["_role"] = b["kind"]
        out["questions"][name] = _questions(name, b, {label: results[label]["sets"][name] for label in others})
    return out


def _questions(name: str, base: Mapping, others: Mapping[str, Mapping]) -> list[dict]:
    per = base.get("per_example", {})
    questions = per.get("question", [])
    rows = []
    index = {label: {q: i for i, q in enumerate(s.get("per_example", {}).get("question", []))}
             for label, s in others.items()}
    for i, q in enumerate(questions):
        row = {"question": q, "base_prob": _at(per, "prob", i), "base_answer": _at(per, "generation", i),
               "probs": {}, "answers": {}}
        for label, s in others.items():
            if q not in index[label]:
                raise ValueError(f"set {name!r}: question {q!r} is missing from {label}")
            j = index[label][q]
            row["probs"][label] = _at(s["per_example"], "prob", j)
            row["answers"][label] = _at(s["per_example"], "generation", j)
        rows.append(row)
    return rows


def _at(per: Mapping, key: str, i: int):
    values = per.get(key)
    return values[i] if values is not None and i < len(values) else None


def _delta(pair) -> str:
    before, after = pair
    if before is None or after is None:
        return f"{_format(before)} → {_format(after)}"
    return f"{_format(before)} → {_format(after)} ({after - before:+.3g})"


def compare_text(changes: Mapping, *, questions: bool = True) -> str:
    """The comparison as Markdown: headline numbers, a table per compared result, and
    (``questions``) the per-question answer probabilities."""
    base = changes["baseline"]
    lines = [f"# Compared with {base}", ""]
    for label in changes["others"]:
        lines += [f"## {label}", "", "  ".join(f"{k}: {_delta(v)}" for k, v in changes["headline"][label].items()), "",
                  "| set | role | " + " | ".join(SUMMARY_METRICS) + " |", "|---|---|" + "---|" * len(SUMMARY_METRICS)]
        for name, per_label in changes["sets"].items():
            cells = [_delta(per_label[label][m]) if m in per_label[label] else "–" for m in SUMMARY_METRICS]
            lines.append(f"| {name} | {per_label['_role']} | " + " | ".join(cells) + " |")
        lines.append("")
    if questions:
        for name, rows in changes["questions"].items():
            if not rows or all(r["base_prob"] is None for r in rows):
                continue
            lines += [f"## {name}: answer probability per question", "",
                      "| question | " + base + " | " + " | ".join(changes["others"]) + " |",
                      "|---|---|" + "---|" * len(changes["others"])]
            for r in rows:
                cells = [_format(r["base_prob"])] + [_delta((r["base_prob"], r["probs"][label]))
                                                     for label in changes["others"]]
                question = r["question"].replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {question} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_compare(changes: Mapping, path: str | os.PathLike) -> None:
    """One panel per set: each question's answer probability in the baseline (x) against
    each compared result (y), log scales; points under the diagonal went down."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n, rows in changes["questions"].items() if rows and any(r["base_prob"] is not None for r in rows)]
    if not names:
        raise ValueError("no set has per-question probabilities to plot")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    floor = 1e-12
    for ax, name in zip(axes[0], names):
        rows = [r for r in changes["questions"][name] if r["base_prob"] is not None]
        for k, label in enumerate(changes["others"]):
            xs = [max(r["base_prob"], floor) for r in rows]
            ys = [max(r["probs"][label], floor) if r["probs"][label] is not None else math.nan for r in rows]
            ax.scatter(xs, ys, s=18, color=plt.cm.tab10(k % 10), label=os.path.basename(label))
        low = min([max(r["base_prob"], floor) for r in rows] + [1e-3])
        ax.plot([low, 1], [low, 1], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"probability in {os.path.basename(changes['baseline'])}")
        ax.set_title(f"{name} ({changes['sets'][name]['_role']})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("probability after")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
