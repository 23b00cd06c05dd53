"""IdkDPO: DPO preferring an "I don't know" answer to the forget answer, + retain NLL.

TOFU's preference baseline (arXiv 2401.06121); open-unlearning's ``DPO`` trainer on
``TOFU_QA_forget_idk``, its "IdkDPO".

For each forget question, a refusal w (preferred) and the forget answer l (rejected):

    loss = w_f·(2/β)·mean_b softplus(−β((ℓ_w − ℓ_w^ref) − (ℓ_l − ℓ_l^ref))) + w_r·retain

ℓ the summed answer log-probabilities under the model and ℓ^ref under the frozen starting
model (the head's ``sequence_logprob``); −(2/β)·logσ(x) = (2/β)·softplus(−x). β = 0.1 and
w_f = w_r = 1 with a retain NLL: open-unlearning's ``DPO.yaml`` (``beta 0.1``, ``gamma 1``,
``alpha 1``, ``retain_loss_type NLL``) and the SimNPO authors' ``dpo_grad_diff`` (retain NLL
added with weight 1). open-unlearning's names: ``gamma`` = ``forget_weight``, ``alpha`` =
``retain_weight``, ``retain_loss_type`` = ``retain_loss``; ``masking: open_unlearning``
averages a KL retain term over every position, as it does.

Refusals: :data:`IDK_ANSWERS` (written for this project), or ``idk_file``, one answer per
line (open-unlearning's ``data/idk.jsonl`` reads as it is). One is drawn per forget example
at every step, as open-unlearning draws one each time it loads an example, from torch's
global generator, which the trainer seeds per step (so runs are reproducible and resumable).
The batch's forget examples are recognised by their prompt tokens (``prepare`` keeps the
question of each), so the refusal gets exactly the collator's prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..reference import IGNORE_INDEX
from .base import Method, masking_option, option

IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure about that.",
    "I don't have that information.",
    "I have no idea, sorry.",
    "I can't answer that.",
    "That is something I don't know.",
    "I'm afraid I don't know the answer.",
    "I have no information about that.",
    "Sorry, I can't help with that question.",
    "I don't know anything about that.",
    "I'm not able to say.",
    "I really couldn't tell you.",
    "That's beyond what I know.",
    "I don't have an answer to that.",
    "I'm unsure, I don't have the details.",
    "I can't recall anything about it.",
)


@dataclass
class IdkDPOOptions:
    beta: float = option(0.1, "inverse temperature β of the DPO loss")
    forget_weight: float = option(1.0, "w_f, weight of the DPO term")
    retain_weight: float = option(1.0, "w_r, weight of the retain term")
    retain_loss: str = option("nll", "retain term: nll, or kl = KL(reference || model) on retain answers",
                              ("nll", "kl"))
    masking: str = masking_option()
    idk_file: str = option("", "text file of refusals, one per line (default: the built-in list)")


def read_idk_answers(path: str) -> tuple[str, ...]:
    """The non-blank lines of ``path``, stripped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"option 'idk_file': {file} does not exist")
    answers = tuple(line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip())
    if not answers:
        raise ValueError(f"option 'idk_file': {file} holds no answer (one per line)")
    return answers


def prompt_keys(part: dict) -> list[tuple[int, ...]]:
    """Each row's prompt token ids (attended positions whose label is ignored)."""
    keep = (part["labels"] == IGNORE_INDEX) & (part["attention_mask"] != 0)
    return [tuple(ids[k].tolist()) for ids, k in zip(part["input_ids"].cpu(), keep.cpu())]


def questions_by_prompt(examples, collate) -> dict[tuple[int, ...], str]:
    """Each forget example's question, keyed by its prompt's tokens (``prompt_keys``), so a
    collated batch can be mapped back to the questions it holds."""
    questions: dict[tuple[int, ...], str] = {}
    for i in range(0, len(examples), 64):
        chunk = list(examples[i:i + 64])
        for key, example in zip(prompt_keys(collate(chunk)), chunk):
            questions[key] = example["question"]
    return questions


class IdkDPO(Method):
    name = "idkdpo"
    Options = IdkDPOOptions
    open_unlearning_names = {"gamma": "forget_weight", "alpha": "retain_weight", "retain_loss_type": "retain_loss"}

    def needs_reference(self):
        return True

    def prepare(self, models, data):
        super().prepare(models, data)
        self.idk_answers = read_idk_answers(self.options.idk_file) if self.options.idk_file else IDK_ANSWERS
        self.collate = data.collate
        self.questions = questions_by_prompt(data.forget, data.collate)

    def idk_part(self, forget: dict) -> dict:
        """The forget questions with a refusal drawn for each, collated on the batch's device."""
        try:
            questions = [self.questions[key] for key in prompt_keys(forget)]
        except KeyError:
            raise ValueError("idkdpo: a forget example of this batch is not one of the forget examples "
                             "`prepare` saw (their refusals pair with those questions)") from None
        picks = torch.randint(len(self.idk_answers), (len(questions),)).tolist()
        part = self.collate([{"question": q, "answer": self.idk_answers[i]} for q, i in zip(questions, picks)])
        return {k: v.to(forget["input_ids"].device) for k, v in part.items()}

    def loss(self, batch):
        o, forget = self.options, batch["forget"]
        idk = self.idk_part(forget)
        reference = self.models.reference
        win, _ = self.head.sequence_logprob(self.student(idk))
        lose, _ = self.head.sequence_logprob(self.student(forget))
        with torch.no_grad():
            win_ref, _ = self.head.sequence_logprob(self.frozen(reference, idk))
            lose_ref, _ = self.head.sequence_logprob(self.frozen(reference, forget))
        margin = (win - win_ref) - (lose - lose_ref)
        value = (2 / o.beta) * F.softplus(-o.beta * margin).mean()
        logs = {"dpo": value.detach(), "idk_logprob": win.detach().mean(), "forget_logprob": lose.detach().mean()}
        return self.add_retain(batch, o.forget_weight * value, logs, o.retain_loss, o.retain_weight, o.masking)
