"""The training loop: one method, one student, AdamW, and nothing hidden.

    method = get_method("npo")()
    student = train(method, Models(student=model), TrainData(forget, retain, collator), TrainConfig(...))

Per optimizer step: ``grad_accum`` micro-batches, each ``batch_size`` examples per process;
the loss of each is divided by ``grad_accum`` and back-propagated (gradient sync only on
the last); gradients are clipped, AdamW steps, the learning rate follows a linear warmup
then a linear decay to 0.

Every random draw is a pure function of (seed, what, step, …), never of a generator's
history: the forget examples are walked in per-epoch permutations, micro-batch ``m`` of
process ``r`` at step ``s`` takes slot ``(s·grad_accum + m)·world + r`` of that stream, and
the retain examples of a slot are drawn from a generator seeded by the slot (so each
process draws its own). Resuming needs no sampler or RNG state, and one process with
``grad_accum = k`` walks exactly the batches of ``k`` processes with ``grad_accum = 1``.

Frozen models (NPO's reference, the teachers of UnDIAL, RKLD and the KL retain term) run
once before the loop instead of every step (``cache_frozen``, :mod:`unlearn_ext.methods.cache`):
each batch part carries its ``example_id`` (forget example i is i, retain example j is
n_forget + j) for the cache to find them; the run's summary (manifest.json) says what it saved.

Distribution: run the same script under ``accelerate launch`` or ``torchrun``. What is
wrapped is :class:`unlearn_ext.distributed.LossForward`, the student with ``method.loss``
as its forward, so the fused-linear loss runs inside the wrapped forward: DDP through
``accelerate``, FSDP2 (``fsdp``) applied here. Frozen models (reference, RKLD's augmented
model) are only placed on the device, one full copy per process, never wrapped (DDP would
try to sync them); under FSDP ``shard_frozen`` shards their decoder layers. With
``lora_r`` the student gets PEFT LoRA adapters (:mod:`unlearn_ext.lora`) and the
reference is the student with adapters disabled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm.auto import tqdm

from . import adapters, checkpoint, lora
from .distributed import LossForward, fsdp_requested, root_gathered, shard_for_training, shard_frozen, unshard_root
from .eval import dynamics
from .file_modes import follow_umask
from .methods.base import Method, Models, PrepareData
from .methods.cache import describe as describe_cache
from .methods.cache import start_frozen_cache
from .run_dir import (claim_output_dir, git_commit, peak_memory, read_manifest, start_line, summary_line, versions,
                      write_manifest)
from .train_layers import decoder_blocks, select_train_layers


@dataclass
class TrainConfig:
    """Training hyperparameters (the command line exposes each one)."""
    output_dir: str | None = None      # checkpoints/, log.jsonl, manifest.json and model/ go here; None: keep nothing
    lr: float = 1e-5
    weight_decay: float = 0.01         # on matrices only (not on biases and norms)
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: float = 5.0                # passes over the forget (or training) examples
    max_steps: int | None = None       # overrides epochs
    batch_size: int = 4                # examples per process per micro-batch
    retain_batch_size: int | None = None  # retain examples per micro-batch; None: batch_size
    grad_accum: int = 1
    lr_schedule: str = "linear"        # after the warmup: constant, linear decay to 0, or cosine decay to 0
    warmup_ratio: float = 0.0          # fraction of the steps with a linear warmup
    warmup_steps: int | None = None    # warmup length in steps; overrides warmup_ratio
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    bf16: bool | None = None           # None: where the device supports it (CUDA with bf16); CPU: off
    train_layers: str | None = None    # "top:N", "bottom:N", "A-B" or "all" (unlearn_ext.train_layers)
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass (less memory)
    seed: int = 0
    log_every: int = 1
    save_every: int = 0                # steps between checkpoints (to resume a killed run); 0: none
    checkpoint_limit: int = 2          # how many recent checkpoints a running run keeps; 0: all
    keep_checkpoints: bool = False     # keep the checkpoints (and save one at the end) once the run completes
    save_dtype: str | None = None      # dtype of the saved model; None: the dtype it trained in
    resume: bool = False               # continue from the newest checkpoint in output_dir
    overwrite: bool = False            # replace the run in output_dir
    eval_every: int = 0                # steps between evaluations during training (needs an evaluator); 0: none
    keep_best: bool = False            # save the best evaluation's model in best/ (unlearn_ext.eval.dynamics)
    progress: bool = True
    verbose: bool = False              # print a start line and a closing summary (the command line does)
    desc: str = "train"                # progress bar label
    cache_frozen: str = "auto"         # frozen models' outputs computed once: auto | memory | disk | off
    cache_memory_mb: float = 1024.0    # auto: the cache stays in device memory up to this size, else on disk
    # At scale (README "Distributed, LoRA"): FSDP2 and LoRA.
    fsdp: bool | None = None           # shard the student with FSDP2; None: when ACCELERATE_USE_FSDP is set
    shard_frozen: bool = False         # under FSDP, shard frozen models' decoder layers too
    lora_r: int = 0                    # LoRA rank; 0: train the whole model
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # None: the attention and MLP projections (lora.DEFAULT_TARGETS)
    merge_lora: bool = False           # also write the merged model to model/ (adapters go to adapter/)


@dataclass
class TrainData:
    """``examples`` are walked in epochs (the forget set, or the fine-tuning set);
    ``retain`` examples are sampled per micro-batch when the method wants them."""
    examples: Sequence[dict]
    retain: Sequence[dict] | None = None
    collate: Callable[[Sequence[dict]], dict] | None = None


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of labels: independent streams without shared state."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


class BatchPlan:
    """Which examples micro-batch ``micro`` of process ``rank`` gets at step ``step``."""

    def __init__(self, num_examples: int, num_retain: int, config: TrainConfig, world: int):
        if num_examples == 0:
            raise ValueError("no training examples")
        self.n, self.n_retain, self.world, self.c = num_examples, num_retain, world, config
        self.retain_batch = config.retain_batch_size or config.batch_size
        if self.retain_batch < 1:
            raise ValueError(f"retain_batch_size must be >= 1, got {self.retain_batch}")
        self.global_batch = config.batch_size * config.grad_accum * world
        self._perms: dict[str, tuple[int, torch.Tensor]] = {}

    def total_steps(self) -> int:
        if self.c.max_steps:
            return self.c.max_steps
        return max(1, math.ceil(self.c.epochs * self.n / self.global_batch))

    def _slot(self, step: int, micro: int, rank: int) -> int:
        return (step * self.c.grad_accum + micro) * self.world + rank

    def _permuted(self, stream: str, size: int, position: int) -> int:
        """Element ``position`` of the stream that walks ``range(size)`` in a fresh
        permutation per epoch (seeded by the epoch: no generator history)."""
        epoch, i = divmod(position, size)
        if self._perms.get(stream, (None,))[0] != epoch:
            self._perms[stream] = (epoch, torch.randperm(size, generator=_generator(self.c.seed, stream, epoch)))
        return int(self._perms[stream][1][i])

    def examples(self, step: int, micro: int, rank: int) -> list[int]:
        start = self._slot(step, micro, rank) * self.c.batch_size
        return [self._permuted("order", self.n, p) for p in range(start, start + self.c.batch_size)]

    def retain(self, step: int, micro: int, rank: int) -> list[int]:
        """Retain examples of a slot: the retain set walked like the forget set, in its own
        per-epoch permutations, ``retain_batch`` per slot (without replacement within an
        epoch of the retain set)."""
        start = self._slot(step, micro, rank) * self.retain_batch
        return [self._permuted("retain-order", self.n_retain, p) for p in range(start, start + self.retain_batch)]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.n


SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total: int, warmup: int, schedule: str = "linear") -> float:
    """Linear warmup over ``warmup`` steps, then ``schedule``: constant, linear decay to 0
    at ``total``, or cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def warmup_steps(config: TrainConfig, total: int) -> int:
    if config.warmup_steps is not None:
        if not 0 <= config.warmup_steps <= total:
            raise ValueError(f"warmup_steps must be in [0, {total}] (the run's steps), got {config.warmup_steps}")
        return config.warmup_steps
    return int(config.warmup_ratio * total)


