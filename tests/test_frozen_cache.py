"""The frozen cache: frozen models run once before training, their outputs served at every
step with the same losses and gradients, bitwise (CPU, one thread, no dropout)."""
import copy

import pytest
import torch
from tiny_lm import FORGET, RETAIN, collate, one_thread, perturbed, trained_llama  # noqa: F401

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
