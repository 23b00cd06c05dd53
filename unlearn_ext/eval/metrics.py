"""TOFU's metrics (arXiv 2401.06121) on per-sequence log-probabilities; no model here.

Inputs are what :mod:`unlearn_ext.eval.scoring` measures: for each answer, ℓ (the sum of
its tokens' log-probabilities given the question) and n (its number of tokens). Every
probability is length-normalised, ``P^{1/n} = exp(ℓ/n)``, as TOFU does, so long and short
answers compare.

- probability: ``exp(ℓ/n)`` of the true answer; on multiple-choice sets (real authors,
  world facts) ``P_true / (P_true + Σ_j P_perturbed_j)`` instead.
- truth ratio ``R = geomean_j P(perturbed_j)^{1/n_j} / P(paraphrased)^{1/n}``; reported
  as ``mean(min(R, 1/R))`` on the forget set and ``mean(max(0, 1 − R))`` elsewhere.
- forget quality: the KS-test p-value between the forget-set truth ratios of the
  unlearned model and of a model trained without the forget set.
- model utility: the harmonic mean of probability, ROUGE-L recall and truth ratio on the
  retain, real-authors and world-facts sets.
- Min-K % membership inference (arXiv 2310.16789): each answer scores the mean of its
  lowest k·n token log-probs; the AUC says how well that separates the forget set
  (trained on) from a holdout set (never seen): 0.5 = indistinguishable.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


def _check_same_shape(**tensors):
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match: {shapes}")


def _normalised_logprob(logprob: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """log P^{1/n} = ℓ/n (float64). Answers without tokens have no probability."""
    if bool((length <= 0).any()):
        raise ValueError("every answer needs at least one token (a length is 0)")
    return logprob.double() / length.double()


def answer_probability(logprob: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Per answer ``exp(ℓ/n)``: the geometric-mean probability of its tokens."""
    _check_same_shape(logprob=logprob, length=length)
    return _normalised_logprob(logprob, length).exp()


def option_probability(true_logprob: torch.Tensor, true_length: torch.Tensor, wrong_logprob: torch.Tensor,
                       wrong_length: torch.Tensor) -> torch.Tensor:
    """Per question ``P_true / (P_true + Σ_j P_wrong_j)`` with length-normalised
    probabilities; ``true_*`` are [B], ``wrong_*`` [B, K]. Computed as a softmax in log
    space, so tiny probabilities do not underflow to 0/0."""
    _check_same_shape(true_logprob=true_logprob, true_length=true_length)
    _check_same_shape(wrong_logprob=wrong_logprob, wrong_length=wrong_length)
    if wrong_logprob.dim() != 2 or wrong_logprob.shape[0] != true_logprob.shape[0]:
        raise ValueError(f"wrong_logprob must be [B, K] with B = {true_logprob.shape[0]}, "
                         f"got {tuple(wrong_logprob.shape)}")
    options = torch.cat([_normalised_logprob(true_logprob, true_length).unsqueeze(1),
                         _normalised_logprob(wrong_logprob, wrong_length)], dim=1)
    return options.softmax(dim=1)[:, 0]


def truth_ratio(paraphrased_logprob: torch.Tensor, paraphrased_length: torch.Tensor,
                perturbed_logprob: torch.Tensor, perturbed_length: torch.Tensor) -> torch.Tensor:
    """Per question ``R = geomean_j P(perturbed_j)^{1/n_j} / P(paraphrased)^{1/n}``;
    ``paraphrased_*`` are [B], ``perturbed_*`` [B, K]. R < 1: the model prefers the
    correct (paraphrased) answer."""
    _check_same_shape(paraphrased_logprob=paraphrased_logprob, paraphrased_length=paraphrased_length)
    _check_same_shape(perturbed_logprob=perturbed_logprob, perturbed_length=perturbed_length)
    if perturbed_logprob.dim() != 2 or perturbed_logprob.shape[0] != paraphrased_logprob.shape[0]:
        raise ValueError(f"perturbed_logprob must be [B, K] with B = {paraphrased_logprob.shape[0]}, "
                         f"got {tuple(perturbed_logprob.shape)}")
    perturbed = _normalised_logprob(perturbed_logprob, perturbed_length).mean(dim=1)
    return (perturbed - _normalised_logprob(paraphrased_logprob, paraphrased_length)).exp()


def truth_ratio_score(ratios: torch.Tensor, *, forget: bool) -> float:
    """TOFU's summary of truth ratios: ``mean(min(R, 1/R))`` on a forget set (1 = no
    preference between right and wrong answers), ``mean(max(0, 1 − R))`` elsewhere
    (1 = the right answer is far more likely)."""
    ratios = ratios.double()
    if forget:
        return float(torch.minimum(ratios, 1 / ratios).mean())
    return float((1 - ratios).clamp(min=0).mean())


_ROUGE = None


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each prediction against its reference (``rouge-score`` with
    Porter stemming, as TOFU): the share of the reference's words that appear, in order,
    in the prediction."""
    global _ROUGE
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if _ROUGE is None:
        from rouge_score import rouge_scorer
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [_ROUGE.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)]


def forget_quality(unlearned_ratios: Iterable[float], retain_model_ratios: Iterable[float]) -> dict[str, float]:
    """KS test between the forget-set truth ratios of the unlearned model and of the
    retain-only model: ``{"forget_quality": p-value, "ks_statistic": D}``. A high p-value
    (> 0.05) means the two are indistinguishable: the data looks never learnt."""
    from scipy.stats import ks_2samp
    a, b = [float(x) for x in unlearned_ratios], [float(x) for x in retain_model_ratios]
    if not a or not b:
        raise ValueError("forget_quality needs truth ratios from both models")
    result = ks_2samp(a, b)
    return {"forget_quality": float(result.pvalue), "ks_statistic": float(result.statistic)}


def model_utility(values: Iterable[float]) -> float:
    """Harmonic mean (TOFU: of probability, ROUGE and truth ratio on retain, real authors
    and world facts); 0 as soon as one value is 0."""
    values = [float(v) for v in values]
    if not values or any(math.isnan(v) or v < 0 for v in values):
        raise ValueError(f"model_utility needs non-negative numbers, got {values}")
    if min(values) == 0:
        return 0.0
    return len(values) / sum(1 / v for v in values)


def min_k_scores(token_logprob: torch.Tensor, mask: torch.Tensor, k: float = 0.4) -> torch.Tensor:
    """Per sequence, the mean of its ``max(1, floor(k·n))`` lowest token log-probs, n
    being its counted tokens (``mask``); [B, T] → [B] float64. Higher = more likely a
    training member. Sorting puts the uncounted positions last, so no loop over rows."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    _check_same_shape(token_logprob=token_logprob, mask=mask)
    mask = mask.bool()
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("every sequence needs at least one counted token")
    values = token_logprob.double().masked_fill(~mask, math.inf).sort(dim=1).values
    num_k = (counts.double() * k).floor().long().clamp(min=1)
    taken = torch.arange(values.shape[1], device=values.device) < num_k.unsqueeze(1)
    return values.masked_fill(~taken, 0).sum(dim=1) / num_k


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """Area under the ROC curve of ``score`` separating members from non-members:
    P(member > non-member) + ½·P(tie) (the Mann–Whitney statistic)."""
    from scipy.stats import rankdata
    m, h = list(member_scores), list(nonmember_scores)
    if not m or not h:
        raise ValueError("auc needs scores of both members and non-members")
    ranks = rankdata(m + h)  # average ranks: ties count one half
    return float((ranks[:len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(h)))
