"""RKLD under LoRA: the augmented model is a second adapter on the student's base (no
second copy of the base), fine-tuned in ``prepare`` exactly as a copy of the model with
LoRA would be; teacher values, the loss and its gradients equal the copy-based path's."""
import pytest
import torch
from tiny_lm import FORGET, RETAIN, collate, method_batch, one_thread, trained_llama  # noqa: F401

from unlearn_ext import lora
from unlearn_ext.methods import FusedLinearHead, LogitsHead, Models, PrepareData, freeze, get_method
from unlearn_ext.methods.rkld import AUGMENTED_ADAPTER
from unlearn_ext.models import lm_head_inputs
from unlearn_ext.trainer import TrainConfig, TrainData, derive_seed, train

pytestmark = pytest.mark.as_users_run  # no test-only switches (tests/conftest.py)
OPTIONS = {"augment_epochs": 2.0, "augment_lr": 1e-2}


def config(**overrides):
    return TrainConfig(lr=1e-2, max_steps=3, batch_size=2, progress=False, seed=0, lora_r=4, max_grad_norm=None,
                       **overrides)


def storage_bytes(*models) -> int:
    seen = {}
    for model in models:
        for t in (*model.parameters(), *model.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def prepared(head, as_adapter: bool):
    """The RKLD method prepared on a LoRA student: the reference a view of the student
    (the adapter path) or a frozen copy of the starting model (the copy path)."""
    student = trained_llama()
    torch.manual_seed(derive_seed(0, "lora"))
    lora.attach_lora(student, lora.LoraOptions(r=4))
    reference = lora.WithoutAdapters(student) if as_adapter else freeze(trained_llama())
    models = Models(student=student, reference=reference)
    method = get_method("rkld")(head=head, **OPTIONS)
    torch.manual_seed(1)
    method.prepare(models, PrepareData(FORGET, RETAIN, collate(), train_config=config(), seed=0))
    with torch.no_grad():  # the student's own adapters made non-zero: the student differs from both teachers
        g = torch.Generator().manual_seed(2)
        for n, p in student.named_parameters():
            if ".lora_B.default." in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return method, models


@pytest.mark.parametrize("head", [FusedLinearHead, LogitsHead])
def test_the_augmented_adapter_equals_the_augmented_copy(head):
    (a, models_a), (c, models_c) = prepared(head(), True), prepared(head(), False)
    augmented = models_a.extra["augmented"]
    assert isinstance(augmented, lora.WithoutAdapters) and sum(p.numel() for p in augmented.parameters()) == 0
    # One base in memory: student, reference and augmented model hold the student's tensors
    # (plus the second adapter); the copy path holds two more models.
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in models_a.student.named_parameters()
                        if f".{AUGMENTED_ADAPTER}." in n)
    student_only = storage_bytes(models_a.student) - adapter_bytes
    assert storage_bytes(models_a.student, models_a.reference, augmented) == student_only + adapter_bytes
    assert storage_bytes(models_c.student, models_c.reference, models_c.extra["augmented"]) > 2.5 * student_only
    # Only the augmented adapter trained in prepare; the student's own adapter is its again.
    assert not any(p.requires_grad for n, p in models_a.student.named_parameters() if AUGMENTED_ADAPTER in n)
    assert all(p.requires_grad == (".lora_" in n) for n, p in models_a.student.named_parameters()
               if AUGMENTED_ADAPTER not in n)
    part = method_batch()["forget"]
    with torch.no_grad():
        got, want = augmented(**part).logits, models_c.extra["augmented"](**part).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        start = models_a.reference(**part).logits
        assert (got - start).abs().max() > 1e-2  # the fine-tuning moved the augmented model
        torch.testing.assert_close(lm_head_inputs(augmented, part["input_ids"], part["attention_mask"]).logits(),
                                   want, rtol=1e-6, atol=1e-6)
    batch = method_batch()
    params_a = [p for p in models_a.student.parameters() if p.requires_grad]
    params_c = [p for p in models_c.student.parameters() if p.requires_grad]
    loss_a, loss_c = a.loss(batch)[0], c.loss(batch)[0]
    torch.testing.assert_close(loss_a, loss_c, rtol=0, atol=0)
    for ga, gc in zip(torch.autograd.grad(loss_a, params_a), torch.autograd.grad(loss_c, params_c), strict=True):
        torch.testing.assert_close(ga, gc, rtol=0, atol=0)


def test_a_run_with_the_adapter_equals_the_run_with_a_copy_and_saves_only_the_students_adapter(tmp_path):
    def run(reference, out):
        method = get_method("rkld")(head=FusedLinearHead(), **OPTIONS)
        student = train(method, Models(student=trained_llama(), reference=reference),
                        TrainData(FORGET, RETAIN, collate()), config(output_dir=str(out)))
        return student, method

    with_adapter, method = run(None, tmp_path / "adapter")
    with_copy, _ = run(freeze(trained_llama()), tmp_path / "copy")
    assert "augmented" not in method.models.extra  # finish removed the training aid
    assert not any(AUGMENTED_ADAPTER in n for n, _ in with_adapter.named_parameters())
    want = {n: p for n, p in with_copy.named_parameters() if ".lora_" in n}
    got = {n: p for n, p in with_adapter.named_parameters() if ".lora_" in n}
    assert got.keys() == want.keys() and max(float(p.detach().abs().max()) for n, p in got.items() if "lora_B" in n) > 0
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, msg=n)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter/adapter/adapter_model.safetensors"))
    assert saved.keys() == load_file(str(tmp_path / "copy/adapter/adapter_model.safetensors")).keys()


def test_the_frozen_cache_keeps_no_second_lm_head_under_lora():
    """With LoRA the teachers' LM head is the student's own tensor: the cache holds it (for
    the reference and the augmented adapter alike) without a copy, and no body moves."""
    from unlearn_ext.methods.cache import start_frozen_cache
    from unlearn_ext.trainer import BatchPlan, _part
    method, models = prepared(FusedLinearHead(), True)
    data = TrainData(FORGET, RETAIN, collate())
    train_config = TrainConfig(batch_size=4, max_steps=2, cache_frozen="memory")
    plan = BatchPlan(len(FORGET), len(RETAIN), train_config, world=1)
    cache = start_frozen_cache(method, models, lambda ids: _part(data, ids), lambda p: p, train_config, plan,
                               torch.device("cpu"))
    head = models.student.get_output_embeddings().weight
    assert set(cache.heads) == {"reference", "augmented"}
    for weight, _, _ in cache.heads.values():
        assert weight.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert cache.cached_bytes() < head.numel() * head.element_size()  # answer rows only, no head
    cache.finish(method)
