"""UnDIAL: soft-label CE to softmax(t − γ·onehot(y)) on forget answer tokens."""
import pytest
import torch
import torch.nn.functional as F
from tiny_lm import assert_matches, cpu_backends, mean_nll, one_thread, setup_method, shifted  # noqa: F401

from unlearn_ext.methods import UnDIAL


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("gamma,retain_weight", [(10.0, 0.0), (3.0, 0.5)])
def test_undial(backend, gamma, retain_weight):
    m = setup_method(UnDIAL, backend=backend, gamma=gamma, retain_weight=retain_weight)
    s, ref = m.models.student, m.models.reference

    def formula(b):
        logits, labels, _ = shifted(s, b["forget"])
        teacher = shifted(ref, b["forget"])[0].detach()
        mask = labels != -100
        adjusted = teacher - gamma * F.one_hot(labels.clamp(min=0), teacher.shape[-1]).double()
        ce = -(F.softmax(adjusted, -1) * F.log_softmax(logits, -1)).sum(-1)
        value = (ce * mask).sum() / mask.sum()
        return value + retain_weight * mean_nll(*shifted(s, b["retain"])[:2]) if retain_weight else value
    assert_matches(m, formula)


def test_undial_ignores_prompt_positions():
    """Changing the teacher's prompt logits changes nothing (only answer tokens count)."""
    m = setup_method(UnDIAL)
    b = m._test_batch
    base, _ = m.loss(b)
    forget = dict(b["forget"])
    forget["labels"] = forget["labels"].clone()
    forget["labels"][:, :3] = -100  # already ignored positions stay ignored
    again, _ = m.loss({**b, "forget": forget})
    assert torch.equal(base, again)
