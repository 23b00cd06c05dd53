"""The peers' losses, re-expressed in plain PyTorch from their published code, to check that
ours give the same numbers on the same batch (tests/test_open_unlearning_parity.py,
test_method_rmu.py, test_method_idkdpo.py).

- open-unlearning (locuslab/open-unlearning): ``src/trainer/utils.py`` (``compute_kl_divergence``,
  ``compute_batch_nll``, ``compute_dpo_loss``, ``compute_undial_loss``) and the
  ``compute_loss`` of ``src/trainer/unlearn/{grad_ascent,grad_diff,npo,simnpo,undial,dpo,rmu}.py``;
  every loss is ``gamma·forget + alpha·retain``.
- the SimNPO authors (OPTML-Group/Unlearn-Simple): ``TOFU/dataloader.py``, loss type
  ``simnpo_grad_diff``: ``npo_coeff·forget + grad_diff_coeff·retain``.

Each function takes models and batches ({"input_ids", "attention_mask", "labels"}, labels
unshifted with −100 on prompt and padding) exactly as their trainers receive them; models
run in their own dtype, as theirs do. Nothing here is imported from the project.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _run(model, part):
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], labels=part["labels"])


def kl_every_position(model, ref_model, part):
    """``compute_kl_divergence``: KL(ref ‖ model) over every position of the [B·T, V] logits
    (prompt, padding and the last position included), ``batchmean`` = sum / (B·T)."""
    with torch.no_grad():
        ref = F.log_softmax(_run(ref_model, part).logits, -1)
    cur = F.log_softmax(_run(model, part).logits, -1)
    V = cur.shape[-1]
    return F.kl_div(cur.view(-1, V), ref.view(-1, V), reduction="batchmean", log_target=True)


def batch_nll(model, part):
    """``compute_batch_nll``: the summed NLL of each sequence's (shifted) answer tokens [B]."""
    logits = _run(model, part).logits[..., :-1, :]
    labels = part["labels"][..., 1:]
    return F.cross_entropy(logits.transpose(-1, -2), labels, ignore_index=-100, reduction="none").sum(-1)


def dpo(model, ref_model, win, lose, beta):
    """``compute_dpo_loss``: −(2/β)·mean logσ(β(win log-ratio − lose log-ratio)); a missing
    side has log-ratio 0 (NPO: ``win=None``)."""
    def log_ratio(part):
        if part is None:
            return 0.0
        with torch.no_grad():
            ref = batch_nll(ref_model, part)
        return -(batch_nll(model, part) - ref)
    return -2 / beta * F.logsigmoid(beta * (log_ratio(win) - log_ratio(lose))).mean()


def undial_every_position(model, ref_model, part, beta):
    """``compute_undial_loss``: soft-label CE to softmax(teacher − β·mask) over every shifted
    position; ``mask`` is set by indexing the vocabulary with the labels, so at ignored
    positions (label −100) the token V − 100 is lowered (IndexError when V < 100)."""
    logits = _run(model, part).logits[..., :-1, :]
    with torch.no_grad():
        teacher = ref_model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[..., :-1, :]
    labels = part["labels"][..., 1:]
    mask = torch.zeros_like(teacher)
    B, T = mask.shape[:2]
    mask[torch.arange(B).view(-1, 1, 1), torch.arange(T).view(1, -1, 1), labels.unsqueeze(-1)] = 1.0
    soft = F.softmax(teacher - mask * beta, -1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), soft.reshape(-1, soft.shape[-1]),
                           reduction="none").mean()


def retain_term(model, ref_model, part, kind):
    """``GradDiff.compute_retain_loss``: HF's mean NLL, or ``kl_every_position``."""
    return _run(model, part).loss if kind == "NLL" else kl_every_position(model, ref_model, part)


def grad_ascent_loss(model, batch):
    """``GradAscent.compute_loss``: −HF's mean NLL on the forget batch."""
    return -_run(model, batch["forget"]).loss


def graddiff_loss(model, ref_model, batch, *, gamma=1.0, alpha=1.0, retain_loss_type="NLL"):
    return gamma * -_run(model, batch["forget"]).loss + alpha * retain_term(model, ref_model, batch["retain"],
                                                                             retain_loss_type)


