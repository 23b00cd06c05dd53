"""NPO, NPO+RT, NPO+KL: (2/β)·softplus(β(ℓ_b − ℓ_b^ref)) averaged over forget sequences (+ retain term)."""
import pytest
import torch.nn.functional as F
from tiny_lm import (assert_matches, cpu_backends, mean_forward_kl, mean_nll, one_thread, seq_logprob,  # noqa: F401
                     setup_method, shifted)

from unlearn_ext.methods import NPO, NPOKL, NPORT


def npo_formula(s, ref, beta):
    def formula(b):
        logp, _ = seq_logprob(*shifted(s, b["forget"])[:2])
        ref_logp, _ = seq_logprob(*shifted(ref, b["forget"])[:2])
        return (2 / beta * F.softplus(beta * (logp - ref_logp.detach()))).mean()
    return formula


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo(backend, beta):
    m = setup_method(NPO, backend=backend, beta=beta)
    assert not m.needs_retain()
    assert_matches(m, npo_formula(m.models.student, m.models.reference, beta))


@pytest.mark.parametrize("backend", cpu_backends())
def test_npo_rt(backend):
    m = setup_method(NPORT, backend=backend, retain_weight=0.5)
    s, npo = m.models.student, npo_formula(m.models.student, m.models.reference, 0.1)
    assert_matches(m, lambda b: npo(b) + 0.5 * mean_nll(*shifted(s, b["retain"])[:2]))


@pytest.mark.parametrize("backend", cpu_backends())
def test_npo_kl(backend):
    m = setup_method(NPOKL, backend=backend)
    s, ref = m.models.student, m.models.reference
    npo = npo_formula(s, ref, 0.1)

    def formula(b):
        logits, labels, _ = shifted(s, b["retain"])
        return npo(b) + mean_forward_kl(logits, shifted(ref, b["retain"])[0], labels)
    assert_matches(m, formula)


def test_npo_at_the_reference_is_2_ln2_over_beta():
    """Where the student equals its reference every sequence contributes (2/β)·ln 2."""
    import math
    m = setup_method(NPO)
    m.models.student = m.models.reference
    loss, _ = m.loss(m._test_batch)
    assert abs(float(loss) - 2 / 0.1 * math.log(2)) < 1e-4
