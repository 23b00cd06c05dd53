"""The Hugging Face helper on tiny random models built from configs (nothing downloaded):
its hidden states and head give the model's own logits, and a fused-linear loss on them
equals the loss on the model's logits, gradients w.r.t. every model parameter included."""
from __future__ import annotations

import pytest
import torch
import transformers

import unlearn_ext as ue
from unlearn_ext.models.lm_head import lm_head_inputs, verify_lm_head

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# family: (config class, model class, config extras, what the helper must carry over)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "gemma2_softcap": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 2.0, "head_dim": 8}),
    "phi_bias": ("PhiConfig", "PhiForCausalLM", {}),
    "cohere_scale": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.3, "pad_token_id": 0, "bos_token_id": 1,
                                                          "eos_token_id": 2}),
    "granite_scale": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 3.0}),
}


def build(family, dtype=torch.float64):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).to(dtype)


def batch(device="cpu"):
    """Two right-padded sequences, labels −100 on prompt and padding (the batch contract)."""
    input_ids = torch.randint(3, VOCAB, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_gives_the_model_logits_and_loss(family, seed):
    model = build(family)
    input_ids, attention_mask, labels = batch()
    head = lm_head_inputs(model, input_ids, attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(head.logits(), logits, rtol=1e-12, atol=1e-12)
    assert (head.softcap is not None) == family.startswith("gemma2")
    assert (head.bias is not None) == family.startswith("phi")

    model.zero_grad()
    eager = ue.cross_entropy(logits[:, :-1], labels[:, 1:], backend="torch")
    eager.backward()
    expected = param_grads(model)

    model.zero_grad()
    head = lm_head_inputs(model, input_ids, attention_mask)
    fused = ue.fused_linear_cross_entropy(head.hidden, head.weight, ue.shift_labels(labels), bias=head.bias,
                                          softcap=head.softcap, chunk_size=5)
    fused.backward()
    got = param_grads(model)
    torch.testing.assert_close(fused, eager, rtol=1e-12, atol=1e-12)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["llama_tied", "gemma2_softcap"])
def test_distillation_from_a_frozen_copy(family, seed):
    """The teacher is a frozen copy (its own weight) run under no_grad: only the student's
    parameters get gradients, equal to the eager loss's."""
    student, teacher = build(family), build(family)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    teacher.requires_grad_(False)
    input_ids, attention_mask, labels = batch()
    student.zero_grad()
    eager = ue.undial(student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1],
                      teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1], labels[:, 1:],
                      gamma=3.0, backend="torch")
    eager.backward()
    expected = param_grads(student)
    student.zero_grad()
    s = lm_head_inputs(student, input_ids, attention_mask)
    with torch.no_grad():
        t = lm_head_inputs(teacher, input_ids, attention_mask)
    fused = ue.fused_linear_undial(s.hidden, s.weight, t, ue.shift_labels(labels), gamma=3.0, bias=s.bias,
                                   softcap=s.softcap)
    fused.backward()
    torch.testing.assert_close(fused, eager, rtol=1e-12, atol=1e-12)
    got = param_grads(student)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert all(p.grad is None for p in teacher.parameters())


def test_verify_refuses_an_unknown_logit_transform():
    model = build("llama")
    input_ids, attention_mask, _ = batch()

    class Doubled(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model.__class__ = Doubled
    with pytest.raises(ValueError, match="Doubled"):
        lm_head_inputs(model, input_ids, attention_mask)
    head = lm_head_inputs(model, input_ids, attention_mask, verify=False)  # the caller's responsibility
    assert head.hidden.shape == (2, 10, 32)


def test_verify_keeps_train_flags_and_needs_a_linear_head():
    model = build("llama", dtype=torch.float32)
    model.train()
    model.model.layers[0].eval()
    input_ids, attention_mask, _ = batch()
    verify_lm_head(model, input_ids, attention_mask)
    assert model.training and model.model.training and not model.model.layers[0].training
    with pytest.raises(TypeError, match="LM head"):
        lm_head_inputs(model.model, input_ids, attention_mask)
