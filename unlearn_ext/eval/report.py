"""Reports of evaluation results: JSON, a Markdown table, and the forget-quality vs
model-utility plot TOFU uses to compare methods (up and to the right is better)."""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from typing import Mapping, Sequence

SUMMARY_METRICS = ("prob", "rouge", "truth_ratio")
HEADLINE = ("forget_quality", "model_utility", "mia_auc")


def summary_row(method: str, result: Mapping, **labels) -> dict:
    """One table row from an ``evaluate`` result: ``method``, the ``labels`` given (e.g.
    ``split="forget10"``), the headline numbers and ``<set>.<metric>`` for every set."""
    row = {"method": method, **labels}
    row.update({key: result.get(key) for key in HEADLINE})
    for name, s in result["sets"].items():
        for metric in SUMMARY_METRICS:
            if metric in s:
                row[f"{name}.{metric}"] = s[metric]
    return row


def eval_table(result: Mapping) -> str:
    """An ``evaluate`` result as a Markdown table (one row per set) with its headline numbers."""
    rows = [{"set": name, "role": s["kind"], "n": s["n"], **{m: s.get(m) for m in SUMMARY_METRICS}}
            for name, s in result["sets"].items()]
    headline = ", ".join(f"{key} {_format(result.get(key))}" for key in HEADLINE)
    return markdown_table(rows, ["set", "role", "n", *SUMMARY_METRICS]) + headline


def machine() -> str:
    """A one-line description of where the numbers come from (reports and benchmarks)."""
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _format(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.2e}" if value != 0 and abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A GitHub-Markdown table; columns default to every key, in first-seen order."""
    if not rows:
        raise ValueError("no rows to tabulate")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _atomic_write(path: str | os.PathLike, write) -> None:
    """Write through a temporary file in the same directory and rename: a reader never
    sees half a report."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a report is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(obj, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def write_text(text: str, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def plot_tradeoff(rows: Sequence[Mapping], path: str | os.PathLike, *, group_by: str = "split",
                  title: str | None = None) -> None:
    """Scatter forget quality (log scale) against model utility, one panel per value of
    ``group_by`` (e.g. the forget split), one labelled point per row's method. The dashed
    line is p = 0.05, above which TOFU calls the data forgotten."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("forget_quality") is not None and r.get("model_utility") is not None]
    if not points:
        raise ValueError("no row has both forget_quality and model_utility")
    groups = list(dict.fromkeys(r.get(group_by) for r in points))
    methods = list(dict.fromkeys(r["method"] for r in points))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False, sharey=True)
    floor = 1e-30  # log axis: a p-value that underflowed to 0 is drawn at the floor
    for ax, group in zip(axes[0], groups):
        for r in (r for r in points if r.get(group_by) == group):
            y = max(float(r["forget_quality"]), floor)
            ax.scatter(r["model_utility"], y, color=colors[r["method"]], s=40, zorder=3)
            ax.annotate(r["method"], (r["model_utility"], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(0.05, color="grey", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("model utility")
        ax.set_title(str(group) if group is not None else "")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("forget quality (KS p-value)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_report(rows: Sequence[Mapping], out_dir: str | os.PathLike, *, name: str = "report",
                 details: Mapping | None = None, columns: Sequence[str] | None = None,
                 title: str | None = None) -> dict[str, str]:
    """``<name>.json`` (rows and, if given, the full ``details``), ``<name>.md`` (the table)
    and, when rows carry forget quality and model utility, ``<name>.png``. Returns the paths."""
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "markdown": os.path.join(out_dir, f"{name}.md")}
    write_json({"rows": list(rows), "details": details}, paths["json"])
    table = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns)
    write_text(table, paths["markdown"])
    if any(r.get("forget_quality") is not None and r.get("model_utility") is not None for r in rows):
        paths["plot"] = os.path.join(out_dir, f"{name}.png")
        plot_tradeoff(rows, paths["plot"], title=title)
    return paths
