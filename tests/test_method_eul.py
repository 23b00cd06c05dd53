"""EUL: unlearning layers, the selective teacher-student objective, closed-form fusion."""
import math

import pytest
import torch
from tiny_lm import (FORGET, RETAIN, assert_matches, collate, cpu_backends, mean_forward_kl, mean_nll,  # noqa: F401
                     method_batch, one_thread, setup_method, shifted, tiny_llama)

from unlearn_ext import adapters
from unlearn_ext.methods import EUL


def randomise(layers, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layers.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cap", [0.0, 1e-3])
def test_eul_loss(backend, cap):
    m = setup_method(EUL, backend=backend, reference=False, forget_cap=cap)
    randomise(m.layers)
    s = m.models.student
    c = cap or math.log(s.config.vocab_size)
    assert m.cap == pytest.approx(c)

    def formula(b):
        with m.layers.disabled(), torch.no_grad():
            teacher_f, teacher_r = shifted(s, b["forget"])[0], shifted(s, b["retain"])[0]
        lf, yf, _ = shifted(s, b["forget"])
        lr, yr, _ = shifted(s, b["retain"])
        return (0.8 * mean_forward_kl(lr, teacher_r, yr) - mean_forward_kl(lf, teacher_f, yf).clamp(max=c)
                + mean_nll(lr, yr) - 0.2 * mean_nll(lf, yf).clamp(max=c))
    assert_matches(m, formula)


def test_only_the_unlearning_layers_train_and_start_as_identity():
    model = tiny_llama()
    batch = method_batch()["forget"]
    before = model(**batch).logits
    m = setup_method(EUL, reference=False)
    names = {n for n, p in m.models.student.named_parameters() if p.requires_grad}
    assert names and all(adapters.is_adapter_key(n) for n in names)
    assert len(m.layers.layers) == m.models.student.config.num_hidden_layers
    fresh = tiny_llama()
    adapters.attach_unlearning_layers(fresh, 4)
    torch.testing.assert_close(fresh(**batch).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already has unlearning layers"):
        adapters.attach_unlearning_layers(fresh, 4)


def test_fusion_is_the_least_squares_solution_of_the_stacked_problem(seed):
    """min_W Σ_i ‖X̃_i W − X̃_i W̃_i‖² solved by lstsq on the stacked rows equals fuse() with ρ = 0."""
    g = torch.Generator().manual_seed(seed)
    hidden, bottleneck, requests = 6, 3, 3
    states, grams, xs = [], [], []
    for i in range(requests):
        layers = adapters.UnlearningLayers(hidden, bottleneck, num_layers=1)
        randomise(layers, seed=seed + i, scale=1.0)
        x_down = torch.randn(20 + 5 * i, hidden, generator=g, dtype=torch.float64)
        x_up = torch.randn(20 + 5 * i, bottleneck, generator=g, dtype=torch.float64)
        ones = torch.ones(x_down.shape[0], 1, dtype=torch.float64)
        states.append(layers.state_dict())
        xs.append({"layers.0.down": torch.cat([x_down, ones], 1), "layers.0.up": torch.cat([x_up, ones], 1)})
        grams.append({k: x.T @ x for k, x in xs[-1].items()})
    fused = adapters.fuse(states, grams, ridge=0.0)
    for name in ("layers.0.down", "layers.0.up"):
        stacked_x = torch.cat([x[name] for x in xs])
        targets = torch.cat([x[name] @ torch.cat([s[f"{name}.weight"].double().T, s[f"{name}.bias"].double()[None]])
                             for x, s in zip(xs, states)])
        solution = torch.linalg.lstsq(stacked_x, targets).solution
        torch.testing.assert_close(fused[f"{name}.weight"].double(), solution[:-1].T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused[f"{name}.bias"].double(), solution[-1], rtol=1e-5, atol=1e-5)
    # one request fuses to itself; the ridge term shrinks toward 0
    alone = adapters.fuse(states[:1], grams[:1], ridge=0.0)
    torch.testing.assert_close(alone["layers.0.up.weight"], states[0]["layers.0.up.weight"], rtol=1e-5, atol=1e-5)
    shrunk = adapters.fuse(states[:1], grams[:1], ridge=10.0)
    assert shrunk["layers.0.up.weight"].norm() < states[0]["layers.0.up.weight"].norm()


def test_collected_grams_are_the_layer_inputs_on_non_padding_tokens():
    m = setup_method(EUL, reference=False)
    randomise(m.layers)
    batch = method_batch()["forget"]
    seen = {}
    hooks = [m.layers.layers[0].up.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))]
    with torch.no_grad():
        m.models.student(**batch)
    hooks[0].remove()
    x = seen["x"][batch["attention_mask"].bool()].double()
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    grams = adapters.collect_grams(m.models.student, m.layers, [batch])
    torch.testing.assert_close(grams["layers.0.up"], x.T @ x)
    assert set(grams) == {f"layers.{i}.{p}" for i in range(2) for p in ("down", "up")}


def test_sequential_requests_fuse_in_finish(tmp_path):
    """Request 1 saves its layers and Grams; request 2 fuses with it; the result is fuse()."""
    first = setup_method(EUL, reference=False)
    randomise(first.layers, seed=1)
    first.finish(tmp_path / "r1")
    second = setup_method(EUL, reference=False, fuse_with=str(tmp_path / "r1"))
    randomise(second.layers, seed=2)
    own = {k: v.clone() for k, v in second.layers.state_dict().items()}
    second.finish(tmp_path / "r2")
    from safetensors.torch import load_file
    expected = adapters.fuse([own, load_file(str(tmp_path / "r1/eul/layers.safetensors"))],
                             [load_file(str(tmp_path / "r2/eul/grams.safetensors")),
                              load_file(str(tmp_path / "r1/eul/grams.safetensors"))])
    for k, v in second.layers.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    with pytest.raises(FileNotFoundError, match="holds no EUL request"):
        setup_method(EUL, reference=False, fuse_with=str(tmp_path / "nowhere"))


def test_saved_layers_reload(tmp_path):
    m = setup_method(EUL, reference=False)
    randomise(m.layers)
    batch = method_batch()["forget"]
    with torch.no_grad():
        want = m.models.student(**batch).logits
    adapters.save_unlearning_layers(m.models.student, tmp_path)
    fresh = tiny_llama()
    fresh.load_state_dict({k: v for k, v in m.models.student.state_dict().items() if not adapters.is_adapter_key(k)})
    adapters.load_unlearning_layers(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, want)
