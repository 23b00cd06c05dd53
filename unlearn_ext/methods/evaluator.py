"""Evaluator-guided unlearning ("Machine Unlearning in Large Language Models", arXiv 2404.16841).

The paper describes a framework — an evaluative model that decides what must be
unlearned, a negative loss on it, a positive loss toward acceptable outputs — and
publishes neither code nor loss formulas. This is the project's concrete version:

1. **Evaluative model.** A logistic-regression classifier on the *original* model's
   representation of a (prompt, response) pair: its last hidden state mean-pooled over the
   positions that predict the response tokens. Trained in ``prepare`` (full batch,
   standardised features, fixed step count: deterministic) from labelled pairs: by default
   the forget answers are positives (1) and retain answers (up to 1024) and acceptable
   answers are negatives (0); ``evaluator_data`` (a JSON/JSONL file of {"question", "answer",
   "label"}) replaces them. Any callable mapping pooled original-model features [B, H] to
   probabilities [B] can replace it (``EvaluatorGuided(evaluator=...)``). Pairs scoring
   above ``threshold`` are *flagged*; the forgetting losses apply to flagged pairs only.
2. **Negative (distance) loss** on a flagged pair (x, y): ``relu(m − d)`` with
   ``d = (NLL_θ(y|x) − NLL_orig(y|x)) / |y|``, how far the model's likelihood of the flagged
   response has moved from the original model's, in nats per token (m = ``margin``). It
   ascends the response's NLL until the response is m nats per token less likely than it
   was — its answer probability exp(−NLL/|y|) at most e^−m times the original's — and then
   stops: a bounded loss that cannot run away like gradient ascent.
3. **Positive loss** on a flagged pair: the NLL of the replacement response given x, so that
   greedy decoding produces it. The replacement is the acceptable answer given for x in the
   ``acceptable`` file (e.g. a corrected answer) when there is one; otherwise the
   representative (the member nearest the centroid) of the nearest — to the model's current
   pooled representation of the response — of ``clusters`` k-means clusters of the original
   model's representations of acceptable answers: refusals by default (a built-in list).
4. **Retain NLL** (weight ``retain_weight``) keeps the rest of the model's behaviour.

(Before, both forgetting terms were cosine distances between pooled hidden states: the
model satisfied them by moving a direction the LM head barely reads, and on SmolLM2 the
flagged answers' likelihood did not drop — issue 16. The representations still pick the
flags and the cluster; the losses now act on the likelihoods the answers come from.)
K-means uses k-means++ seeding from the run's seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import read_records
from .base import Method, option
from .head import Outputs
from .idkdpo import prompt_keys, questions_by_prompt

REFUSALS = (
    "I'm sorry, but I don't have any information about that.",
    "I can't help with that question.",
    "I don't know the answer to that.",
    "That is not something I am able to share.",
    "I have no reliable information on this topic.",
    "I'm not able to answer that.",
)


@dataclass
class EvaluatorGuidedOptions:
    margin: float = option(2.0, "m, nats per token: the distance loss stops once a flagged response's mean NLL is m "
                                "above the original model's (its answer probability e^-m times the original's)")
    negative_weight: float = option(1.0, "weight of the distance loss")
    positive_weight: float = option(1.0, "weight of the NLL of the replacement response (corrected answer, or the "
                                         "nearest acceptable-answer cluster's representative)")
    retain_weight: float = option(1.0, "weight of the retain NLL")
    clusters: int = option(4, "k of the k-means over acceptable-answer representations")
    threshold: float = option(0.5, "evaluator probability above which a pair is flagged")
    evaluator_data: str = option("", "JSON/JSONL of {question, answer, label} to train the evaluator on "
                                     "(default: forget = 1, retain and acceptable = 0)")
    acceptable: str = option("", "JSON/JSONL of {question, answer} acceptable answers (default: refusals)")
    evaluator_steps: int = option(300, "full-batch gradient steps of the logistic regression")


def pooled(out: Outputs) -> torch.Tensor:
    """Mean of the last hidden state over the positions that predict answer tokens: [B, H]."""
    mask = out.answer_mask.unsqueeze(-1).to(out.hidden.dtype)
    return (out.hidden * mask).sum(1).float() / mask.sum(1).clamp(min=1).float()


class LogisticEvaluator:
    """p(unlearn | features) = sigmoid(w·standardise(x) + b), fitted by full-batch Adam."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 0.05,
                 weight_decay: float = 1e-3):
        if labels.unique().numel() != 2:
            raise ValueError("the evaluator needs labelled examples of both classes (0 and 1)")
        x = features.double()
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-6)
        x = (x - self.mean) / self.std
        self.w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
        self.b = torch.zeros((), dtype=x.dtype, requires_grad=True)
        opt = torch.optim.Adam([self.w, self.b], lr=lr)
        y = labels.double()
        for _ in range(steps):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ self.w + self.b, y) + weight_decay * self.w.square().sum()
            loss.backward()
            opt.step()
        self.w, self.b = self.w.detach(), self.b.detach()

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.double().cpu() - self.mean) / self.std
        return torch.sigmoid(x @ self.w + self.b).to(features.device)


