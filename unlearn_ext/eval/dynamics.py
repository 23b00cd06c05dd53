"""Training dynamics: forget and utility metrics every N steps of a run (``--eval-every``),
and which evaluation is the best one (``--keep-best``).

Each evaluation is :func:`unlearn_ext.eval.evaluate` without generation (answer
probabilities and truth ratios: seconds, not minutes), before the first step (step 0) and
every ``every`` steps, and at the last step. One JSON line per evaluation goes to
``eval.jsonl``; ``eval.png`` draws each set's answer probability against the step.

The best evaluation (``CRITERION``): the lowest forget-set answer probability among the
evaluations whose retain answer probability (mean over the retain and options sets) is at
least ``0.9 ×`` its value at step 0. Step 0 always qualifies, so there is always a best
one; when it is step 0, no step improved on the starting model (and ``--keep-best`` saves
nothing: that model is the run's input).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from .evaluate import evaluate, kind_of
from .report import _atomic_write

CRITERION = ("lowest forget answer probability whose retain answer probability is >= 0.9 x its value at step 0")
RETAIN_FLOOR = 0.9


class EvalDuringTraining:
    """Evaluate a model on ``sets`` ({name: records}, roles from ``kinds`` or the names)
    every ``every`` steps of a run."""

    def __init__(self, sets: Mapping[str, Sequence[Mapping]], tokenizer, *, every: int,
                 kinds: Mapping[str, str] | None = None, batch_size: int = 16, backend: str | None = None):
        if every < 1:
            raise ValueError(f"eval_every must be >= 1, got {every}")
        self.kinds = {name: (kinds or {}).get(name) or kind_of(name) for name in sets}
        if "forget" not in self.kinds.values():
            raise ValueError("evaluation during training needs a forget set")
        self.sets, self.tokenizer, self.every = dict(sets), tokenizer, every
        self.batch_size, self.backend = batch_size, backend
        self.records: list[dict] = []

    def due(self, step: int, total: int) -> bool:
        return step == 0 or step % self.every == 0 or step == total

    def __call__(self, model, step: int) -> dict:
        """Evaluate ``model`` (left in the mode it was in) and return the record."""
        result = evaluate(model, self.tokenizer, self.sets, kinds=self.kinds, generate=False,
                          batch_size=self.batch_size, backend=self.backend)
        record = {"step": step}
        for name, s in result["sets"].items():
            for metric in ("prob", "truth_ratio"):
                if metric in s:
                    record[f"{name}.{metric}"] = s[metric]
        record["forget_prob"] = _mean(s["prob"] for s in result["sets"].values() if s["kind"] == "forget")
        record["retain_prob"] = _mean(s["prob"] for s in result["sets"].values() if s["kind"] in ("retain", "options"))
        self.records.append(record)
        return record

    def restore(self, records: Sequence[dict]) -> None:
        """The evaluations a resumed run already made."""
        self.records = list(records)

    def best(self) -> dict | None:
        """The best evaluation so far by ``CRITERION``."""
        if not self.records:
            return None
        floor = self.records[0]["retain_prob"]
        eligible = [r for r in self.records if floor is None or r["retain_prob"] >= RETAIN_FLOOR * floor]
        return min(eligible, key=lambda r: (r["forget_prob"], r["step"]))

    def plot(self, path: str | Path, title: str = "") -> None:
        """Each set's answer probability against the step."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in self.records]
        for name in self.sets:
            if self.kinds[name] == "holdout":
                continue
            ax.plot(steps, [r.get(f"{name}.prob", math.nan) for r in self.records], marker="o",
                    label=f"{name} ({self.kinds[name]})")
        best = self.best()
        if best is not None:
            ax.axvline(best["step"], color="grey", linestyle="--", linewidth=0.8, label=f"best (step {best['step']})")
        ax.set_xlabel("step")
        ax.set_ylabel("answer probability")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line a kill cut short
            pass
    return out