def make_optimizer(params: Sequence[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases, norms and scalars are not decayed)."""
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas))


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    bf16 = bf16_supported() if config.bf16 is None else config.bf16
    # Without an accelerator, accelerate only goes multi-process (gloo) when told it is on the CPU.
    return Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.accelerator.is_available())


def _to_device(part: dict, device) -> dict:
    """The part on ``device``; its ``example_id`` stays on the host, where the frozen cache
    reads it (no device synchronisation per lookup)."""
    return {k: v if k == "example_id" else v.to(device) for k, v in part.items()}


def _part(data: TrainData, ids: list[int]) -> dict:
    """The collated examples ``ids`` with their ``example_id`` (the frozen cache's key):
    forget example i is i, retain example j is len(examples) + j; ``ids`` of one set."""
    n = len(data.examples)
    retain = bool(ids) and ids[0] >= n
    part = data.collate([data.retain[i - n] if retain else data.examples[i] for i in ids])
    part["example_id"] = torch.tensor(ids, dtype=torch.long)
    return part


def _log_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint a run starts from (a killed run may
    have logged steps it never saved, and its last line may be cut short)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if _logged_step(line) <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line a kill cut short
        return math.inf


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient norm) became NaN or infinite: the run stops before it
    saves anything, so the newest checkpoint is the last good state."""


class _FiniteWatch:
    """Remembers, on the device, the first step whose loss or gradient norm is not finite;
    ``check`` reads it only where the loop synchronises anyway (logging, saving), so
    watching adds no host synchronisation per step on a GPU."""
    WHAT = ("loss", "gradient norm")

    def __init__(self, device, never: int):
        self.never = never
        self.first = torch.full((len(self.WHAT),), never, dtype=torch.int64, device=device)

    def update(self, step: int, loss: torch.Tensor, grad_norm) -> None:
        if hasattr(grad_norm, "to_local"):  # FSDP2: this process's part of the norm, no collective
            grad_norm = grad_norm.to_local()
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float32, device=loss.device)
        bad = ~torch.isfinite(torch.stack([loss.detach().float().reshape(()), norm.reshape(())]))
        self.first = torch.minimum(self.first, torch.where(bad, step, self.never))

    def check(self, acc) -> None:
        first = acc.gather(self.first.unsqueeze(0)).amin(0).tolist()  # a NaN on any process stops them all
        bad = [(step, what) for step, what in zip(first, self.WHAT) if step < self.never]
        if bad:
            step, what = min(bad, key=lambda b: b[0])  # the loss first when both
            raise NonFiniteLossError(f"the {what} is not finite (NaN or inf) at step {step}: stopping without "
                                     "saving; the newest checkpoint is the last good state (lower the learning "
                                     "rate, check the data, or use float32)")


def train(method: Method, models: Models, data: TrainData, config: TrainConfig,
          *, callbacks: Sequence[Callable[[int, dict], None]] = (), evaluator=None,
          manifest: dict | None = None) -> torch.nn.Module:
    """Run ``method`` on ``models.student`` and return the trained (unwrapped) student.

    With ``config.output_dir``: ``manifest.json`` (the run's identity and, at the end, its
    summary; ``manifest`` adds the caller's entries, e.g. data paths), one JSON line per
    logged step in ``log.jsonl``, checkpoints under ``checkpoints/`` while the run goes
    (pruned when it completes unless ``keep_checkpoints``), and the final model in
    ``model/`` (Hugging Face format for Hugging Face models). ``callbacks(step, record)``
    run after every logged step. ``evaluator`` (an
    :class:`unlearn_ext.eval.dynamics.EvalDuringTraining`) evaluates every
    ``config.eval_every`` steps into ``eval.jsonl``/``eval.png``; with ``keep_best`` the
    best evaluation's model is saved in ``best/``.
    """
    acc = make_accelerator(config)
    out = Path(config.output_dir) if config.output_dir else None
    ckpt_root = out / "checkpoints" if out else None
    if out is not None and acc.is_main_process:
        claim_output_dir(out, resume=config.resume, overwrite=config.overwrite)
    acc.wait_for_everyone()
    resume_from = None
    if config.resume and ckpt_root is not None and checkpoint.list_checkpoints(ckpt_root):
        resume_from = checkpoint.list_checkpoints(ckpt_root)[-1]
    elif config.resume and out is not None and _completed(out):
        raise ValueError(f"the run in {out} completed (its checkpoints were deleted): there is nothing to resume; "
                         "pass --overwrite to run it again, or choose another output directory")
    if (config.eval_every > 0) != (evaluator is not None):
        raise ValueError("eval_every and an evaluator go together (the command line builds it from the forget "
                         "and retain sets)")
    if config.keep_best and evaluator is None:
        raise ValueError("keep_best needs evaluation during training (eval_every > 0)")

    fsdp = fsdp_requested(config.fsdp) and acc.num_processes > 1
    _setup_lora(method, models, config)
    # One-off preparation, identical on every rank (same seed).
    if method.needs_reference() and models.reference is None:
        raise ValueError(f"method {method.name!r} needs a frozen reference model (Models.reference)")
    if method.needs_retain() and not data.retain:
        raise ValueError(f"method {method.name!r} needs retain examples")
    for model in (models.student, models.reference, *models.extra.values()):
        if model is not None and not _is_sharded(model):
            model.to(acc.device)
    if not config.lora_r:  # with LoRA, train_layers placed the adapters (only they train)
        select_train_layers(models.student, config.train_layers)
    torch.manual_seed(derive_seed(config.seed, "prepare"))
    method.prepare(models, PrepareData(forget=data.examples, retain=data.retain, collate=data.collate,
                                       train_config=config, seed=config.seed))
    params = method.trainable_parameters()
    if not params:
        raise ValueError(f"method {method.name!r} left no trainable parameter"
                         + (f" (train_layers {config.train_layers!r})" if config.train_layers else ""))
    _check_train_layers(method, models.student, config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(models.student)

    wrapped, optimizer, params = _wrap(method, models, params, config, acc, fsdp)
    raw_optimizer = getattr(optimizer, "optimizer", optimizer)
    student = models.student  # the bare model (sharded in place under FSDP): checkpoints name its parameters

    plan = BatchPlan(len(data.examples), len(data.retain or ()), config, acc.num_processes)
    total = plan.total_steps()
    warmup = warmup_steps(config, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_optimizer,
                                                  lambda s: lr_factor(s, total, warmup, config.lr_schedule))

    start = 0
    log_path = out / "log.jsonl" if out else None
    eval_path = out / "eval.jsonl" if out else None
    run_facts = {"global_batch": plan.global_batch, "total_steps": total, "method": method.name}
    if resume_from is not None:
        state = checkpoint.read_state(resume_from)
        for key, value in run_facts.items():
            if state.get(key) != value:
                raise ValueError(f"cannot resume from {resume_from}: its {key} is {state.get(key)!r}, "
                                 f"this run's is {value!r}")
        checkpoint.load_checkpoint(resume_from, student, raw_optimizer, scheduler)
        start = state["step"]
    manifest = run_manifest(method, config, run_facts, acc, warmup, params, manifest)
    if out is not None and acc.is_main_process:
        _truncate_log(log_path, start)  # also when a killed run saved no checkpoint at all
        if evaluator is not None:
            _truncate_log(eval_path, start)
        write_manifest(out, manifest)
    acc.wait_for_everyone()
    if evaluator is not None and out is not None:  # every rank: they must agree on the best evaluation
        evaluator.restore(dynamics.read_records(eval_path))
    if config.verbose and acc.is_main_process:
        print(start_line(manifest) + (f" (resumed at step {start})" if start else ""), flush=True)

    with root_gathered(wrapped):  # the cache's probe runs method.loss outside the wrapper, on every rank
        cache = start_frozen_cache(method, models, lambda ids: _part(data, ids), lambda p: _to_device(p, acc.device),
                                   config, plan, acc.device, start, acc.process_index)
    try:
        student.train()
        optimizer.zero_grad(set_to_none=True)  # gradients left on the model by earlier use must not join step 1
        watch = _FiniteWatch(acc.device, never=total + 1)
        bar = tqdm(total=total, initial=start, desc=config.desc, disable=not (config.progress and acc.is_main_process))
        started = time.time()
        record: dict = {}
        if evaluator is not None and start == 0:
            _evaluate_now(evaluator, student, wrapped, 0, total, out, acc, config)
        for step in range(start, total):
            torch.manual_seed(derive_seed(config.seed, "step", step, acc.process_index))  # dropout and the like
            summed: dict[str, torch.Tensor] = {}
            for micro in range(config.grad_accum):
                batch = {method.primary: _to_device(_part(data, plan.examples(step, micro, acc.process_index)),
                                                    acc.device)}
                if method.needs_retain():
                    batch["retain"] = _to_device(_part(data, [plan.n + j for j in plan.retain(
                        step, micro, acc.process_index)]), acc.device)
                last = micro == config.grad_accum - 1
                with contextlib.nullcontext() if last else acc.no_sync(wrapped), acc.autocast():
                    loss, logs = wrapped(batch)
                    acc.backward(loss / config.grad_accum)
                for k, v in {"loss": loss.detach(), **logs}.items():
                    summed[k] = summed.get(k, 0.0) + v.float() / config.grad_accum
            grad_norm = None
            if config.max_grad_norm:
                grad_norm = acc.clip_grad_norm_(params, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            watch.update(step + 1, summed["loss"], grad_norm)
            save = ckpt_root is not None and ((config.save_every and (step + 1) % config.save_every == 0)
                                              or (config.keep_checkpoints and step + 1 == total))
            log = (step + 1) % config.log_every == 0 or step + 1 == total
            if log or save:
                watch.check(acc)
                if cache is not None:  # the cache's token check, read where the loop synchronises anyway
                    cache.check()

            if log:
                names = sorted(summed)
                values = acc.reduce(torch.stack([summed[k] for k in names]), reduction="mean").tolist()
                record = {"step": step + 1, "epoch": round(plan.epoch(step + 1), 4), "lr": lr,
                          **dict(zip(names, values)), "elapsed_s": round(time.time() - started, 3)}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if acc.is_main_process:
                    if log_path is not None:
                        _log_line(log_path, record)
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                for callback in callbacks:
                    callback(step + 1, record)
            bar.update(1)
            if evaluator is not None and evaluator.due(step + 1, total):
                _evaluate_now(evaluator, student, wrapped, step + 1, total, out, acc, config)
            if save:
                checkpoint.save_checkpoint(ckpt_root, step + 1, student, raw_optimizer, scheduler,
                                           is_main=acc.is_main_process, barrier=acc.wait_for_everyone,
                                           extra=run_facts, keep=config.checkpoint_limit)
        bar.close()
    except BaseException:
        if cache is not None:  # a crash (or a kill signal Python sees) must not leave frozen bodies off the device
            cache.finish(method, check=False)
        raise
    cache_summary = cache.finish(method) if cache is not None else None
    if cache_summary is not None and (config.progress or config.verbose) and acc.is_main_process:
        tqdm.write(describe_cache(cache_summary))
    student.eval()
    if fsdp:
        unshard_root(wrapped)
    method.finish(out, is_main=acc.is_main_process)
    if out is not None:
        save_model(student, out / "model", acc, dtype=config.save_dtype, merge_lora=config.merge_lora)
        if not config.keep_checkpoints and acc.is_main_process:
            checkpoint.remove_all(ckpt_root)  # the run is complete: nothing left to resume
    summary = run_summary(record, total - start, time.time() - started, out, evaluator, config)
    if cache_summary is not None:
        summary["frozen_cache"] = cache_summary
    if out is not None and acc.is_main_process:
        write_manifest(out, {**manifest, "summary": summary})
    if config.verbose and acc.is_main_process:
        print(summary_line(summary), flush=True)
    models.student = acc.unwrap_model(student)
    return models.student


def _completed(out: Path) -> bool:
    try:
        return "summary" in read_manifest(out)
    except (OSError, ValueError):
        return False


def _check_train_layers(method: Method, student, config: TrainConfig) -> None:
    """A method that trains its own parameters (EUL's adapters) ignores train_layers: say so."""
    if config.train_layers in (None, "all"):
        return
    if not any(p.requires_grad for p in decoder_blocks(student).parameters()):
        raise ValueError(f"train_layers {config.train_layers!r} has no effect with method {method.name!r}: "
                         "it trains parameters of its own, not the model's blocks")


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass (Hugging Face models);
    non-reentrant, so frozen lower blocks and inputs without gradients work."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x: the newer name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    else:
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} is not a Hugging Face model")
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # a key/value cache is useless in training and clashes with recomputation


def run_manifest(method: Method, config: TrainConfig, run_facts: dict, acc, warmup: int, params,
                 extra: dict | None) -> dict:
    """What identifies the run (see :mod:`unlearn_ext.run_dir`)."""
    options = getattr(method, "options", None)
    head = method.head
    return {
        "run": {**run_facts, "desc": config.desc, "head": head.name, "backend": _backend_name(head, acc.device),
                "method_options": asdict(options) if options is not None and hasattr(options, "__dataclass_fields__")
                else None, "warmup_steps": warmup, "trainable_parameters": sum(p.numel() for p in params),
                "processes": acc.num_processes, "device": str(acc.device),
                "mixed_precision": str(acc.mixed_precision)},
        **(extra or {}),
        "train_config": asdict(config),
        "versions": versions(),
        "git_commit": git_commit(),
    }


def _backend_name(head, device) -> str:
    """The kernel backend the head's losses run on (resolved when the head leaves it open)."""
    from . import _backends
    try:
        kernels = _backends.resolve(getattr(head, "backend", None), device)
    except (RuntimeError, ValueError) as e:
        return f"{getattr(head, 'backend', None)} ({e})"
    return "torch" if kernels is None else getattr(kernels, "name", type(kernels).__name__)


def run_summary(record: dict, steps: int, seconds: float, out: Path | None, evaluator, config: TrainConfig) -> dict:
    summary = {"steps": steps, "final": dict(record), "time_s": round(seconds, 3), "peak_memory": peak_memory(),
               "model": str(out / "model") if out is not None else None,
               "checkpoints": str(out / "checkpoints") if out is not None and config.keep_checkpoints else None}
    if evaluator is not None and evaluator.best() is not None:
        best = evaluator.best()
        saved = out is not None and config.keep_best and best["step"] > 0
        summary["best"] = {**best, "criterion": dynamics.CRITERION, "model": str(out / "best") if saved else None}
    return summary


def _evaluate_now(evaluator, student, wrapped, step: int, total: int, out: Path | None, acc,
                  config: TrainConfig) -> None:
    """One evaluation during training (every rank evaluates its replica, the same examples:
    under FSDP each forward gathers the layers collectively; the main process writes), and
    with keep_best the model of a new best evaluation saved in ``best/`` (collective too)."""
    model = acc.unwrap_model(student)
    was_training = model.training
    with torch.no_grad(), root_gathered(wrapped):
        record = evaluator(model, step)
    model.train(was_training)
    if out is None:
        return
    if acc.is_main_process:
        _log_line(out / "eval.jsonl", record)
        evaluator.plot(out / "eval.png", title=config.desc)
    if config.keep_best and step > 0 and evaluator.best()["step"] == step:  # step 0 is the starting model
        save_model(student, out / "best", acc, dtype=config.save_dtype)


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def _setup_lora(method: Method, models: Models, config: TrainConfig) -> None:
    """With ``config.lora_r``: adapters on the student (only they train; with
    ``train_layers`` only in those blocks), and the student with adapters disabled as the
    reference (no second copy) unless one was given."""
    if not config.lora_r:
        return
    if method.name == "eul":
        raise ValueError("lora_r: EUL trains its own unlearning layers (its paper's design), not LoRA adapters")
    if not lora.has_lora(models.student):  # resuming in the same process: already attached
        torch.manual_seed(derive_seed(config.seed, "lora"))
        targets = lora.parse_targets(config.lora_targets or lora.DEFAULT_TARGETS)
        lora.attach_lora(models.student, lora.LoraOptions(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                          targets, layers=config.train_layers))
    if method.needs_reference() and models.reference is None:
        models.reference = lora.WithoutAdapters(models.student)


def _wrap(method: Method, models: Models, params, config: TrainConfig, acc, fsdp: bool):
    """The student inside :class:`LossForward`, wrapped for DDP by accelerate or sharded
    with FSDP2; frozen models placed (or sharded with ``shard_frozen``). Returns the
    wrapped module, the prepared optimizer and the trainable parameters."""
    wrapper = LossForward(models.student, method.loss)
    if fsdp:
        shard_for_training(wrapper)
        params = [p for p in wrapper.parameters() if p.requires_grad]  # FSDP replaced the parameter objects
        optimizer = acc.prepare_optimizer(make_optimizer(params, config))
        wrapped = wrapper
    else:
        wrapped, optimizer = acc.prepare(wrapper, make_optimizer(params, config))
    if fsdp and config.shard_frozen:
        for model in (models.reference, *models.extra.values()):
            # Not a LoRA view (no parameters of its own), nor a model a nested run sharded (RKLD's augmented one).
            if model is not None and not isinstance(model, lora.WithoutAdapters) and not _is_sharded(model):
                shard_frozen(model)
    return wrapped, optimizer, params


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered on the CPU (collective under FSDP)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model(model, directory: Path, acc, dtype: str | None = None, *, merge_lora: bool = False) -> None:
    """The final model, atomically (see :func:`write_model`); collective under FSDP. A LoRA
    model: its adapters in PEFT's format in ``adapter/`` beside ``directory``, and the
    merged model in ``directory`` only with ``merge_lora``."""
    state = full_state_dict(model)
    config = lora.lora_config(acc.unwrap_model(model))
    if config is not None:
        if acc.is_main_process:
            # OUTPUT/model -> OUTPUT/adapter; another directory (keep_best's best/) -> best_adapter.
            name = "adapter" if directory.name == "model" else f"{directory.name}_adapter"
            _save_lora_adapters(state, config, directory.with_name(name))
        if not merge_lora:
            acc.wait_for_everyone()
            return
        state = lora.merged_state_dict(state, config)
    if acc.is_main_process:
        for debris in directory.parent.glob(f".tmp-{directory.name}-*"):  # left by a killed save
            shutil.rmtree(debris, ignore_errors=True)
        tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
        write_model(acc.unwrap_model(model), tmp, state, dtype)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    acc.wait_for_everyone()


def _save_lora_adapters(state: dict, config, directory: Path) -> None:
    """PEFT's adapter files, written beside ``directory`` and renamed into place."""
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_adapters(state, config, tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def write_model(model, directory: str | os.PathLike, state: dict[str, torch.Tensor] | None = None,
                dtype: str | None = None) -> None:
    """``model`` with Hugging Face ``save_pretrained`` (safetensors; ``state``: its full state
    dict, default ``model.state_dict()``), floating-point tensors in ``dtype`` (None: as they
    are), files with the process's umask. EUL's unlearning layers are saved by
    :mod:`unlearn_ext.adapters` so that transformers does not load the directory as the
    plain backbone."""
    state = model.state_dict() if state is None else state
    backbone = {k: v for k, v in state.items() if not adapters.is_adapter_key(k)}
    if dtype is not None:
        backbone = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in backbone.items()}
    model.save_pretrained(directory, state_dict=backbone, safe_serialization=True)
    config_path = Path(directory) / "config.json"
    if dtype is not None and config_path.is_file():  # what from_pretrained(dtype="auto") loads: the saved dtype
        config = json.loads(config_path.read_text())
        config["dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    adapters.save_unlearning_layers(model, directory)
    follow_umask(directory)
