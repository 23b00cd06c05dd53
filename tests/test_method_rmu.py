"""RMU: w_f·MSE(h_ℓ(forget), c·u) + α·MSE(h_ℓ(retain), h_ℓ^ref(retain)) on answer tokens, at one layer."""
import copy

import open_unlearning_ref as ou
import pytest
import torch
from tiny_lm import FORGET, RETAIN, collate, one_thread, setup_method, trained_llama  # noqa: F401

from unlearn_ext.methods import RMU, LogitsHead, Models, PrepareData, freeze
from unlearn_ext.trainer import TrainConfig, TrainData, train


def masked_mse(x, target, labels):
    """Float64: mean over hidden units, then over each sequence's answer tokens, then over sequences."""
    mask = (labels != -100).double()
    per_token = (x.double() - target.double()).square().mean(-1)
    return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()


@pytest.mark.parametrize("forget_weight,retain_weight", [(1.0, 1200.0), (0.5, 0.0)])
def test_rmu_loss(forget_weight, retain_weight):
    """Layer 0's output is hidden_states[1] of the model: the formula needs no hook."""
    m = setup_method(RMU, layer=0, forget_weight=forget_weight, retain_weight=retain_weight, steering_coeff=3.0)
    s, ref = m.models.student, m.models.reference
    params = [p for p in s.parameters() if p.requires_grad]

    def layer0(model, part):
        out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], output_hidden_states=True)
        return out.hidden_states[1]

    def formula(b):
        h = layer0(s, b["forget"])
        value = forget_weight * masked_mse(h, m.control.expand_as(h), b["forget"]["labels"])
        if retain_weight:
            with torch.no_grad():
                frozen = layer0(ref, b["retain"])
            value = value + retain_weight * masked_mse(layer0(s, b["retain"]), frozen, b["retain"]["labels"])
        return value
    loss, logs = m.loss(m._test_batch)
    expected = formula(m._test_batch)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-12)
    assert ("retain_mse" in logs) == bool(retain_weight) and m.needs_retain() == bool(retain_weight)


def test_defaults_are_wmdps_but_c_follows_the_activation_norm():
    o = RMU().options
    assert (o.retain_weight, o.forget_weight, o.trainable) == (1200.0, 1.0, "mlp")
    assert (o.steering_coeff, o.steering_scale) == (0.0, 2.0)  # c = 2 × the norm, not WMDP's 6.5 (issue 16)


@pytest.mark.parametrize("layer,scale", [(0, 2.0), (1, 0.5)])
def test_the_default_c_is_the_scale_times_the_frozen_models_mean_norm_on_forget_answers(layer, scale):
    m = setup_method(RMU, layer=layer, steering_scale=scale)
    part = collate()(FORGET)
    ref = m.models.reference
    h = ou.layer_output(ref, ref.model.layers[layer], part, grad=False).double()  # open-unlearning's hook
    expected = scale * float(h.norm(dim=-1)[part["labels"] != -100].mean())
    assert abs(m.steering_coeff - expected) < 1e-5 * expected
    assert abs(float(m.control.norm()) - expected) < 1e-4 * expected
    assert float(m.loss(m._test_batch)[1]["steering_coeff"]) == pytest.approx(expected, rel=1e-5)
    absolute = setup_method(RMU, layer=layer, steering_coeff=6.5, steering_scale=scale)
    assert absolute.steering_coeff == 6.5  # a given c wins (WMDP's setting)


def test_control_vector_is_seeded_and_scaled():
    a, b = setup_method(RMU, steering_coeff=2.0), setup_method(RMU, steering_coeff=2.0)
    torch.testing.assert_close(a.control, b.control, rtol=0, atol=0)
    assert abs(float(a.control.norm()) - 2.0) < 1e-5 and bool((a.control >= 0).all())  # rand, as WMDP draws it
    other = RMU(head=LogitsHead())
    other.prepare(Models(student=trained_llama(), reference=freeze(trained_llama())),
                  PrepareData(FORGET, RETAIN, collate(), seed=1))
    assert not torch.allclose(other.control / other.steering_coeff, a.control / 2.0)


def test_only_the_mlps_below_the_layer_train():
    m = setup_method(RMU, layer=1)
    trained = {n for n, p in m.models.student.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.layers.0.mlp.", "model.layers.1.mlp.")) for n in trained)
    assert {n.split(".mlp.")[0] for n in trained} == {"model.layers.0", "model.layers.1"}
    m = setup_method(RMU, layer=1, trainable=r"model\.layers\.1\.mlp\.down_proj\.weight")  # WMDP's param_ids [6]
    trained = [n for n, p in m.models.student.named_parameters() if p.requires_grad]
    assert trained == ["model.layers.1.mlp.down_proj.weight"]
    m = setup_method(RMU, trainable="all")
    assert all(p.requires_grad for p in m.models.student.parameters())


@pytest.mark.parametrize("options,message", [({"layer": 2}, "option 'layer': 2 is not a decoder layer"),
                                             ({"layer": -2}, "option 'layer': -2 is not a decoder layer"),
                                             ({"trainable": "nothing\\.matches"}, "matches no parameter name"),
                                             ({"trainable": "("}, "neither mlp, all nor a regex"),
                                             ({"steering_coeff": -1.0}, "'steering_coeff'"),
                                             ({"steering_scale": 0.0}, "'steering_scale'")])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        setup_method(RMU, **options)


def test_a_few_steps_steer_the_forget_activations_and_hold_the_retain_ones():
    original = trained_llama()
    method = RMU(head=LogitsHead(), layer=1, retain_weight=10.0, steering_coeff=4.0)
    student = train(method, Models(student=copy.deepcopy(original), reference=freeze(copy.deepcopy(original))),
                    TrainData(FORGET, RETAIN, collate()), TrainConfig(lr=2e-2, max_steps=8, batch_size=2,
                                                                      progress=False, seed=3))
    forget, retain = collate()(FORGET), collate()(RETAIN)
    control = method.control.view(1, 1, -1)

    def distances(model):
        with torch.no_grad():
            acts_f = ou.layer_output(model, model.model.layers[1], forget, grad=False)
            acts_r = ou.layer_output(model, model.model.layers[1], retain, grad=False)
            frozen_r = ou.layer_output(original, original.model.layers[1], retain, grad=False)
        return (float(ou.activation_loss(acts_f, control.expand_as(acts_f), forget["labels"] != -100)),
                float(ou.activation_loss(acts_r, frozen_r, retain["labels"] != -100)))
    forget_before, _ = distances(original)
    forget_after, retain_after = distances(student)
    print(f"forget MSE to c·u {forget_before:.4f} -> {forget_after:.4f}, retain MSE to frozen {retain_after:.5f}")
    assert forget_after < 0.85 * forget_before
    assert retain_after < 0.1 * forget_after
