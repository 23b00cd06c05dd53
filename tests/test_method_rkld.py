"""RKLD: KL(student ‖ softmax(o − α·relu(a − o))) on forget answer tokens; prepare builds the augmented model."""
import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import (FORGET, RETAIN, answer_nll, assert_matches, collate, cpu_backends, one_thread,  # noqa: F401
                     perturbed, setup_method, shifted, trained_llama)

from unlearn_ext.methods import RKLD, LogitsHead, Method, Models, PrepareData, freeze
from unlearn_ext.trainer import TrainConfig


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("alpha", [8.0, 1.0])
def test_rkld_loss(backend, alpha, monkeypatch):
    # The loss with a given augmented model (here: another perturbation of the original).
    monkeypatch.setattr(RKLD, "prepare", Method.prepare)
    m = setup_method(RKLD, backend=backend, alpha=alpha)
    m.models.extra["augmented"] = freeze(perturbed(copy.deepcopy(m.models.reference), 0.05, seed=7))
    s, ref, aug = m.models.student, m.models.reference, m.models.extra["augmented"]

    def formula(b):
        logits, labels, _ = shifted(s, b["forget"])
        o, a = shifted(ref, b["forget"])[0].detach(), shifted(aug, b["forget"])[0].detach()
        teacher = o - alpha * torch.relu(a - o)
        kl = (F.softmax(logits, -1) * (F.log_softmax(logits, -1) - F.log_softmax(teacher, -1))).sum(-1)
        mask = labels != -100
        return (kl * mask).sum() / mask.sum()
    assert_matches(m, formula)


def test_prepare_fine_tunes_the_augmented_model_on_the_forget_set():
    original = perturbed(trained_llama(), 0.05, seed=3)  # forgetful enough for more training to show
    method = RKLD(head=LogitsHead(), augment_epochs=4, augment_lr=3e-3)
    models = Models(student=copy.deepcopy(original), reference=freeze(copy.deepcopy(original)))
    method.prepare(models, PrepareData(FORGET, RETAIN, collate(),
                                       train_config=TrainConfig(batch_size=2, progress=False), seed=0))
    augmented = models.extra["augmented"]
    assert not any(p.requires_grad for p in augmented.parameters()) and not augmented.training
    assert answer_nll(augmented, FORGET) < 0.8 * answer_nll(original, FORGET)
    # the reference and the student are untouched
    for p, q in zip(models.reference.parameters(), original.parameters()):
        assert torch.equal(p, q)
