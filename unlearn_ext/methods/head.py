"""How a method's losses reach the LM head: the one seam between methods and the two loss paths.

A method never calls a model or a loss op directly. It asks a *head* to run a model on one
part of a batch (``head.run``) and gets :class:`Outputs`; it then asks the head for losses
over those outputs (``head.cross_entropy(out)``, ``head.forward_kl(out, teacher)``, …).
Two heads implement the same methods:

- :class:`LogitsHead` runs the whole model and passes the materialised logits to
  :mod:`unlearn_ext.ops` (always available; ``fused: false`` / ``--no-fused``).
- :class:`FusedLinearHead` runs the model up to its last hidden state and passes
  (hidden states, LM-head weight, bias) to ``unlearn_ext.fused_linear_<op>``, so the
  ``[N, V]`` logits are never held (DESIGN.md, "Fused-linear variants"). It is the default
  (:func:`make_head`), under DDP and FSDP too: the trainer runs ``method.loss`` inside the
  forward of the module it wraps (:class:`unlearn_ext.distributed.LossForward`), so a head
  always runs the bare model, from inside that forward.

Causal-LM shifting happens here, once: outputs hold positions ``[:, :-1]`` of the model
(views, no copy) and ``labels[:, 1:]``, so position t predicts label t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import fused_linear as fl
from .. import ops
from ..fused_linear._plan import check_chunk_size
from ..models.lm_head import lm_head_inputs
from ..reference import IGNORE_INDEX


@dataclass
class Outputs:
    """A model's outputs on one batch part, shifted so that position t predicts ``labels[:, t]``.

    ``logits`` [B, T-1, V] (logits head), ``hidden`` [B, T-1, H] last hidden state (fused
    head always; logits head when asked), ``weight``/``bias``/``softcap`` the LM head
    (fused head).
    """
    labels: torch.Tensor
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    softcap: float | None = None
    last_logits: torch.Tensor | None = None  # [B, V] the last position (logits head): only masking="open_unlearning"

    @property
    def answer_mask(self) -> torch.Tensor:
        """[B, T-1] True where the position predicts an answer token."""
        return self.labels != IGNORE_INDEX


class LogitsHead:
    """Materialised logits: the model's own forward, then :mod:`unlearn_ext.ops`."""

    name = "logits"

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def run(self, model, part: dict, *, hidden: bool = False) -> Outputs:
        out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], output_hidden_states=hidden,
                    use_cache=False)
        return Outputs(labels=part["labels"][:, 1:], logits=out.logits[:, :-1],
                       hidden=out.hidden_states[-1][:, :-1] if hidden else None, last_logits=out.logits[:, -1])

    def outputs_from_lm_head(self, part: dict, lm: fl.LMHeadInputs) -> Outputs:
        """Outputs from a model's LM-head inputs on ``part`` (how the frozen cache rebuilds a
        teacher from its cached hidden states): here the [B, T-1, V] logits through the head."""
        return Outputs(labels=part["labels"][:, 1:], logits=lm.logits()[:, :-1])

    # Row ops (mean over answer tokens).
    def cross_entropy(self, out: Outputs) -> torch.Tensor:
        return ops.cross_entropy(out.logits, out.labels, backend=self.backend)

    def forward_kl(self, out: Outputs, teacher: Outputs) -> torch.Tensor:
        """KL(teacher ‖ student) over the answer tokens."""
        return ops.forward_kl(out.logits, teacher.logits, out.labels, backend=self.backend)

    def reverse_kl(self, out: Outputs, teacher: Outputs) -> torch.Tensor:
        """KL(student ‖ teacher) over the answer tokens."""
        return ops.reverse_kl(out.logits, teacher.logits, out.labels, backend=self.backend)

    def rkld(self, out: Outputs, original: Outputs, augmented: Outputs, *, alpha: float) -> torch.Tensor:
        return ops.rkld(out.logits, original.logits, augmented.logits, out.labels, alpha=alpha, backend=self.backend)

    def undial(self, out: Outputs, teacher: Outputs, *, gamma: float, masking: str = "answer") -> torch.Tensor:
        labels = out.labels
        if check_masking(masking):
            labels = open_unlearning_undial_labels(labels, out.logits.shape[-1])
        return ops.undial(out.logits, teacher.logits, labels, gamma=gamma, backend=self.backend)

    # Sequence losses.
    def sequence_logprob(self, out: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.sequence_logprob(out.logits, out.labels, backend=self.backend)

    def ga_loss(self, out: Outputs) -> torch.Tensor:
        return ops.ga_loss(out.logits, out.labels, backend=self.backend)

    def retain_loss(self, out: Outputs, reference: Outputs | None = None, *, masking: str = "answer") -> torch.Tensor:
        if check_masking(masking) and reference is not None:
            return self._kl_every_position(out, reference)
        return ops.retain_loss(out.logits, out.labels, None if reference is None else reference.logits,
                               backend=self.backend)

    def _kl_every_position(self, out: Outputs, reference: Outputs) -> torch.Tensor:
        """open-unlearning's KL retain term: every position of the unshifted logits (the shifted
        ones and the last), divided by their number B·T."""
        if out.last_logits is None or reference.last_logits is None:
            raise ValueError("masking='open_unlearning' needs the logits of every position (Outputs.last_logits)")
        total = (ops.forward_kl(out.logits, reference.logits, reduction="sum", backend=self.backend)
                 + ops.forward_kl(out.last_logits, reference.last_logits, reduction="sum", backend=self.backend))
        return total / (out.labels.numel() + out.labels.shape[0])

    def npo_loss(self, out: Outputs, ref_logprob: torch.Tensor, *, beta: float) -> torch.Tensor:
        return ops.npo_loss(out.logits, out.labels, ref_logprob, beta=beta, backend=self.backend)

    def simnpo_loss(self, out: Outputs, *, beta: float, delta: float) -> torch.Tensor:
        return ops.simnpo_loss(out.logits, out.labels, beta=beta, delta=delta, backend=self.backend)


class FusedLinearHead(LogitsHead):
    """Hidden states + LM-head weight into ``unlearn_ext.fused_linear_<op>``: no [N, V] logits.

    ``run`` takes the model's LM-head inputs with ``unlearn_ext.models.lm_head_inputs``
    (hidden states [B, T, H], weight, bias, softcap); the hidden states stay unshifted
    and the labels are shifted with ``shift_labels`` (last position ignored), so nothing
    the size of the hidden states is copied. Teachers go to the losses as ``LMHeadInputs``.

    ``lm_head_inputs`` runs the bare base model and reads the head's weight: under DDP or
    FSDP that is only right inside the wrapped forward, where the trainer calls
    ``method.loss`` (:mod:`unlearn_ext.distributed`). ``chunk_size``: rows per chunk of
    the fused losses (default: from V, H and the device).
    """

    name = "fused"

    def __init__(self, backend: str | None = None, chunk_size: int | None = None):
        super().__init__(backend)
        self.chunk_size = check_chunk_size(chunk_size)

    def run(self, model, part: dict, *, hidden: bool = True) -> Outputs:
        return self.outputs_from_lm_head(part, lm_head_inputs(model, part["input_ids"], part["attention_mask"]))

    def outputs_from_lm_head(self, part, lm):
        """The hidden states [B, T, H] and the head as they are (the losses form the logits)."""
        return Outputs(labels=fl.shift_labels(part["labels"]), hidden=lm.hidden, weight=lm.weight, bias=lm.bias,
                       softcap=lm.softcap)

    def _head(self, out: Outputs):
        return fl.LMHeadInputs(out.hidden, out.weight, out.bias, out.softcap)

    def _kw(self, out: Outputs) -> dict:
        return {"bias": out.bias, "softcap": out.softcap, "backend": self.backend, "chunk_size": self.chunk_size}

    def cross_entropy(self, out):
        return fl.fused_linear_cross_entropy(out.hidden, out.weight, out.labels, **self._kw(out))

    def forward_kl(self, out, teacher):
        return fl.fused_linear_forward_kl(out.hidden, out.weight, self._head(teacher), out.labels,
                                               **self._kw(out))

    def reverse_kl(self, out, teacher):
        return fl.fused_linear_reverse_kl(out.hidden, out.weight, self._head(teacher), out.labels,
                                               **self._kw(out))

    def rkld(self, out, original, augmented, *, alpha):
        return fl.fused_linear_rkld(out.hidden, out.weight, self._head(original), self._head(augmented),
                                         out.labels, alpha=alpha, **self._kw(out))

    def undial(self, out, teacher, *, gamma, masking="answer"):
        labels = out.labels
        if check_masking(masking):  # the last position (ignored by shift_labels) stays out, as in theirs
            labels = torch.cat([open_unlearning_undial_labels(labels[:, :-1], out.weight.shape[0]), labels[:, -1:]], 1)
        return fl.fused_linear_undial(out.hidden, out.weight, self._head(teacher), labels, gamma=gamma,
                                           **self._kw(out))

    def sequence_logprob(self, out):
        return fl.fused_linear_sequence_logprob(out.hidden, out.weight, out.labels, **self._kw(out))

    def ga_loss(self, out):
        return fl.fused_linear_ga(out.hidden, out.weight, out.labels, **self._kw(out))

    def retain_loss(self, out, reference=None, *, masking="answer"):
        if check_masking(masking) and reference is not None:  # every position: hidden is unshifted [B, T, H]
            return fl.fused_linear_forward_kl(out.hidden, out.weight, self._head(reference), None, **self._kw(out))
        ref = None if reference is None else self._head(reference)
        return fl.fused_linear_retain(out.hidden, out.weight, out.labels, ref, **self._kw(out))

    def npo_loss(self, out, ref_logprob, *, beta):
        return fl.fused_linear_npo(out.hidden, out.weight, out.labels, ref_logprob, beta=beta, **self._kw(out))

    def simnpo_loss(self, out, *, beta, delta):
        return fl.fused_linear_simnpo(out.hidden, out.weight, out.labels, beta=beta, delta=delta,
                                           **self._kw(out))


# ---- masking="open_unlearning" (DESIGN.md): open-unlearning's UnDIAL and KL-retain averaging ----
MASKINGS = ("answer", "open_unlearning")


def check_masking(masking: str) -> bool:
    """Whether ``masking`` asks for open-unlearning's averaging; ValueError for an unknown value.

    ``"answer"`` (default): UnDIAL and KL terms average over answer tokens. ``"open_unlearning"``:
    as locuslab/open-unlearning computes them, to compare with its leaderboards — UnDIAL over
    every shifted position (prompt and padding included), KL retain over every unshifted one.
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {', '.join(map(repr, MASKINGS))}, got {masking!r}")
    return masking == "open_unlearning"


def open_unlearning_undial_labels(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """open-unlearning's ``compute_undial_loss`` lowers the teacher logit at the label on every
    position; at ignored ones its index −100 counts from the end of the vocabulary: token V − 100.
    These labels make every position count with that token (where it raises IndexError for
    V < 100, this raises a ValueError naming the option)."""
    if vocab_size < 100:
        raise ValueError(f"masking='open_unlearning' lowers the teacher logit of token V - 100 at ignored positions "
                         f"(open-unlearning indexes the vocabulary with the label -100); the vocabulary has "
                         f"{vocab_size} < 100 tokens: use masking='answer'")
    return torch.where(labels == IGNORE_INDEX, vocab_size - 100, labels)


def make_head(fused: bool | None = None, backend: str | None = None) -> LogitsHead:
    """The fused-linear head unless ``fused`` is False (materialised logits); single- and
    multi-process runs alike."""
    return LogitsHead(backend) if fused is False else FusedLinearHead(backend)
