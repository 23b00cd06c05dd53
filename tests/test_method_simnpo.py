"""SimNPO: (2/β)·softplus(−β(NLL_b/|y_b| − δ)) averaged over forget sequences + λ·NLL_retain."""
import pytest
import torch.nn.functional as F
from tiny_lm import assert_matches, cpu_backends, mean_nll, one_thread, seq_logprob, setup_method, shifted  # noqa: F401

from unlearn_ext.methods import SimNPO


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("beta,delta,lam", [(2.5, 0.0, 0.1375), (4.5, 0.3, 0.0)])
def test_simnpo(backend, beta, delta, lam):
    m = setup_method(SimNPO, backend=backend, reference=False, beta=beta, delta=delta, retain_weight=lam)
    s = m.models.student

    def formula(b):
        logp, n = seq_logprob(*shifted(s, b["forget"])[:2])
        value = (2 / beta * F.softplus(-beta * (-logp / n - delta))).mean()
        return value + lam * mean_nll(*shifted(s, b["retain"])[:2]) if lam else value
    assert_matches(m, formula)
    assert m.needs_retain() == bool(lam)
