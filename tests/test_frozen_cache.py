"""The frozen cache: frozen models run once before training, their outputs served at every
step with the same losses and gradients, bitwise (CPU, one thread, no dropout)."""
import copy

import pytest
import torch
from tiny_lm import FORGET, RETAIN, collate, one_thread, perturbed, trained_llama  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

from unlearn_ext import cli
from unlearn_ext.methods import NPO, NPOKL, RKLD, FusedLinearHead, GradDiff, LogitsHead, Models, PrepareData, SimNPO
from unlearn_ext.methods import UnDIAL, freeze
from unlearn_ext.methods.cache import start_frozen_cache
from unlearn_ext.run_dir import read_manifest
from unlearn_ext.trainer import BatchPlan, TrainConfig, TrainData, _part, train

DATA = TrainData(FORGET, RETAIN, collate())
CASES = {
    "npo": (NPO, {}),
    "npo_kl": (NPOKL, {}),
    "undial": (UnDIAL, {}),
    "graddiff_kl": (GradDiff, {"retain_loss": "kl"}),  # the KL retain term on its own
    "rkld_kl": (RKLD, {"augment_epochs": 2.0, "augment_lr": 1e-3, "retain_weight": 1.0, "retain_loss": "kl"}),
}
HEADS = {"logits": LogitsHead, "fused": FusedLinearHead}


def _method(cls, head, options):
    original = trained_llama()
    method = cls(head=HEADS[head](), **options)
    models = Models(student=perturbed(copy.deepcopy(original)), reference=freeze(original))
    method.prepare(models, PrepareData(FORGET, RETAIN, collate(), seed=0))
    return method


def _start(method, **config):
    config = TrainConfig(**{"batch_size": 4, "max_steps": 3, "cache_frozen": "memory", **config})
    plan = BatchPlan(len(FORGET), len(RETAIN), config, world=1)
    cache = start_frozen_cache(method, method.models, lambda ids: _part(DATA, ids), lambda p: p, config, plan,
                               torch.device("cpu"))
    return cache, plan


def _batch(method, plan, step):
    batch = {"forget": _part(DATA, plan.examples(step, 0, 0))}
    if method.needs_retain():
        batch["retain"] = _part(DATA, [plan.n + j for j in plan.retain(step, 0, 0)])
    return batch


def _loss_and_grads(method, batch):
    params = [p for p in method.models.student.parameters() if p.requires_grad]
    loss, logs = method.loss(batch)
    return [loss.detach(), *torch.autograd.grad(loss, params)]


class _Calls:
    """Counts forward calls of the frozen models' bodies."""

    def __init__(self, models):
        self.count = 0
        self.handles = [m.base_model.register_forward_pre_hook(self.hook) for m in models]

    def hook(self, *_):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("case", CASES)
def test_cached_losses_and_gradients_equal_uncached_bitwise(case, head):
    cls, options = CASES[case]
    method = _method(cls, head, options)
    cache, plan = _start(method)
    assert cache is not None and method.frozen_cache is cache
    frozen = [method.models.reference, *method.models.extra.values()]
    for step in range(3):
        batch = _batch(method, plan, step)
        kept = set().union(*(t.filled for t in cache.rows.values()))
        new = set(batch["retain"]["example_id"].tolist()) - kept if "retain" in batch else set()
        method.frozen_cache = None
        plain = _loss_and_grads(method, batch)
        method.frozen_cache = cache
        for again in (False, True):  # retain examples drawn for the first time are kept, then served
            with _Calls(frozen) as calls:
                cached = _loss_and_grads(method, batch)
            assert calls.count == (1 if new and not again else 0)  # the KL term's reference on new retain examples
            for got, want in zip(cached, plain):
                assert torch.equal(got, want), (case, head, step, again)
    summary = cache.finish(method)
    assert summary["examples_served"] > 0 and method.frozen_cache is None


