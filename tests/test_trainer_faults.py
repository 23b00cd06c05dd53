"""Trainer faults: SIGKILL at seeded random points (after a step, halfway through a log line,
inside a checkpoint save, while an old checkpoint is pruned), a NaN loss, a full disk.

Killed runs are this file run as a script (``_child``), one process per leg: it wraps the
functions ``unlearn_ext.checkpoint`` writes with (the safetensors save, ``os.fsync``,
``os.replace``, ``shutil.rmtree``) and the trainer's log writer, and SIGKILLs itself at
the n-th call of one of them during the save of step s: before the call, after it, or
halfway (half a file written, half a directory deleted, half a log line); or right after
step s. Each leg resumes the last one's run. After every kill, every checkpoint present
must load; the last leg runs clean and must end with the weights of an uninterrupted run,
bitwise (one thread, same ops in the same order on the CPU), and a log with each step once.
"""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tiny_lm import FORGET, RETAIN, collate, one_thread, tiny_llama  # noqa: F401

from reliability_tally import tally
from unlearn_ext import checkpoint, trainer
from unlearn_ext.methods import GradDiff, LogitsHead, Models
from unlearn_ext.trainer import NonFiniteLossError, TrainConfig, TrainData, lr_factor, make_optimizer, train

# Every step saves; from step 3 on, every save prunes the oldest checkpoint (keep 2).
CONFIG = dict(lr=3e-3, max_steps=8, batch_size=2, grad_accum=2, warmup_ratio=0.25, save_every=1, keep_checkpoints=True, checkpoint_limit=2,
              progress=False, seed=5)
TOTAL = CONFIG["max_steps"]
# (what is called, where the kill lands, how many such calls one save makes, first step where it happens)
FAULTS = [("step", "after", 1, 1),          # the step is logged, its checkpoint not yet written
          ("_log_line", "torn", 1, 1),      # half the step's log line written
          ("save_file", "before", 2, 1),    # trainable / optimizer tensors
          ("save_file", "torn", 2, 1),
          ("fsync", "before", 3, 1),
          ("replace", "before", 1, 1),      # the rename that publishes the checkpoint
          ("replace", "after", 1, 1),
          ("rmtree", "torn", 1, 3)]         # pruning the oldest checkpoint, half deleted
KILL_LEGS = 4


def _run(out, method=None, callbacks=(), **overrides):
    config = TrainConfig(output_dir=str(out), **{**CONFIG, **overrides})
    return train(method or GradDiff(head=LogitsHead()), Models(student=tiny_llama(seed=0)),
                 TrainData(FORGET, RETAIN, collate()), config, callbacks=callbacks)


# ---- the killed process ------------------------------------------------------------------------

def _child(out: str, save_step: str, kind: str, nth: str, when: str) -> None:
    """Train (resuming) in ``out``; die at the ``nth`` call of ``kind`` while step ``save_step`` saves."""
    import shutil
    save_step, nth, calls, saving = int(save_step), int(nth), Counter(), [None]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, torn=None):
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if name == "_log_line":
                counted = args[1]["step"] == save_step
            else:  # a save first removes the debris of killed saves: only a checkpoint's removal counts
                debris = name == "rmtree" and Path(args[0]).name.startswith(".tmp-step")
                counted = saving[0] == save_step and not debris
            calls[name] += counted
            hit = counted and kind == name and calls[name] == nth
            if hit and when == "before":
                die()
            if hit and when == "torn":
                torn(*args)
                die()
            result = real(*args, **kwargs)
            if hit:
                die()
            return result

        setattr(owner, name, wrapped)

    def half_a_file(tensors, path, *rest):
        real_save(tensors, path, *rest)
        os.truncate(path, os.path.getsize(path) // 2)

    def half_a_line(path, record):
        with open(path, "a") as f:
            f.write(json.dumps(record)[:20])

    def half_a_directory(path, *rest):
        files = sorted(Path(path).iterdir())
        for f in files[: len(files) // 2 + 1]:
            f.unlink()

    real_save = checkpoint.save_file
    wrap(checkpoint, "save_file", torn=half_a_file)
    wrap(os, "fsync")
    wrap(os, "replace")
    wrap(shutil, "rmtree", torn=half_a_directory)
    wrap(trainer, "_log_line", torn=half_a_line)
    real_checkpoint = checkpoint.save_checkpoint

    def save_checkpoint(root, step, *args, **kwargs):
        saving[0] = step
        try:
            return real_checkpoint(root, step, *args, **kwargs)
        finally:
            saving[0] = None

    checkpoint.save_checkpoint = save_checkpoint
    torch.set_num_threads(1)
    _run(out, resume=True, callbacks=[lambda step, record: kind == "step" and step == save_step and die()])


def _leg(out, save_step=0, kind="none", nth=0, when="none"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, __file__, str(out), str(save_step), kind, str(nth), when], env=env,
                          capture_output=True, text=True, timeout=300)


# ---- helpers ---------------------------------------------------------------------------------------

def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model/model.safetensors"))


def _assert_same(want: dict, got: dict):
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def _checkpoints(out) -> list[Path]:
    return checkpoint.list_checkpoints(Path(out) / "checkpoints")


def _newest_step(out) -> int:
    found = _checkpoints(out)
    return checkpoint.read_state(found[-1])["step"] if found else 0


def _assert_every_checkpoint_loads(out):
    """Load each checkpoint into a fresh student, optimizer and scheduler: none is half-written."""
    for path in _checkpoints(out):
        model = tiny_llama(seed=1)
        optimizer = make_optimizer(list(model.parameters()), TrainConfig(**CONFIG))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, TOTAL, 2))
        state = checkpoint.load_checkpoint(path, model, optimizer, scheduler)
        assert path.name == f"step_{state['step']}"
        assert all(torch.isfinite(p).all() for p in model.parameters()), path


