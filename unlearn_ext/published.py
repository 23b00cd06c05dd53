"""Published TOFU figures (forget quality, model utility) that the benchmark's report sets
beside its own rows (shared/REFERENCES.md). Their models, data and budgets differ from
ours: what can be compared is the ordering of the methods, not the numbers."""
from __future__ import annotations

from typing import Mapping, Sequence

from .eval.report import markdown_table

# source -> method (our registry's names) -> split -> (forget quality, model utility or None)
PUBLISHED: dict[str, dict[str, dict[str, tuple[float, float | None]]]] = {
    "RKLD paper (Llama-2-7B-chat, its Table 8)": {
        "ga": {"forget01": (0.40, 0.51), "forget05": (0.039, 0.22), "forget10": (1.2e-4, 0.002)},
        "graddiff": {"forget01": (0.27, 0.51), "forget05": (1e-4, 0.10), "forget10": (0.0012, 0.47)},
        "npo": {"forget01": (0.90, 0.51), "forget05": (0.63, 0.34), "forget10": (0.10, 0.26)},
        "npo_rt": {"forget01": (0.73, 0.53), "forget05": (0.39, 0.49), "forget10": (0.40, 0.50)},
        "rkld": {"forget01": (0.97, 0.59), "forget05": (0.79, 0.56), "forget10": (0.52, None)},
    },
    # open-unlearning's `NPO` is NPO with a retain NLL: our npo_rt.
    "open-unlearning (Llama-3.2-1B-Instruct, untuned)": {
        "finetuned": {"forget01": (0.01, 0.60), "forget05": (1e-13, 0.60), "forget10": (2e-21, 0.60)},
        "retain": {"forget01": (1.0, 0.60), "forget05": (1.0, 0.60), "forget10": (1.0, 0.59)},
        "ga": {"forget01": (0.27, 0.33), "forget05": (2e-119, 0.0), "forget10": (1e-239, 0.0)},
        "graddiff": {"forget01": (0.77, 0.43), "forget05": (2e-119, 0.53), "forget10": (1e-239, 0.49)},
        "npo_rt": {"forget01": (0.92, 0.56), "forget05": (0.14, 0.45), "forget10": (0.02, 0.46)},
        "simnpo": {"forget01": (0.58, 0.46), "forget05": (5e-100, 0.58), "forget10": (2e-203, 0.54)},
    },
}


def _pair(fq, mu) -> str:
    return f"{fq:.2g} / {mu:.2f}" if mu is not None else (f"{fq:.2g} / –" if fq is not None else "–")


def _concordance(ours: Mapping[str, float], theirs: Mapping[str, float]) -> tuple[int, int]:
    """(pairs of methods ordered alike by forget quality, pairs compared); ties count as unlike."""
    names = sorted(set(ours) & set(theirs))
    alike = total = 0
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            total += 1
            alike += (ours[a] - ours[b]) * (theirs[a] - theirs[b]) > 0
    return alike, total


def side_by_side(rows: Sequence[Mapping], splits: Sequence[str]) -> list[str]:
    """Markdown lines: per split, each method's forget quality / model utility here and in
    each published source, then how many pairs of methods each source orders as we do."""
    sources = list(PUBLISHED)
    lines: list[str] = []
    for split in splits:
        ours = {r["method"]: r for r in rows if r.get("split") == split}
        if not ours:
            continue
        table = [{"method": name, "ours": _pair(row.get("forget_quality"), row.get("model_utility")),
                  **{s: _pair(*PUBLISHED[s][name][split]) if split in PUBLISHED[s].get(name, {}) else "–"
                     for s in sources}} for name, row in ours.items()]
        lines += [f"### {split}", "", markdown_table(table, ["method", "ours", *sources]).rstrip("\n")]
        unlearned = {n: r["forget_quality"] for n, r in ours.items()
                     if n not in ("retain", "finetuned") and r.get("forget_quality") is not None}
        for source in sources:
            theirs = {n: v[split][0] for n, v in PUBLISHED[source].items() if split in v and n in unlearned}
            alike, total = _concordance(unlearned, theirs)
            if total:
                lines.append(f"\nOrdering by forget quality, against {source}: {alike} of {total} pairs of "
                             f"methods ({', '.join(sorted(theirs))}) ordered alike.")
        lines.append("")
    return lines
