"""GA: −NLL of the forget answers."""
import pytest
from tiny_lm import assert_matches, cpu_backends, mean_nll, one_thread, setup_method, shifted  # noqa: F401

from unlearn_ext.methods import GA


@pytest.mark.parametrize("backend", cpu_backends())
def test_ga_loss_is_negative_forget_nll(backend):
    m = setup_method(GA, backend=backend, reference=False)
    _, logs = assert_matches(m, lambda b: -mean_nll(*shifted(m.models.student, b["forget"])[:2]))
    assert logs["forget_nll"] > 0
