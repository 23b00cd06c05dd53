"""Training checkpoints: written atomically, read without unpickling anything.

A checkpoint is a directory ``<output>/checkpoints/step_<N>/`` holding

- ``trainable.safetensors``: the trained parameters (frozen ones are not saved: they are
  the starting model's, which resuming loads again),
- ``optimizer.safetensors``: the optimizer's per-parameter tensors, keyed
  ``<parameter name>/<state name>`` (e.g. ``model.norm.weight/exp_avg``),
- ``state.json``: the step, the optimizer's hyperparameters, the scheduler's state, the
  global batch and the names of tied parameters.

It is written to a temporary directory beside its final place and renamed in one
``os.replace``: a run killed while saving leaves a ``.tmp-*`` directory that is ignored
(and removed by the next save), never a half-written checkpoint. Old checkpoints are
renamed to ``.tmp-*`` before they are deleted, so a kill while pruning leaves no
half-deleted one either. A run that completes removes them all (:func:`remove_all`)
unless it is asked to keep them: they exist to resume. A save that fails (a full disk) removes its temporary directory
and raises ``OSError`` naming the checkpoint; the previous checkpoints are untouched.

Parameters are addressed by their names through ``torch.distributed.checkpoint.state_dict``,
which gathers full tensors under DDP and FSDP alike, so a checkpoint does not depend on
how the run was distributed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .file_modes import follow_umask

_STEP_DIR = re.compile(r"^step_(\d+)$")
# Full (unsharded) tensors on the CPU; only what trains.
_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _untie(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing memory (tied embeddings): keep the first name,
    record the others as aliases."""
    kept, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t.contiguous()
    return kept, aliases


def _optimizer_tensors(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, scalars


def _optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict, param_groups: list) -> dict:
    state: dict[str, dict] = {}
    for flat, value in [*tensors.items(), *scalars.items()]:
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": param_groups}


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer, scheduler, *, is_main: bool,
                    barrier, extra: dict | None = None, keep: int = 2) -> Path:
    """Write ``root/step_<step>`` atomically; every rank calls it (gathering is collective),
    the main process writes. Keeps the ``keep`` newest checkpoints (0 = all)."""
    weights = get_model_state_dict(model, options=_OPTIONS)
    osd = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
    root = Path(root)
    final = root / f"step_{step}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for debris in root.glob(".tmp-*"):  # left by a killed save (one run writes a root at a time)
            shutil.rmtree(debris, ignore_errors=True)
        tmp = root / f".tmp-step_{step}-{os.getpid()}"
        try:
            tmp.mkdir()
            _write(tmp, step, weights, osd, scheduler, extra)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(e, f"could not write checkpoint {final} ({e}); "
                                  f"the previous checkpoints in {root} are intact") from e
        follow_umask(tmp)  # safetensors writes 0600
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            _remove(old)
    barrier()
    return final


def _write(directory: Path, step: int, weights: dict, osd: dict, scheduler, extra: dict | None) -> None:
    kept, aliases = _untie(weights)
    save_file(kept, str(directory / "trainable.safetensors"))
    tensors, scalars = _optimizer_tensors(osd)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in osd["param_groups"]]
    state = {"step": step, "aliases": aliases, "optimizer_scalars": {k: _jsonable(v) for k, v in scalars.items()},
             "param_groups": groups, "scheduler": scheduler.state_dict(), **(extra or {})}
    (directory / "state.json").write_text(json.dumps(state, indent=1))
    for f in directory.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _write_error(error: Exception, message: str) -> OSError:
    """An ``OSError`` with the failed write's errno: safetensors reports its I/O errors as
    ``SafetensorError("... No space left on device (os error 28)")``."""
    code = getattr(error, "errno", None)
    if code is None and (found := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(found.group(1))
    return OSError(code, message) if code is not None else OSError(message)


def _remove(checkpoint_dir: Path) -> None:
    """Delete a checkpoint without ever leaving it half-deleted under its own name."""
    doomed = checkpoint_dir.with_name(f".tmp-removed-{checkpoint_dir.name}-{os.getpid()}")
    os.replace(checkpoint_dir, doomed)
    shutil.rmtree(doomed)


def remove_all(root: str | os.PathLike) -> None:
    """Delete every checkpoint under ``root`` (newest last, so that a kill midway leaves
    the newest, still resumable) and ``root`` itself once empty."""
    root = Path(root)
    for path in list_checkpoints(root):
        _remove(path)
    for debris in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(debris, ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def read_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler) -> dict:
    """Restore trained parameters, optimizer and scheduler from ``path`` (every rank reads
    the files); returns the checkpoint's ``state.json``."""
    path = Path(path)
    state = read_state(path)
    weights = load_file(str(path / "trainable.safetensors"))
    for alias, name in state["aliases"].items():
        weights[alias] = weights[name]
    # Names from the local (sharded, not gathered) state dict: the same on every rank.
    expected = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"checkpoint {path} does not match the model's trainable parameters "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    load = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=load)
    optimizer.zero_grad(set_to_none=True)  # the loader initialises the optimizer state with a zero step
    osd = _optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer_scalars"],
                           [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state["param_groups"]])
    set_optimizer_state_dict(model, optimizer, osd, options=load)
    scheduler.load_state_dict(state["scheduler"])
    return state