def _logged_steps(out) -> list[int]:
    log = Path(out) / "log.jsonl"
    return [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same run without faults, keeping every checkpoint."""
    out = tmp_path_factory.mktemp("uninterrupted")
    torch.set_num_threads(1)
    _run(out, checkpoint_limit=0)
    return out


# ---- tests -----------------------------------------------------------------------------------------

def test_killed_anywhere_resumes_to_the_same_weights(uninterrupted, tmp_path, seed):
    """KILL_LEGS processes, each killed at a seeded random point of a save still ahead of
    it (a different kind of point each), then one clean leg finishes the run."""
    rng = random.Random(seed)
    faults = rng.sample(FAULTS, KILL_LEGS)
    for leg, (kind, when, calls_per_save, first_step) in enumerate(faults):
        start = _newest_step(tmp_path)
        # Leave room for the legs after this one, and a save for the clean leg (it removes debris).
        last_allowed = TOTAL - (KILL_LEGS - leg)
        step = max(first_step, min(start + rng.randint(1, 2), last_allowed))
        nth = rng.randint(1, calls_per_save)
        fault = f"leg {leg}: {kind} call {nth} of step {step}'s save, {when} (resuming from step {start})"
        done = _leg(tmp_path, step, kind, nth, when)
        assert done.returncode == -signal.SIGKILL, f"{fault} did not kill the run:\n{done.stderr[-3000:]}"
        tally("faults injected")
        _assert_every_checkpoint_loads(tmp_path)
        assert step - 1 <= _newest_step(tmp_path) <= step, fault
    (tmp_path / ".tmp-model-1").mkdir()  # what a run killed while writing its final model leaves
    done = _leg(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob(".tmp-*")), "debris of a killed final save is left"
    _assert_same(_weights(uninterrupted), _weights(tmp_path))
    assert _logged_steps(tmp_path) == list(range(1, TOTAL + 1))  # each step once, killed runs' extra lines dropped
    assert [p.name for p in _checkpoints(tmp_path)] == [f"step_{TOTAL - 1}", f"step_{TOTAL}"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_{TOTAL - 1}", f"step_{TOTAL}"]


@pytest.mark.parametrize("poisoned, log_every, save_every", [("loss", 1, 1), ("loss", 4, 2), ("gradient norm", 1, 1)])
def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path, poisoned, log_every,
                                                                save_every):
    """The loss (or only the gradient) becomes NaN at step 3; with log_every 4 the loop
    first looks at step 4 (its first log or save after the NaN), and still names step 3.
    Nothing is saved after the NaN."""
    method, calls = GradDiff(head=LogitsHead()), Counter()
    real_loss = method.loss

    def loss(batch):
        calls["micro"] += 1
        value, logs = real_loss(batch)
        if (calls["micro"] - 1) // CONFIG["grad_accum"] + 1 != 3:
            return value, logs
        if poisoned == "loss":
            return value * float("nan"), logs
        zero = 0 * next(method.models.student.parameters()).sum()
        return value + 0 * zero.sqrt(), logs  # adds 0, but its gradient is 0 * inf = NaN

    method.loss = loss
    with pytest.raises(NonFiniteLossError, match=rf"the {poisoned} is not finite \(NaN or inf\) at step 3"):
        _run(tmp_path, method, log_every=log_every, save_every=save_every)
    tally("faults injected")
    assert [p.name for p in _checkpoints(tmp_path)] == (["step_1", "step_2"] if save_every == 1 else ["step_2"])
    _assert_every_checkpoint_loads(tmp_path)
    for name in ("trainable", "optimizer"):
        file = f"checkpoints/step_2/{name}.safetensors"
        _assert_same(load_file(str(uninterrupted / file)), load_file(str(tmp_path / file)))
    assert not (tmp_path / "model").exists()
    assert all(step < 3 for step in _logged_steps(tmp_path))


def _disk_full_at(monkeypatch, write: str, step: int):
    """The write of ``step``'s checkpoint that ``write`` names fails as a full disk fails it."""
    if write == "optimizer tensors":  # safetensors reports I/O errors as SafetensorError
        real, calls = checkpoint.save_file, Counter()

        def save_file(tensors, path, *rest):
            calls["n"] += 1
            if calls["n"] == 2 * step:  # two files per checkpoint, the optimizer's second
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, path, *rest)

        monkeypatch.setattr(checkpoint, "save_file", save_file)
    else:
        real_write = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == "state.json" and self.parent.name.startswith(f".tmp-step_{step}-"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real_write(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("write", ["optimizer tensors", "state.json"])
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(uninterrupted, tmp_path, monkeypatch, write):
    """Step 3's checkpoint hits ENOSPC: an OSError naming it, step 2 intact, its temporary
    directory removed; once there is room, resuming ends with the uninterrupted weights."""
    _disk_full_at(monkeypatch, write, step=3)
    with pytest.raises(OSError, match=r"could not write checkpoint \S*step_3 .*No space left on device") as error:
        _run(tmp_path)
    tally("faults injected")
    assert error.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1", "step_2"]  # no .tmp-*
    _assert_every_checkpoint_loads(tmp_path)
    monkeypatch.undo()
    _run(tmp_path, resume=True)
    _assert_same(_weights(uninterrupted), _weights(tmp_path))


if __name__ == "__main__":
    _child(*sys.argv[1:])