def test_forget_teachers_are_never_rerun_and_retain_ones_once():
    method = _method(NPOKL, "fused", {})
    cache, plan = _start(method, max_steps=6)
    seen = set()
    for step in range(6):
        batch = _batch(method, plan, step)
        with _Calls([method.models.reference]) as calls:
            method.loss(batch)
        new = set(batch["retain"]["example_id"].tolist()) - seen
        assert calls.count == (1 if new else 0)  # NPO's ℓ^ref from the cache; KL's teacher when new
        seen |= new
    assert cache.rows["reference"].filled == seen
    assert set(cache.values["reference"]) == set(range(len(FORGET)))


def test_a_part_with_other_tokens_under_cached_ids_is_refused():
    method = _method(UnDIAL, "fused", {})
    cache, plan = _start(method)
    batch = _batch(method, plan, 0)
    batch["forget"]["example_id"] = batch["forget"]["example_id"].roll(1)
    with pytest.raises(ValueError, match="do not hold the tokens cached"):
        method.loss(batch)


def test_nothing_to_cache_or_off_or_over_budget_gives_no_cache(tmp_path):
    assert _start(_method(SimNPO, "fused", {}))[0] is None  # no reference model
    assert _start(_method(GradDiff, "fused", {}))[0] is None  # NLL retain: no frozen call
    assert _start(_method(NPO, "fused", {}), cache_frozen="off")[0] is None
    assert _start(_method(UnDIAL, "fused", {}), cache_frozen="auto", cache_memory_mb=0)[0] is None
    cache, _ = _start(_method(UnDIAL, "fused", {}), cache_frozen="auto", cache_memory_mb=0, output_dir=str(tmp_path))
    assert cache.mode == "disk" and (tmp_path / "frozen_cache/rank0/reference.bin").is_file()
    with pytest.raises(ValueError, match="cache_frozen must be one of"):
        _start(_method(NPO, "fused", {}), cache_frozen="yes")
    with pytest.raises(ValueError, match="needs an output directory"):
        _start(_method(NPO, "fused", {}), cache_frozen="disk")


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_cached_run_trains_the_same_model_and_reports_what_it_saved(tmp_path, mode):
    def run(cache_frozen, out):
        method = _method(NPOKL, "fused", {})
        config = TrainConfig(output_dir=str(out), lr=1e-3, max_steps=3, batch_size=2, progress=False,
                             cache_frozen=cache_frozen)
        return train(method, method.models, DATA, config)
    cached, plain = run(mode, tmp_path / "cached"), run("off", tmp_path / "plain")
    for (name, got), want in zip(cached.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(got, want), name
    summary = read_manifest(tmp_path / "cached")["summary"]["frozen_cache"]
    assert summary["store"] == mode and summary["examples_served"] > 0 and summary["cached_mib"] > 0
    assert {"frozen_time_saved_s", "device_memory_saved_mib", "frozen_bodies_off_device_mib"} <= set(summary)
    assert not (tmp_path / "cached/frozen_cache").exists()  # the disk cache goes with the run
    assert "frozen_cache" not in read_manifest(tmp_path / "plain")["summary"]


def test_cli_flag_reaches_the_trainer():
    values = cli.resolve("unlearn", cli.UNLEARN_OPTS, {"model": "m", "output": "o", "method": "npo", "forget": "f",
                                                       "cache_frozen": "off", "cache_memory_mb": "12",
                                                       "save_dtype": "float32"})
    config = cli._train_config(values, "unlearn")
    assert config.cache_frozen == "off" and config.cache_memory_mb == 12.0
    with pytest.raises(cli.CLIError, match="cache-frozen"):
        cli.resolve("unlearn", cli.UNLEARN_OPTS, {"model": "m", "output": "o", "method": "npo", "forget": "f",
                                                  "cache_frozen": "sometimes"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the frozen bodies leave a GPU (on a CPU they stay)")
def test_complete_frozen_bodies_leave_the_gpu_and_come_back():
    method = _method(RKLD, "fused", CASES["rkld_kl"][1] | {"retain_weight": 0.0})
    for m in (method.models.student, method.models.reference, *method.models.extra.values()):
        m.cuda()
    config = TrainConfig(batch_size=4, max_steps=2, cache_frozen="memory")
    plan = BatchPlan(len(FORGET), len(RETAIN), config, world=1)
    to_gpu = lambda p: {k: v.cuda() for k, v in p.items()}  # noqa: E731
    cache = start_frozen_cache(method, method.models, lambda ids: _part(DATA, ids), to_gpu, config, plan,
                               torch.device("cuda"))
    assert set(cache.offloaded) == {"reference", "augmented"}
    assert method.models.reference.model.layers[0].mlp.up_proj.weight.device.type == "cpu"
    batch = to_gpu(_part(DATA, plan.examples(0, 0, 0)))
    cached = method.loss({"forget": batch})[0]
    summary = cache.finish(method)
    assert summary["frozen_bodies_off_device_mib"] > 0
    assert method.models.reference.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    torch.testing.assert_close(cached, method.loss({"forget": batch})[0])


def test_sharded_or_trainable_frozen_models_are_not_cached():
    method = _method(UnDIAL, "fused", {})
    next(method.models.reference.parameters()).placements = ()  # what a DTensor (FSDP2 shard) has
    assert _start(method)[0] is None
    method = _method(UnDIAL, "fused", {})
    method.models.reference.requires_grad_(True)
    assert _start(method)[0] is None


class _Offloads:
    """What the cache does with complete frozen bodies on a GPU, recorded on the CPU (where
    they stay): each offload marks the body off the device, each return clears it."""

    def __init__(self, monkeypatch):
        from unlearn_ext.methods.cache import FrozenCache
        self.caches, self.back = [], []
        offload, on_device = FrozenCache._offload_if_complete, FrozenCache._on_device
        record = self

        def fake_offload(cache, name):
            offload(cache, name)  # the real decision (a no-op move on the CPU)
            if not cache.recording and name not in cache.offloaded and cache._complete(name):
                cache.offloaded[name] = 1
                record.caches.append(cache)

        def spy_on_device(cache, name):
            if name in cache.offloaded:
                record.back.append(name)
            on_device(cache, name)

        monkeypatch.setattr(FrozenCache, "_offload_if_complete", fake_offload)
        monkeypatch.setattr(FrozenCache, "_on_device", spy_on_device)


@pytest.mark.parametrize("when", ["step", "fill"])
def test_a_crash_mid_run_brings_the_frozen_bodies_back(monkeypatch, when):
    """A run that fails (here: an error raised after step 1, or while the cache fills)
    returns the frozen bodies it moved off the device and detaches the cache."""
    offloads = _Offloads(monkeypatch)
    method = _method(RKLD, "fused", CASES["rkld_kl"][1] | {"retain_weight": 0.0})

    def crash(step, record):
        raise RuntimeError("crash mid-run")

    if when == "fill":
        from unlearn_ext.methods.cache import FrozenCache
        fill = FrozenCache.fill

        def failing_fill(cache, head, parts):
            fill(cache, head, parts)
            for name in cache.frozen:  # every body is complete: off the device, then the failure
                cache._offload_if_complete(name)
            raise RuntimeError("crash while filling")
        monkeypatch.setattr(FrozenCache, "fill", failing_fill)
    config = TrainConfig(lr=1e-3, max_steps=3, batch_size=4, progress=False, cache_frozen="memory")
    with pytest.raises(RuntimeError, match="crash"):
        train(method, method.models, DATA, config, callbacks=[crash])
    assert {n for c in offloads.caches for n in c.offloaded} == set()
    assert sorted(offloads.back) == ["augmented", "reference"]
    assert method.frozen_cache is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the frozen bodies leave a GPU (on a CPU they stay)")
def test_a_crash_mid_run_brings_the_frozen_bodies_back_to_the_gpu():
    method = _method(UnDIAL, "fused", {})
    for m in (method.models.student, method.models.reference):
        m.cuda()

    def crash(step, record):
        assert method.models.reference.model.layers[0].mlp.up_proj.weight.device.type == "cpu"  # off during the run
        raise RuntimeError("crash mid-run")
    config = TrainConfig(lr=1e-3, max_steps=3, batch_size=4, progress=False, cache_frozen="memory", bf16=False)
    with pytest.raises(RuntimeError, match="crash mid-run"):
        train(method, method.models, DATA, config, callbacks=[crash])
    assert method.models.reference.model.layers[0].mlp.up_proj.weight.device.type == "cuda"


class _DeviceOnly(TorchDispatchMode):
    """Fails an op that syncs with the host or reads a host tensor other than ``allowed``
    (the example ids the trainer keeps on the host), while the data is on ``meta``: no
    value can be read, as on a GPU where each read would be a synchronisation."""
    SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.item.default", "aten.equal.default", "aten.is_nonzero.default"}

    def __init__(self, allowed):
        super().__init__()
        self.allowed = allowed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves
        if str(func) in self.SYNCING:
            raise AssertionError(f"host synchronisation: {func}")
        if str(func).startswith(("aten.index.", "aten.index_put")) and any(
                isinstance(x, torch.Tensor) and x.dtype == torch.bool for x in tree_leaves(args[1])):
            raise AssertionError(f"{func} with a boolean mask: a nonzero (host synchronisation) on a GPU")
        for x in tree_leaves((args, kwargs or {})):
            if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x is not self.allowed:
                raise AssertionError(f"{func} reads a host tensor {tuple(x.shape)}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["hidden", "logprob"])
def test_a_cache_hit_reads_nothing_on_the_host(kind):
    """A lookup that the cache serves (the hidden states rebuilt, the token check) runs on
    meta tensors without a host read or synchronisation: the GPU path is sync-free."""
    from unlearn_ext.methods.cache import FrozenCache, _RowTable
    H, T, meta = 8, 6, torch.device("meta")
    reference = torch.nn.Linear(2, 2)  # stands for a frozen model: only its identity is read
    cache = FrozenCache({"reference": reference}, torch.nn.Linear(2, 2), meta, num_forget=4)
    cache.recording = False
    cache.uses = {("reference", kind, "forget")}
    cache.to_come = {"forget": [0, 1]}
    counts = {0: 3, 1: 2}  # answer rows of each example
    for i, n in counts.items():
        cache.tokens[i] = (torch.empty(n + 2, dtype=torch.long, device=meta),) * 2
    if kind == "hidden":
        table = _RowTable(counts, H, torch.float32, meta, None)
        table.filled = {0, 1}
        cache.rows["reference"] = table
        cache.heads["reference"] = (torch.empty(11, H, device=meta), None, None)
    else:
        cache.values["reference"] = {0: torch.empty((), device=meta), 1: torch.empty((), device=meta)}
    ids = torch.tensor([0, 1])
    part = {"input_ids": torch.empty(2, T, dtype=torch.long, device=meta),
            "attention_mask": torch.empty(2, T, dtype=torch.long, device=meta),
            "labels": torch.empty(2, T, dtype=torch.long, device=meta), "example_id": ids}
    with _DeviceOnly(ids):
        if kind == "hidden":
            out = cache.outputs(FusedLinearHead(), reference, part)
            assert out.hidden.shape == (2, T, H) and out.hidden.device.type == "meta"
        else:
            assert cache.logprob(FusedLinearHead(), reference, part).shape == (2,)
    assert cache.served["reference", kind] == 2 and cache._mismatch is not None  # the verdict waits on the device


def test_the_token_check_catches_a_part_with_other_tokens_under_either_padding():
    """The device-side token check: the trainer's own parts pass (right padding, and the
    same examples left-padded), a part whose tokens differ from its ids' fails."""
    method = _method(UnDIAL, "fused", {})
    cache, plan = _start(method)
    ids = plan.examples(0, 0, 0)
    part = _part(DATA, ids)
    method.loss({"forget": part})
    shift = {k: v.clone() for k, v in part.items()}
    for key in ("input_ids", "attention_mask", "labels"):  # each row left-padded instead
        for b in range(len(ids)):
            n = int(part["attention_mask"][b].sum())
            shift[key][b] = torch.roll(part[key][b], part[key].shape[1] - n)
    cache._check_tokens(shift, ids)
    wrong = {**part, "example_id": part["example_id"].flip(0)}
    with pytest.raises(ValueError, match="do not hold the tokens"):
        method.loss({"forget": wrong})