def kmeans(points: torch.Tensor, k: int, seed: int, iters: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on cosine geometry (unit vectors); [k, H] centroids."""
    x = F.normalize(points.double(), dim=1)
    k = min(k, x.shape[0])
    g = torch.Generator().manual_seed(seed)
    centroids = [x[torch.randint(x.shape[0], (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d = (1 - x @ torch.stack(centroids).T).clamp(min=0).min(1).values
        pick = torch.multinomial(d + 1e-12, 1, generator=g) if d.sum() > 0 else torch.randint(x.shape[0], (1,),
                                                                                              generator=g)
        centroids.append(x[pick].squeeze(0))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        new = torch.stack([F.normalize(x[assign == j].mean(0), dim=0) if (assign == j).any() else c[j]
                           for j in range(k)])
        if torch.equal(new, c):
            break
        c = new
    return c.float()


class EvaluatorGuided(Method):
    name = "evaluator"
    Options = EvaluatorGuidedOptions

    def __init__(self, options=None, *, head=None, evaluator: Callable | None = None, **kwargs):
        super().__init__(options, head=head, **kwargs)
        self.evaluator = evaluator

    def needs_reference(self):
        return True

    @torch.no_grad()
    def _features(self, examples, collate, batch_size=16) -> torch.Tensor:
        model = self.models.reference
        device = next(model.parameters()).device
        chunks = []
        for i in range(0, len(examples), batch_size):
            part = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
            chunks.append(pooled(self.head.run(model, part, hidden=True)).cpu())
        return torch.cat(chunks)

    def prepare(self, models, data):
        super().prepare(models, data)
        o = self.options
        # Corrected answers (an acceptable file) replace the answer to their own question; the
        # built-in refusals are generic: paired with the forget questions only to be embedded.
        if o.acceptable:
            acceptable = [{"question": r["question"], "answer": r["answer"]}
                          for r in read_records(o.acceptable, ("question", "answer"))]
            self.corrections = {r["question"]: r["answer"] for r in acceptable}
        else:
            acceptable = [{"question": ex["question"], "answer": REFUSALS[i % len(REFUSALS)]}
                          for i, ex in enumerate(data.forget[:256])]
            self.corrections = {}
        acceptable_features = self._features(acceptable, data.collate)
        self.centroids = kmeans(acceptable_features, o.clusters, seed=data.seed)
        nearest = (F.normalize(acceptable_features, dim=1) @ self.centroids.T).argmax(0)  # each centroid's member
        self.representatives = [acceptable[int(i)]["answer"] for i in nearest]
        self.collate = data.collate
        self.questions = questions_by_prompt(data.forget, data.collate)
        if self.evaluator is None:
            if o.evaluator_data:
                labelled = read_records(o.evaluator_data, ("question", "answer", "label"))
                features = self._features(labelled, data.collate)
                labels = torch.tensor([float(r["label"]) for r in labelled])
            else:
                negatives = list(data.retain or [])[:max(len(data.forget), 1024)]
                parts = [self._features(list(data.forget), data.collate), acceptable_features]
                if negatives:
                    parts.append(self._features(negatives, data.collate))
                features = torch.cat(parts)
                labels = torch.cat([torch.ones(len(data.forget)), torch.zeros(features.shape[0] - len(data.forget))])
            self.evaluator = LogisticEvaluator(features, labels, steps=o.evaluator_steps)

    def replacements(self, forget: dict, rows: list[int], h: torch.Tensor) -> dict:
        """The flagged ``rows`` of ``forget`` with their replacement responses, collated on the
        batch's device: the question's corrected answer, else the representative of the
        acceptable-answer cluster nearest to ``h`` (the model's pooled representations [B, H])."""
        keys = prompt_keys(forget)
        try:
            questions = [self.questions[keys[r]] for r in rows]
        except KeyError:
            raise ValueError("evaluator: a forget example of this batch is not one of the forget examples "
                             "`prepare` saw (their replacements pair with those questions)") from None
        cluster = (F.normalize(h.detach().float(), dim=-1) @ self.centroids.to(h.device).T).argmax(-1).tolist()
        answers = [self.corrections.get(q, self.representatives[cluster[r]]) for q, r in zip(questions, rows)]
        part = self.collate([{"question": q, "answer": a} for q, a in zip(questions, answers)])
        return {k: v.to(forget["input_ids"].device) for k, v in part.items()}

    def loss(self, batch):
        o = self.options
        forget = batch["forget"]
        original = self.frozen(self.models.reference, forget, hidden=True)
        flags = (self.evaluator(pooled(original)) > o.threshold).float()
        out = self.student(forget, hidden=True)
        logprob, length = self.head.sequence_logprob(out)
        with torch.no_grad():
            logprob_orig, _ = self.head.sequence_logprob(original)
        distance = (logprob_orig - logprob) / length.clamp(min=1)  # NLL_θ − NLL_orig, nats per token
        count = flags.sum().clamp(min=1)
        negative = (flags * F.relu(o.margin - distance)).sum() / count
        rows = flags.nonzero().flatten().tolist()
        positive = (self.head.cross_entropy(self.student(self.replacements(forget, rows, pooled(out))))
                    if rows and o.positive_weight != 0 else negative.new_zeros(()))
        value = o.negative_weight * negative + o.positive_weight * positive
        logs = {"negative": negative.detach(), "positive": positive.detach(), "flagged": flags.mean(),
                "distance": ((flags * distance).sum() / count).detach()}
        return self.add_retain(batch, value, logs, "nll", o.retain_weight)
