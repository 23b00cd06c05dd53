"""Frozen models run once, not every step: the frozen cache (DESIGN.md, "At scale").

A frozen model (NPO's reference, UnDIAL's teacher, RKLD's original and augmented models, the
KL retain term's reference) gives the same outputs on an example at every step. The cache
keeps, per example, what the losses read of them, and serves it through the method's
``frozen`` / ``frozen_logprob`` seam (:mod:`unlearn_ext.methods.base`):

- ``logprob``: the summed answer log-probability ℓ (one float per example; NPO's ℓ^ref);
- ``hidden``: the last hidden states at the positions that predict an answer token
  ([answer tokens, H]). The teacher is rebuilt from them and the frozen LM head: the fused
  head forms its logits chunk by chunk inside the loss, as without the cache (never
  [N, V]); the logits head forms [B, T, V] through the head (it skips the body's forward,
  not the logits' memory). Other positions are zeros the losses never read.

What a method reads is recorded, not declared: before training, :func:`start_frozen_cache`
runs the method's loss once under no_grad on one forget (and one retain) example, and the
frozen calls it makes name (model, kind, set). Every forget example the run will see (the
trainer's BatchPlan from the first step on) is then computed in batches; retain examples
are kept the first time they are drawn (that step runs the frozen body as without the
cache). A frozen model whose every example to come is cached leaves the device: its body
goes to the CPU, its LM head stays (the teachers are rebuilt from it); it comes back when
the run ends. A model that shares parameters with the student (LoRA's reference is the
student with its adapters disabled) never moves; a sharded one (FSDP) is never cached (its
forward is collective: every process must run it).

Examples are keyed by ``part["example_id"]`` (the trainer adds it: forget example i is i,
retain example j is n_forget + j; parts without it, e.g. a method's own batches, are never
cached), and every lookup checks that the part holds the tokens stored for its ids.

Exactness: a cached output is the frozen model's output on the batch it was computed in.
Where a row's result does not depend on the other rows of its batch (the case for the
tests' models on one CPU thread) the loss and its gradient equal those without the cache
bitwise; otherwise they differ by the rounding of a different batch composition. With the
logits head the rebuilt logits are ``hidden @ Wᵀ`` in the hidden states' dtype, also under
autocast where the model's own head would run in bf16.
"""
from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..fused_linear import LMHeadInputs, shift_labels
from ..models.lm_head import lm_head_inputs
from ..reference import IGNORE_INDEX

HIDDEN, LOGPROB = "hidden", "logprob"
MODES = ("auto", "memory", "disk", "off")
EXAMPLE_ID = "example_id"
_MIB = 1 << 20


def answer_mask(part: dict) -> torch.Tensor:
    """[B, T] True at the positions that predict an answer token: the rows a loss reads."""
    return shift_labels(part["labels"]) != IGNORE_INDEX


