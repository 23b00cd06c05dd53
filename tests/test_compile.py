"""torch.compile traces models that use our losses without graph breaks (the C++ ops have
fake implementations), and the compiled step computes what the eager step does."""
import pytest
import torch

import unlearn_ext as ue

pytestmark = pytest.mark.skipif(not ue.backends()["cpu"].available, reason="needs the C++ CPU extension")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Overrides conftest's poisoning: compile must work in the configuration users run
    (poisoned buffers skip the huge-page advice, which once broke tracing)."""
    monkeypatch.delenv("UNLEARN_EXT_POISON", raising=False)


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
