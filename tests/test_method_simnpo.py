"""SimNPO: γ·(2/β)·softplus(−β(NLL_b/|y_b| − δ)) averaged over forget sequences + α·NLL_retain."""
import warnings

import pytest
import torch.nn.functional as F
from tiny_lm import assert_matches, cpu_backends, mean_nll, one_thread, seq_logprob, setup_method, shifted  # noqa: F401

from unlearn_ext.methods import SimNPO


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("beta,delta,gamma,alpha", [(2.5, 0.0, 0.1375, 1.0), (4.5, 0.3, 0.125, 0.0)])
def test_simnpo(backend, beta, delta, gamma, alpha):
    m = setup_method(SimNPO, backend=backend, reference=False, beta=beta, delta=delta, forget_weight=gamma,
                     retain_weight=alpha)
    s = m.models.student

    def formula(b):
        logp, n = seq_logprob(*shifted(s, b["forget"])[:2])
        value = gamma * (2 / beta * F.softplus(-beta * (-logp / n - delta))).mean()
        return value + alpha * mean_nll(*shifted(s, b["retain"])[:2]) if alpha else value
    assert_matches(m, formula)
    assert m.needs_retain() == bool(alpha)


def test_the_weight_is_on_the_forget_term():
    """The authors' weights (Unlearn-Simple: npo_coeff 0.1375 on the forget term, grad_diff_coeff 1
    on the retain NLL) are the defaults."""
    o = SimNPO().options
    assert (o.forget_weight, o.retain_weight, o.beta, o.delta) == (0.1375, 1.0, 2.5, 0.0)


def test_a_config_from_before_the_fix_is_warned_about():
    with pytest.warns(UserWarning, match="retain_weight 0.1375 is the SimNPO authors' \\*forget\\* weight"):
        SimNPO(retain_weight=0.1375)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SimNPO()
