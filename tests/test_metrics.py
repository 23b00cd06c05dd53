"""TOFU metrics on inputs whose value is known in closed form or by brute force."""
from __future__ import annotations

import math
import random

import pytest
import torch

from unlearn_ext.eval import metrics


def test_answer_probability_is_geometric_mean_token_probability():
    # ℓ = n·log p for an answer whose n tokens each have probability p.
    p = torch.tensor([0.5, 0.9, 1e-3])
    n = torch.tensor([2, 7, 40])
    got = metrics.answer_probability(n * p.double().log(), n)
    torch.testing.assert_close(got, p.double(), rtol=1e-12, atol=0)


def test_answer_probability_rejects_empty_answers_and_mismatched_shapes():
    with pytest.raises(ValueError, match="at least one token"):
        metrics.answer_probability(torch.tensor([-1.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shapes must match"):
        metrics.answer_probability(torch.tensor([-1.0, -2.0]), torch.tensor([1]))


def test_option_probability_normalises_over_options():
    # true: n=2, per-token 0.5; wrong: n=3, per-token 0.25 each → 0.5 / (0.5 + 0.25 + 0.25)
    true_lp, true_n = torch.tensor([2 * math.log(0.5)]), torch.tensor([2])
    wrong_lp, wrong_n = torch.full((1, 2), 3 * math.log(0.25)), torch.full((1, 2), 3)
    got = metrics.option_probability(true_lp, true_n, wrong_lp, wrong_n)
    torch.testing.assert_close(got, torch.tensor([0.5], dtype=torch.float64))


def test_option_probability_does_not_underflow():
    # Per-token probabilities of e^-5000 underflow in float64; the ratio is still 1/(K+1).
    got = metrics.option_probability(torch.tensor([-5000.0]), torch.tensor([1]), torch.full((1, 3), -5000.0),
                                     torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(got, torch.tensor([0.25], dtype=torch.float64))


def test_truth_ratio_closed_form():
    # paraphrased: per-token 0.5; perturbed: 0.25 and 0.0625 → geomean 0.125 → R = 0.25.
    para_lp, para_n = torch.tensor([3 * math.log(0.5)]), torch.tensor([3])
    pert_n = torch.tensor([[2, 5]])
    pert_lp = pert_n * torch.tensor([[math.log(0.25), math.log(0.0625)]])
    got = metrics.truth_ratio(para_lp, para_n, pert_lp, pert_n)
    torch.testing.assert_close(got, torch.tensor([0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        metrics.truth_ratio(para_lp, para_n, pert_lp[0], pert_n[0])


def test_truth_ratio_scores():
    ratios = torch.tensor([0.25, 4.0, 1.0])
    assert metrics.truth_ratio_score(ratios, forget=True) == pytest.approx((0.25 + 0.25 + 1) / 3)
    assert metrics.truth_ratio_score(ratios, forget=False) == pytest.approx((0.75 + 0 + 0) / 3)


def test_rouge_l_recall_known_values():
    refs = ["The cat sat on the mat.", "Paris", "Paris is the capital"]
    preds = ["the cat on mat", "Paris!", "Rome"]
    # LCS("the cat sat on the mat", "the cat on mat") = 4 of 6 reference words.
    assert metrics.rouge_l_recall(preds, refs) == pytest.approx([4 / 6, 1.0, 0.0])
    with pytest.raises(ValueError, match="predictions"):
        metrics.rouge_l_recall(["a"], [])


def test_forget_quality_ks_exact_p_value():
    # Two disjoint samples of 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1.
    got = metrics.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert got["ks_statistic"] == pytest.approx(1.0)
    assert got["forget_quality"] == pytest.approx(0.1)
    assert metrics.forget_quality([1.0, 2.0], [1.0, 2.0])["forget_quality"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.forget_quality([], [1.0])


def test_model_utility_harmonic_mean():
    assert metrics.model_utility([1.0, 0.5]) == pytest.approx(2 / 3)
    assert metrics.model_utility([0.3] * 9) == pytest.approx(0.3)
    assert metrics.model_utility([0.9, 0.0, 0.5]) == 0.0
    with pytest.raises(ValueError):
        metrics.model_utility([0.5, -0.1])
    with pytest.raises(ValueError):
        metrics.model_utility([float("nan")])


def _min_k_by_hand(values, k):
    values = sorted(values)
    num = max(1, int(len(values) * k))
    return sum(values[:num]) / num


def test_min_k_scores_closed_form():
    lp = torch.tensor([[-1.0, -5.0, -3.0, -2.0, 0.0], [-0.5, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    got = metrics.min_k_scores(lp, mask, k=0.5)
    torch.testing.assert_close(got, torch.tensor([-4.0, -0.5], dtype=torch.float64))


@pytest.mark.parametrize("k", [0.1, 0.2, 0.4, 1.0])
def test_min_k_scores_match_brute_force(seed, k):
    lp = -torch.rand(6, 13) * 10
    mask = torch.rand(6, 13) < 0.7
    mask[:, 0] = True
    expected = [_min_k_by_hand(lp[i][mask[i]].tolist(), k) for i in range(6)]
    torch.testing.assert_close(metrics.min_k_scores(lp, mask, k), torch.tensor(expected, dtype=torch.float64))


def test_min_k_scores_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        metrics.min_k_scores(torch.zeros(1, 2), torch.ones(1, 2), k=0)
    with pytest.raises(ValueError, match="at least one counted"):
        metrics.min_k_scores(torch.zeros(1, 2), torch.zeros(1, 2), k=0.5)


def test_auc_known_values():
    assert metrics.auc([3, 4], [1, 2]) == 1.0
    assert metrics.auc([1, 2], [3, 4]) == 0.0
    assert metrics.auc([1, 1], [1, 1, 1]) == 0.5
    assert metrics.auc([1, 3], [2]) == 0.5


def test_auc_matches_pairwise_count(seed):
    rng = random.Random(seed)
    members = [rng.randint(0, 20) for _ in range(30)]  # integers: ties happen
    others = [rng.randint(0, 20) for _ in range(25)]
    pairs = sum((m > h) + 0.5 * (m == h) for m in members for h in others)
    assert metrics.auc(members, others) == pytest.approx(pairs / (len(members) * len(others)))
