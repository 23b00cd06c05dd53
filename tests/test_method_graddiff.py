"""GradDiff: −w_f·NLL_forget + w_r·(NLL or KL(ref ‖ θ))_retain."""
import pytest
from tiny_lm import (assert_matches, cpu_backends, mean_forward_kl, mean_nll, one_thread, setup_method,  # noqa: F401
                     shifted)

from unlearn_ext.methods import GradDiff


@pytest.mark.parametrize("backend", cpu_backends())
def test_graddiff_nll(backend):
    m = setup_method(GradDiff, backend=backend, forget_weight=0.7, retain_weight=1.3)
    s = m.models.student
    assert_matches(m, lambda b: -0.7 * mean_nll(*shifted(s, b["forget"])[:2]) + 1.3 * mean_nll(*shifted(s, b["retain"])[:2]))


@pytest.mark.parametrize("backend", cpu_backends())
def test_graddiff_kl(backend):
    m = setup_method(GradDiff, backend=backend, retain_loss="kl")
    s, ref = m.models.student, m.models.reference
    assert m.needs_reference()

    def formula(b):
        logits, labels, _ = shifted(s, b["retain"])
        return -mean_nll(*shifted(s, b["forget"])[:2]) + mean_forward_kl(logits, shifted(ref, b["retain"])[0], labels)
    assert_matches(m, formula)


def test_bad_retain_kind_is_rejected():
    with pytest.raises(ValueError, match="option 'retain_loss' must be one of 'nll', 'kl', got 'mse'"):
        GradDiff(retain_loss="mse")


def test_open_unlearning_names_are_pointed_to():
    with pytest.raises(ValueError, match="open-unlearning's 'gamma' is 'forget_weight' here"):
        GradDiff.make_options({"gamma": "1.0"})
    assert "[open-unlearning: alpha]" in GradDiff.describe()
