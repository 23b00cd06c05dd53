"""A run's output directory: who may write into it, and the manifest that identifies the run.

A run directory holds what one ``train`` call writes (``RUN_ENTRIES``). A directory that
already holds anything is refused unless the run resumes (``resume``: continue from its
newest checkpoint) or replaces it (``overwrite``: the previous run's entries are deleted
first; files the trainer did not write are left alone). ``manifest.json`` records
everything needed to tell runs apart and to repeat one: the method and its options, the
loss head and backend, the data and model paths the caller passes, the training
configuration, the versions of torch, transformers and unlearn_ext, the git commit of the
checkout, and, once the run ends, its summary (steps, final losses, time, peak memory,
where the model is).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import torch

MANIFEST = "manifest.json"
# What a run writes: checkpoints, logs, the model, LoRA adapters, the best model, EUL's request, eval dynamics.
RUN_ENTRIES = ("checkpoints", "log.jsonl", MANIFEST, "model", "adapter", "best", "eul", "eval.jsonl", "eval.png",
               "train_config.json")  # the last: what runs before manifest.json wrote


def check_output_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Raise ``ValueError`` when ``out`` holds anything and neither ``resume`` nor ``overwrite``."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run in the output "
                         "directory, overwrite deletes it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise ValueError(f"output directory {out} is not empty: pass --resume to continue the run there, "
                         "--overwrite to replace it, or choose another directory")


def claim_output_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """:func:`check_output_dir`, then (with ``overwrite``) delete the previous run's entries."""
    out = Path(out)
    check_output_dir(out, resume=resume, overwrite=overwrite)
    if overwrite and out.is_dir():
        for entry in [*(out / name for name in RUN_ENTRIES), *out.glob(".tmp-*")]:
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def git_commit() -> str | None:
    """The commit of the unlearn_ext checkout (with ``+dirty`` if it has changes), or None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    import importlib.metadata

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "unlearn_ext": version("unlearn_ext") or version("unlearn-ext"),
            "accelerate": version("accelerate")}


def write_manifest(out: str | os.PathLike, manifest: dict) -> None:
    path = Path(out) / MANIFEST
    tmp = path.with_name(f".tmp-{MANIFEST}-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, default=str))
    os.replace(tmp, path)


def read_manifest(out: str | os.PathLike) -> dict:
    return json.loads((Path(out) / MANIFEST).read_text())


def peak_memory() -> dict[str, float]:
    """Peak memory of this process so far, in GiB: the accelerator's allocations where
    there is one, and the resident set (which includes them on the CPU)."""
    peak = {"cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if sys.platform == "darwin":
        peak["cpu_rss_gib"] /= 1024  # bytes there
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return {k: round(v, 3) for k, v in peak.items()}


def start_line(manifest: dict) -> str:
    run = manifest["run"]
    config = manifest["train_config"]
    where = f" -> {config['output_dir']}" if config.get("output_dir") else ""
    return (f"{run['desc']}: {run['total_steps']} steps, global batch {run['global_batch']}, lr {config['lr']:g} "
            f"({config['lr_schedule']}, warmup {run['warmup_steps']}), head {run['head']}"
            f"{' / ' + run['backend'] if run.get('backend') else ''}, {run['processes']} process(es) on "
            f"{run['device']}, {run['trainable_parameters']:,} trainable parameters{where}")


def summary_line(summary: dict) -> str:
    losses = ", ".join(f"{k} {v:.4g}" for k, v in summary["final"].items() if k not in ("step", "epoch", "lr",
                                                                                       "elapsed_s", "grad_norm"))
    memory = ", ".join(f"{k.removesuffix('_gib')} {v:.2f} GiB" for k, v in summary["peak_memory"].items())
    where = f"; model in {summary['model']}" if summary.get("model") else ""
    best = ""
    if summary.get("best"):
        best = f"; best evaluation: step {summary['best']['step']}" + (
            f", model in {summary['best']['model']}" if summary["best"]["model"] else
            " (the starting model: no later evaluation met the criterion)" if summary["best"]["step"] == 0 else "")
    return (f"done: {summary['steps']} steps in {summary['time_s']:.1f} s; final {losses}; peak memory {memory}"
            f"{where}{best}")