def npo_loss(model, ref_model, batch, *, beta=0.1, gamma=1.0, alpha=1.0, retain_loss_type="NLL"):
    forget = dpo(model, ref_model, None, batch["forget"], beta)
    return gamma * forget + alpha * retain_term(model, ref_model, batch["retain"], retain_loss_type)


def simnpo_loss(model, batch, *, beta=4.5, delta=0.0, gamma=0.125, alpha=1.0):
    """``SimNPO.compute_loss`` (open-unlearning; its defaults)."""
    part = batch["forget"]
    normalised = batch_nll(model, part) / (part["labels"] != -100).sum(-1) - delta
    forget = -F.logsigmoid(beta * normalised).mean() * 2 / beta
    return gamma * forget + alpha * _run(model, batch["retain"]).loss


def simnpo_authors_loss(model, batch, *, beta=2.5, gamma=0.0, npo_coeff=0.1375, grad_diff_coeff=1.0):
    """Unlearn-Simple's ``simnpo_grad_diff`` (its forget.yaml defaults; its ``gamma`` is δ)."""
    part = batch["forget"]
    normalised = batch_nll(model, part) / (part["labels"] != -100).sum(-1) - gamma
    forget = -F.logsigmoid(beta * normalised).mean() * 2 / beta
    return npo_coeff * forget + grad_diff_coeff * _run(model, batch["retain"]).loss


def undial_loss(model, ref_model, batch, *, beta=10.0, gamma=1.0, alpha=0.0):
    """``UNDIAL.compute_loss`` (its config's defaults; α·NLL retain)."""
    forget = undial_every_position(model, ref_model, batch["forget"], beta)
    return gamma * forget + alpha * _run(model, batch["retain"]).loss


def idk_dpo_loss(model, ref_model, batch, *, beta=0.1, gamma=1.0, alpha=1.0, retain_loss_type="NLL"):
    """``DPO.compute_loss`` on TOFU_QA_forget_idk: ``batch["forget"]`` holds "original" (the
    forget answer, rejected) and "alternate" (the refusal, preferred)."""
    forget = dpo(model, ref_model, batch["forget"]["alternate"], batch["forget"]["original"], beta)
    return gamma * forget + alpha * retain_term(model, ref_model, batch["retain"], retain_loss_type)


def layer_output(model, module, part, grad):
    """``RMU.forward_with_cache``: the output of ``module`` (first element of a tuple)."""
    cache = []
    handle = module.register_forward_hook(lambda m, i, o: cache.append(o[0] if isinstance(o, tuple) else o))
    with torch.set_grad_enabled(grad):
        _run(model, part)
    handle.remove()
    return cache[0]


def activation_loss(a, b, mask):
    """``RMU.compute_activation_loss``: elementwise squared error, mean over hidden units,
    summed over masked tokens, divided by the sequence's token count, mean over sequences."""
    sq = F.mse_loss(a, b, reduction="none")
    per_sequence = (sq * mask.unsqueeze(-1).expand_as(sq)).mean(dim=2).sum(dim=1)
    return (per_sequence / mask.sum(-1, keepdim=True)).mean()


def rmu_loss(model, ref_model, module, ref_module, control_vec, batch, *, gamma=1.0, alpha=1.0):
    """``RMU.compute_loss`` with ``retain_loss_type: EMBED_DIFF``; ``control_vec`` [1, 1, H]
    (theirs: rand(1, 1, H) normalised times ``steering_coeff``)."""
    forget, retain = batch["forget"], batch["retain"]
    acts = layer_output(model, module, forget, grad=True)
    forget_loss = activation_loss(acts, control_vec.to(acts.dtype).expand_as(acts), forget["labels"] != -100)
    student = layer_output(model, module, retain, grad=True)
    frozen = layer_output(ref_model, ref_module, retain, grad=False)
    retain_loss = activation_loss(student, frozen, retain["labels"] != -100)
    return gamma * forget_loss + alpha * retain_loss