def _scatter_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H]: ``rows`` [n, H] at the True positions of ``mask`` [B, T] in order, zeros
    elsewhere — what ``hidden[mask] = rows`` gives, without the host reading the mask
    (a gather at each position's running count; the mask holds n True positions: the token
    check made sure)."""
    if rows.shape[0] == 0:
        return rows.new_zeros(*mask.shape, rows.shape[-1])
    flat = mask.reshape(-1)
    gathered = rows.index_select(0, (flat.cumsum(0) - 1).clamp_(min=0))
    return torch.where(flat.unsqueeze(-1), gathered, 0.0).view(*mask.shape, rows.shape[-1])


def _address(t: torch.Tensor) -> int:
    """Where a tensor's memory is (an FSDP-sharded DTensor: its local shard's), to tell
    whether two models share it."""
    return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RowTable:
    """Each example's answer rows [n_i, H] in one [rows, H] tensor: on the training device,
    or in a file memory-mapped beside the run (rows reach the device when read)."""

    def __init__(self, counts: dict[int, int], hidden_size: int, dtype, device, path: Path | None):
        self.slots, start = {}, 0
        for i, n in counts.items():
            self.slots[i] = (start, n)
            start += n
        self.device = device
        if path is None:
            self.data = torch.empty(start, hidden_size, dtype=dtype, device=device)
        else:
            self.data = torch.from_file(str(path), shared=True, size=max(start * hidden_size, 1),
                                        dtype=dtype)[:start * hidden_size].view(start, hidden_size)
        self.filled: set[int] = set()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def wants(self, i: int) -> bool:
        return i in self.slots and i not in self.filled

    def put(self, i: int, rows: torch.Tensor) -> None:
        start, n = self.slots[i]
        if rows.shape[0] != n:
            raise RuntimeError(f"frozen cache: example_id {i} has {rows.shape[0]} answer positions, "
                               f"{n} when the cache was laid out (the collator must be deterministic)")
        self.data[start:start + n].copy_(rows)
        self.filled.add(i)

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        parts = [self.data[s:s + n] for s, n in (self.slots[i] for i in ids)]
        return torch.cat(parts).to(self.device, non_blocking=True)


class FrozenCache:
    """The frozen models' outputs on the run's examples (see the module's docstring)."""

    def __init__(self, frozen: dict[str, torch.nn.Module], student: torch.nn.Module, device, num_forget: int):
        self.frozen = frozen
        self._names = {id(m): name for name, m in frozen.items()}
        self._student_storage = {_address(p) for p in student.parameters()}
        self.device = torch.device(device)
        self.num_forget = num_forget
        self.recording = True
        self.uses: set[tuple[str, str, str]] = set()  # (model, kind, set)
        self.to_come: dict[str, list[int]] = {}       # set -> example ids the run will draw
        self.rows: dict[str, _RowTable] = {}          # model -> hidden rows
        self.values: dict[str, dict[int, torch.Tensor]] = {}  # model -> ℓ per example
        self.tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # example -> (input ids, labels)
        self.heads: dict[str, tuple] = {}             # model -> (weight, bias, softcap) on the device
        self.hidden_like: dict[str, tuple[int, torch.dtype]] = {}
        self.offloaded: dict[str, int] = {}           # model -> device bytes its body freed
        self.mode = "memory"
        self.directory: Path | None = None
        self.served: Counter = Counter()              # (model, kind) -> examples served from the cache
        self.computed: Counter = Counter()            # (model, kind) -> examples run through the body
        self.compute_s: Counter = Counter()
        self.fill_s = 0.0
        self._mismatch: torch.Tensor | None = None    # on the device: a lookup's tokens differed (see check)
        self._mismatch_ids: list[list[int]] = []

    # ---- the seam: Method.frozen / Method.frozen_logprob ------------------------------------
    def outputs(self, head, model, part: dict):
        """``model``'s Outputs on ``part`` for ``head`` (teachers of the distillation losses)."""
        name = self._cacheable(model, part)
        if name is None:
            return head.run(model, part)
        ids = part[EXAMPLE_ID].tolist()  # on the host (the trainer keeps them there): no sync
        self._record(name, HIDDEN, ids)
        table = self.rows.get(name)
        if table is not None and table.filled.issuperset(ids):
            self._check_tokens(part, ids)
            self.served[name, HIDDEN] += len(ids)
            hidden = _scatter_rows(table.rows(ids), answer_mask(part))
            return head.outputs_from_lm_head(part, LMHeadInputs(hidden, *self.heads[name]))
        lm = self._lm_head_inputs(name, part)
        if table is not None:
            self._keep_rows(name, table, part, ids, lm.hidden)
        return head.outputs_from_lm_head(part, lm)

    def logprob(self, head, model, part: dict) -> torch.Tensor:
        """``model``'s summed answer log-probability per sequence of ``part`` [B]."""
        compute = lambda: head.sequence_logprob(head.run(model, part))[0]  # noqa: E731
        name = self._cacheable(model, part)
        if name is None:
            return compute()
        ids = part[EXAMPLE_ID].tolist()
        self._record(name, LOGPROB, ids)
        table = self.values.get(name)
        if table is not None and all(i in table for i in ids):
            self._check_tokens(part, ids)
            self.served[name, LOGPROB] += len(ids)
            return torch.stack([table[i] for i in ids])
        values = self._timed(name, LOGPROB, len(ids), compute)
        if table is not None:
            wanted = self._wanted(name, LOGPROB)
            for b, i in enumerate(ids):
                if i in wanted and i not in table:
                    table[i] = values[b].clone()
                    self._keep_tokens(part, b, i)
            self._offload_if_complete(name)
        return values

    # ---- computing and keeping ------------------------------------------------------------
    def _cacheable(self, model, part) -> str | None:
        name = self._names.get(id(model))
        return name if name is not None and EXAMPLE_ID in part else None

    def _set_of(self, ids) -> str:
        return "forget" if ids[0] < self.num_forget else "retain"

    def _record(self, name, kind, ids) -> None:
        if self.recording:
            self.uses.add((name, kind, self._set_of(ids)))

    def _wanted(self, name, kind) -> set[int]:
        return {i for (n, k, s) in self.uses if (n, k) == (name, kind) for i in self.to_come.get(s, ())}

    def _timed(self, name, kind, count, fn):
        self._on_device(name)
        _sync(self.device)
        start = time.perf_counter()
        out = fn()
        _sync(self.device)
        self.compute_s[name, kind] += time.perf_counter() - start
        self.computed[name, kind] += count
        return out

    def _lm_head_inputs(self, name, part) -> LMHeadInputs:
        model = self.frozen[name]
        lm = self._timed(name, HIDDEN, len(part["input_ids"]),
                         lambda: lm_head_inputs(model, part["input_ids"], part["attention_mask"]))
        self.heads[name] = (lm.weight.detach(), None if lm.bias is None else lm.bias.detach(), lm.softcap)
        self.hidden_like[name] = (lm.hidden.shape[-1], lm.hidden.dtype)
        return lm

    def _keep_rows(self, name, table: _RowTable, part, ids, hidden) -> None:
        mask = answer_mask(part)
        for b, (i, rows) in enumerate(zip(ids, hidden[mask].split(mask.sum(1).tolist()))):
            if table.wants(i):
                table.put(i, rows)
                self._keep_tokens(part, b, i)
        self._offload_if_complete(name)

    def _keep_tokens(self, part, b, i) -> None:
        if i not in self.tokens:
            attn = part["attention_mask"][b].bool()
            self.tokens[i] = (part["input_ids"][b][attn].clone(), part["labels"][b][attn].clone())

    def _check_tokens(self, part, ids) -> None:
        """Checks that the part's examples hold the tokens stored for their ids. Without
        reading the device: each row of a (right- or left-) padded part must hold exactly
        its example's tokens in its first or last n positions, n its stored length (known
        on the host); the verdict is kept on the device and read by :meth:`check` (on the
        CPU at once; the trainer calls it where it synchronises anyway, and ``finish``)."""
        ok = []
        for b, i in enumerate(ids):
            want_ids, want_labels = self.tokens[i]
            n, attn = want_ids.shape[0], part["attention_mask"][b]
            if n > attn.shape[0]:
                ok.append(torch.zeros((), dtype=torch.bool, device=attn.device))
                continue
            placed = [attn[r].bool().all() & (part["input_ids"][b, r] == want_ids).all()
                      & (part["labels"][b, r] == want_labels).all()
                      for r in (slice(0, n), slice(attn.shape[0] - n, None))]  # right padding, left padding
            ok.append((attn.sum() == n) & (placed[0] | placed[1]))
        verdict = torch.stack(ok).all()
        self._mismatch = ~verdict if self._mismatch is None else self._mismatch | ~verdict
        self._mismatch_ids.append(ids)
        if self.device.type == "cpu":
            self.check()

    def check(self) -> None:
        """Raises if a lookup so far got a part whose examples do not hold the tokens cached
        for their ids (reads one flag from the device)."""
        if self._mismatch is not None and bool(self._mismatch):
            raise ValueError(f"frozen cache: the batch part's examples (ids among {self._mismatch_ids[-8:]}) do not "
                             f"hold the tokens cached for these {EXAMPLE_ID}s (a part must carry the trainer's ids of "
                             "its own examples, or none)")
        self._mismatch_ids.clear()

    # ---- the frozen bodies ----------------------------------------------------------------
    def _complete(self, name) -> bool:
        for n, kind, s in self.uses:
            if n != name:
                continue
            have = self.rows[name].filled if kind == HIDDEN else self.values[name].keys()
            if not set(self.to_come.get(s, ())) <= set(have):
                return False
        return True

    def _offload_if_complete(self, name) -> None:
        model = self.frozen[name]
        if self.recording or name in self.offloaded or not self._complete(name):
            return
        params = [p for p in (*model.parameters(), *model.buffers()) if p.numel()]
        if not params or any(_address(p) in self._student_storage for p in params):
            return  # a view of the student (LoRA's reference, RKLD's augmented adapter): nothing of its own to move
        on_device = [p for p in params if p.device == self.device]
        if self.device.type == "cpu" or not on_device:
            return
        kept = {_address(t) for t in self.heads.get(name, ())[:2] if t is not None}
        freed = sum(p.numel() * p.element_size() for p in on_device if _address(p) not in kept)
        model.to("cpu")  # the head tensors kept in self.heads still hold their device copy
        self.offloaded[name] = freed

    def _on_device(self, name) -> None:
        if self.offloaded.pop(name, None) is not None:
            self.frozen[name].to(self.device)

    # ---- preparation and report -----------------------------------------------------------
    def allocate(self, mode: str, directory: Path | None, counts: dict[int, int]) -> None:
        self.mode, self.directory = mode, directory
        for name in sorted({n for n, _, _ in self.uses}):
            kinds = {k for n, k, _ in self.uses if n == name}
            if HIDDEN in kinds:
                size, dtype = self.hidden_like[name]
                ids = sorted(self._wanted(name, HIDDEN))
                path = None if mode == "memory" else directory / f"{name}.bin"
                self.rows[name] = _RowTable({i: counts[i] for i in ids}, size, dtype, self.device, path)
            if LOGPROB in kinds:
                self.values[name] = {}

    def fill(self, head, parts) -> None:
        """Runs the frozen models over the forget examples to come (the batches ``parts``)."""
        start = time.perf_counter()
        with torch.no_grad():
            for part in parts:
                for name, kind, s in sorted(self.uses):
                    if s != "forget":
                        continue
                    model = self.frozen[name]
                    if kind == HIDDEN:
                        ids = part[EXAMPLE_ID].tolist()
                        self._keep_rows(name, self.rows[name], part, ids, self._lm_head_inputs(name, part).hidden)
                    else:
                        self.logprob(head, model, part)
        self.fill_s = time.perf_counter() - start

    def cached_bytes(self) -> int:
        rows = sum(t.nbytes for t in self.rows.values())
        values = sum(v.numel() * v.element_size() for table in self.values.values() for v in table.values())
        return rows + values

    def summary(self) -> dict:
        """How much memory and time the cache saved (the time an estimate: each example served
        from the cache would have cost the mean time of the examples run through the body)."""
        saved = sum(n * self.compute_s[key] / self.computed[key] for key, n in self.served.items()
                    if self.computed[key])
        on_device = self.cached_bytes() if self.mode == "memory" else 0
        return {
            "store": self.mode,
            "cached_mib": round(self.cached_bytes() / _MIB, 3),
            "uses": sorted(f"{n}:{k}:{s}" for n, k, s in self.uses),
            "examples_served": sum(self.served.values()),
            "examples_run": sum(self.computed.values()),
            "fill_s": round(self.fill_s, 3),
            "frozen_time_saved_s": round(saved - self.fill_s, 3),
            "frozen_bodies_off_device_mib": round(sum(self.offloaded.values()) / _MIB, 3),
            "device_memory_saved_mib": round((sum(self.offloaded.values()) - on_device) / _MIB, 3) + 0.0,
        }

    def finish(self, method, *, check: bool = True) -> dict:
        """Frozen bodies back on the device, the cache released; returns the summary (the
        trainer puts it in the run's summary). ``check``: then raise if a lookup got the
        wrong tokens (:meth:`check`; off when the run is failing already)."""
        summary = self.summary()
        try:
            if check:
                self.check()
        finally:
            for name in list(self.offloaded):
                self._on_device(name)
            method.frozen_cache = None
            self.rows.clear(), self.values.clear(), self.heads.clear(), self.tokens.clear()
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                try:
                    self.directory.parent.rmdir()  # the last rank out removes frozen_cache/
                except OSError:
                    pass
        return summary


def describe(summary: dict) -> str:
    """One line for the log."""
    return (f"frozen cache ({summary['store']}, {summary['cached_mib']:.1f} MiB): {summary['examples_served']} "
            f"example passes served, ~{summary['frozen_time_saved_s']:.1f} s saved (fill {summary['fill_s']:.1f} s), "
            f"{summary['frozen_bodies_off_device_mib']:.0f} MiB of frozen bodies off the device")


def _ids_to_come(draw, plan, first_step: int, rank: int) -> list[int]:
    return sorted({i for step in range(first_step, plan.total_steps()) for micro in range(plan.c.grad_accum)
                   for i in draw(step, micro, rank)})


def _cacheable_model(model: torch.nn.Module) -> bool:
    """Frozen, and not sharded: a sharded model (FSDP) gathers its weights with the other
    processes in every forward, so it must run whenever they run it (no process may skip
    it on a hit while another misses)."""
    params = list(model.parameters())
    return not any(p.requires_grad for p in params) and not any(hasattr(p, "placements") for p in params)


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _batches(ids: list[int], size: int):
    return (ids[k:k + size] for k in range(0, len(ids), size))


def start_frozen_cache(method, models, make_part: Callable[[list[int]], dict], to_device: Callable[[dict], dict],
                       config, plan, device, first_step: int = 0, rank: int = 0) -> FrozenCache | None:
    """The trainer's preparation step: records what the method reads of its frozen models,
    lays the cache out for the examples to come, fills it with the forget examples and moves
    complete frozen bodies off the device. None when off (``config.cache_frozen``), when the
    method has no frozen model or reads nothing cacheable, or (auto) when it fits no budget.

    ``make_part(ids)``: the collated examples (CPU) with their ``example_id`` (forget ids
    below ``plan.n``, retain ids from ``plan.n`` on)."""
    mode = getattr(config, "cache_frozen", "auto")
    if mode not in MODES:
        raise ValueError(f"cache_frozen must be one of {', '.join(MODES)}, got {mode!r}")
    frozen = {name: m for name, m in (("reference", models.reference), *models.extra.items())
              if m is not None and _cacheable_model(m)}
    # masking: open_unlearning reads the teachers at every position; the cache keeps answer positions only.
    if mode == "off" or not frozen or getattr(method.options, "masking", "answer") != "answer":
        return None
    cache = FrozenCache(frozen, models.student, device, plan.n)
    forget = _ids_to_come(plan.examples, plan, first_step, rank)
    retain = [plan.n + j for j in _ids_to_come(plan.retain, plan, first_step, rank)] if method.needs_retain() else []
    cache.to_come = {"forget": forget, "retain": retain}
    if not forget:
        return None
    probe = {method.primary: to_device(make_part(forget[:1]))}
    if retain:
        probe["retain"] = to_device(make_part(retain[:1]))
    method.frozen_cache = cache
    try:
        with torch.no_grad():
            method.loss(probe)
    finally:
        method.frozen_cache = None
    cache.recording = False
    cache.computed.clear(), cache.compute_s.clear()  # the probe's first calls are no fair timing
    if not cache.uses:
        return None

    counts: dict[int, int] = {}
    for s in sorted({s for _, k, s in cache.uses if k == HIDDEN}):
        for ids in _batches(cache.to_come[s], config.batch_size):
            counts.update(zip(ids, answer_mask(make_part(ids)).sum(1).tolist()))
    need = 0
    for name in {n for n, k, _ in cache.uses if k == HIDDEN}:
        size, dtype = cache.hidden_like[name]
        need += sum(counts[i] for i in cache._wanted(name, HIDDEN)) * size * dtype.itemsize
    directory = Path(config.output_dir) / "frozen_cache" / f"rank{rank}" if config.output_dir else None
    if mode == "auto":
        if need <= config.cache_memory_mb * _MIB:
            mode = "memory"
        elif directory is not None and _free_bytes(Path(config.output_dir)) > 2 * need:
            mode = "disk"
        else:
            return None
    if mode == "disk":
        if directory is None:
            raise ValueError("cache_frozen=disk keeps the cache beside the run: it needs an output directory")
        shutil.rmtree(directory, ignore_errors=True)  # a killed run's
        directory.mkdir(parents=True)
    cache.allocate(mode, directory, counts)
    try:
        cache.fill(method.head, (to_device(make_part(ids)) for ids in _batches(forget, config.batch_size)))
        for name in frozen:
            cache._offload_if_complete(name)
    except BaseException:
        cache.finish(method, check=False)  # bodies already moved come back
        raise
    method.frozen_cache = cache
    return cache
