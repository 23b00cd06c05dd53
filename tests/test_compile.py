"""torch.compile traces models that use our losses without graph breaks (the C++ ops have
fake implementations), and the compiled step computes what the eager step does."""
import pytest
import torch

import unlearn_ext as ue

# as_users_run: no poisoned buffers (they skip the huge-page advice, which once broke tracing).
pytestmark = [pytest.mark.skipif(not ue.backends()["cpu"].available, reason="needs the C++ CPU extension"),
              pytest.mark.as_users_run]


def test_issue_repro_compiles_with_the_default_backend(seed):
    torch._dynamo.reset()
    head = torch.nn.Linear(16, 97)
    f = torch.compile(lambda h, y: ue.cross_entropy(head(h), y), fullgraph=True, backend="aot_eager")
    hidden, labels = torch.randn(2, 6, 16), torch.randint(0, 97, (2, 6))
    loss = f(hidden, labels)
    (grad,) = torch.autograd.grad(loss, head.weight)
    eager = ue.cross_entropy(head(hidden), labels)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, torch.autograd.grad(eager, head.weight)[0])


def step(head, hidden, labels, teacher, original, augmented):
    logits = head(hidden)
    shifted, targets = logits[:, :-1], labels[:, 1:]
    return (ue.cross_entropy(shifted, targets)
            + ue.token_logprob(shifted, targets, reduction="sum") * 1e-3
            + ue.forward_kl(shifted, teacher[:, :-1], targets)
            + ue.reverse_kl(shifted, teacher[:, :-1], targets, temperature=2.0)
            + ue.rkld(shifted, original[:, :-1], augmented[:, :-1], targets)
            + ue.undial(shifted, teacher[:, :-1], targets, gamma=3.0)
            + ue.npo_loss(shifted, targets, torch.full((hidden.shape[0],), -30.0)))


# aot_eager runs Dynamo, AOT autograd and the fake kernels — everything a graph break or a
# missing fake would show; inductor adds only its own code generation (minutes on 2 cores).
@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_compiled_step_matches_eager_without_graph_breaks(compiler, seed):
    torch._dynamo.reset()
    b, t, h, v = 2, 6, 16, 97
    head = torch.nn.Linear(h, v)
    hidden = torch.randn(b, t, h)
    labels = torch.randint(0, v, (b, t))
    labels[:, :2] = -100
    teacher, original, augmented = (torch.randn(b, t, v) for _ in range(3))

    eager = step(head, hidden, labels, teacher, original, augmented)
    eager_grads = torch.autograd.grad(eager, list(head.parameters()))
    compiled = torch.compile(step, fullgraph=True, backend=compiler)  # fullgraph: a graph break raises
    loss = compiled(head, hidden, labels, teacher, original, augmented)
    grads = torch.autograd.grad(loss, list(head.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ---- fused-linear losses -------------------------------------------------------------------------
# Each compiled with fullgraph=True (a graph break raises) against eager, values and the
# gradients of hidden, weight and bias. Under torch.compile they take their data-independent
# path (every row read, ignored rows zeroed by the kernels; sequence chunks from the shape).

B, T, H, V = 2, 5, 8, 33


def _fused_cases():
    y = torch.randint(0, V, (B, T))
    y[0, :2] = -100
    ref = torch.randn(B) - 20
    seq = torch.arange(B).repeat_interleave(T)
    t = ue.LMHeadInputs(torch.randn(B, T, H), torch.randn(V, H) / H**0.5)
    r_hidden = torch.randn(B, T, H)
    ry = torch.randint(0, V, (B, T))
    return {
        "token_logprob": lambda h, w, b, k: ue.fused_linear_token_logprob(h, w, y, bias=b, **k).sum(),
        "cross_entropy": lambda h, w, b, k: ue.fused_linear_cross_entropy(h, w, y, bias=b, **k),
        "cross_entropy_none": lambda h, w, b, k: ue.fused_linear_cross_entropy(h, w, y, bias=b, reduction="none",
                                                                               **k).sum(),
        "cross_entropy_softcap": lambda h, w, b, k: ue.fused_linear_cross_entropy(h, w, y, bias=b, softcap=5.0, **k),
        "forward_kl": lambda h, w, b, k: ue.fused_linear_forward_kl(h, w, t, y, bias=b, **k),
        "forward_kl_sum": lambda h, w, b, k: ue.fused_linear_forward_kl(h, w, t, bias=b, reduction="sum", **k),
        "reverse_kl": lambda h, w, b, k: ue.fused_linear_reverse_kl(h, w, t, y, bias=b, temperature=2.0, **k),
        "rkld": lambda h, w, b, k: ue.fused_linear_rkld(h, w, t, t, y, bias=b, **k),
        "undial": lambda h, w, b, k: ue.fused_linear_undial(h, w, t, y, bias=b, **k),
        "jsd": lambda h, w, b, k: ue.fused_linear_jsd(h, w, t, y, bias=b, beta=0.3, **k),
        "cross_entropy_smoothing_z_loss": lambda h, w, b, k: ue.fused_linear_cross_entropy(
            h, w, y, bias=b, label_smoothing=0.1, lse_square_scale=1e-3, **k),
        "sequence_logprob": lambda h, w, b, k: ue.fused_linear_sequence_logprob(h, w, y, bias=b, **k)[0].sum(),
        "ga": lambda h, w, b, k: ue.fused_linear_ga(h, w, y, bias=b, **k),
        "retain_kl": lambda h, w, b, k: ue.fused_linear_retain(h, w, y, t, bias=b, **k),
        "graddiff": lambda h, w, b, k: ue.fused_linear_graddiff(h, w, y, r_hidden, ry, bias=b, **k),
        "npo": lambda h, w, b, k: ue.fused_linear_npo(h, w, y, ref, bias=b, **k),
        "npo_two_pass": lambda h, w, b, k: ue.fused_linear_npo(h, w, y, ref, bias=b, **{**k, "chunk_size": 3}),
        "npo_packed": lambda h, w, b, k: ue.fused_linear_npo(h.reshape(B * T, H), w, y.reshape(-1), ref, seq,
                                                             num_sequences=B, bias=b, **k),
        "npo_rt": lambda h, w, b, k: ue.fused_linear_npo_rt(h, w, y, ref, r_hidden, ry, bias=b, **k),
        "npo_kl": lambda h, w, b, k: ue.fused_linear_npo_kl(h, w, y, ref, r_hidden, ry, t, bias=b, **k),
        "simnpo": lambda h, w, b, k: ue.fused_linear_simnpo(h, w, y, bias=b, **k),
    }


FUSED_NAMES = sorted(_fused_cases())


# The torch backend: one case per kind of upstream gradient (constant, per row, per sequence).
@pytest.mark.parametrize("name,backend", [(n, "cpu") for n in FUSED_NAMES]
                         + [(n, "torch") for n in ("cross_entropy", "cross_entropy_none", "npo")])
def test_fused_linear_loss_compiles_with_fullgraph(name, backend, seed):
    torch._dynamo.reset()
    fn = _fused_cases()[name]
    kw = dict(backend=backend, chunk_size=16)
    leaves = [torch.randn(B, T, H), torch.randn(V, H) / H**0.5, torch.randn(V) * 0.1]
    results = []
    for run in (lambda *a: fn(*a, kw), torch.compile(lambda *a: fn(*a, kw), fullgraph=True, backend="aot_eager")):
        args = [x.clone().requires_grad_(True) for x in leaves]
        loss = run(*args)
        results.append((loss.detach(), *torch.autograd.grad(loss * 1.7, args)))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
