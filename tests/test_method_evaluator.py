"""Evaluator-guided unlearning: evaluative model, bounded distance loss, cluster-mean positive loss, retain NLL."""
import pytest
import torch
import torch.nn.functional as F
from tiny_lm import (FORGET, RETAIN, assert_matches, collate, cpu_backends, mean_nll, one_thread,  # noqa: F401
                     setup_method, shifted)

from unlearn_ext.methods import EvaluatorGuided
from unlearn_ext.methods.evaluator import kmeans


def pool(hidden, labels):
    mask = (labels != -100).unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("backend", cpu_backends())
def test_evaluator_guided_loss(backend):
    m = setup_method(EvaluatorGuided, backend=backend, margin=1.5, negative_weight=0.7, positive_weight=1.3,
                     retain_weight=0.5)
    s, ref = m.models.student, m.models.reference

    def formula(b):
        _, labels, h_ref = shifted(ref, b["forget"], hidden=True)
        h_orig = pool(h_ref, labels).detach()
        flags = (m.evaluator(h_orig) > 0.5).double()
        _, _, h_s = shifted(s, b["forget"], hidden=True)
        h = pool(h_s, labels)
        d = 1 - F.cosine_similarity(h, h_orig, dim=-1)
        negative = (flags * torch.relu(1.5 - d)).sum() / flags.sum().clamp(min=1)
        c = m.centroids[(F.normalize(h.detach(), dim=-1) @ m.centroids.T).argmax(-1)]
        positive = (flags * (1 - F.cosine_similarity(h, c, dim=-1))).sum() / flags.sum().clamp(min=1)
        return 0.7 * negative + 1.3 * positive + 0.5 * mean_nll(*shifted(s, b["retain"])[:2])
    _, logs = assert_matches(m, formula)
    assert logs["flagged"] > 0  # the test exercises the forgetting terms


def test_the_evaluator_flags_forget_answers_not_retain_answers():
    m = setup_method(EvaluatorGuided)
    forget, retain = m._features(FORGET, collate()), m._features(RETAIN, collate())
    assert (m.evaluator(forget) > 0.5).all()
    assert (m.evaluator(retain) < 0.5).all()


def test_a_custom_evaluator_that_flags_nothing_leaves_only_the_retain_loss():
    m = setup_method(EvaluatorGuided, evaluator=lambda h: torch.zeros(h.shape[0]))
    loss, logs = m.loss(m._test_batch)
    assert float(logs["negative"]) == 0 and float(logs["positive"]) == 0 and float(logs["flagged"]) == 0
    torch.testing.assert_close(loss, logs["retain_nll"])


def test_kmeans_finds_separated_clusters(seed):
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(3, 8, generator=g), dim=1) * 10
    points = torch.cat([d + 0.1 * torch.randn(30, 8, generator=g) for d in directions])
    centroids = kmeans(points, 3, seed=seed)
    assert centroids.shape == (3, 8)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))
    matched = (F.normalize(directions, dim=1) @ centroids.T).max(1).values
    assert (matched > 0.99).all()
