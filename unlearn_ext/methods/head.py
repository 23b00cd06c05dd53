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
  wherever those ops are installed (:func:`make_head`).

Causal-LM shifting happens here, once: outputs hold positions ``[:, :-1]`` of the model
(views, no copy) and ``labels[:, 1:]``, so position t predicts label t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
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
                       hidden=out.hidden_states[-1][:, :-1] if hidden else None)

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

    def undial(self, out: Outputs, teacher: Outputs, *, gamma: float) -> torch.Tensor:
        return ops.undial(out.logits, teacher.logits, out.labels, gamma=gamma, backend=self.backend)

    # Sequence losses.
    def sequence_logprob(self, out: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.sequence_logprob(out.logits, out.labels, backend=self.backend)

    def ga_loss(self, out: Outputs) -> torch.Tensor:
        return ops.ga_loss(out.logits, out.labels, backend=self.backend)

    def retain_loss(self, out: Outputs, reference: Outputs | None = None) -> torch.Tensor:
        return ops.retain_loss(out.logits, out.labels, None if reference is None else reference.logits,
                               backend=self.backend)

    def npo_loss(self, out: Outputs, ref_logprob: torch.Tensor, *, beta: float) -> torch.Tensor:
        return ops.npo_loss(out.logits, out.labels, ref_logprob, beta=beta, backend=self.backend)

    def simnpo_loss(self, out: Outputs, *, beta: float, delta: float) -> torch.Tensor:
        return ops.simnpo_loss(out.logits, out.labels, beta=beta, delta=delta, backend=self.backend)


def _fused_api():
    """The fused-linear entry points, or None when this install does not have them."""
    import unlearn_ext
    return unlearn_ext if hasattr(unlearn_ext, "fused_linear_cross_entropy") else None


class FusedLinearHead(LogitsHead):
    """Hidden states + LM-head weight into ``unlearn_ext.fused_linear_<op>``: no [N, V] logits.

    Written against the documented fused-linear API (DESIGN.md): ``fused_linear_<op>(hidden,
    weight, labels, *, bias=None, softcap=None, teacher_hidden=None, teacher_weight=None, …)``
    and ``causal_lm_hidden_and_head(model, input_ids, attention_mask)`` returning (last hidden
    state, head weight, head bias, final-logit softcap).
    """

    name = "fused"

    def __init__(self, backend: str | None = None):
        super().__init__(backend)
        self.api = _fused_api()
        if self.api is None:
            raise RuntimeError("the fused-linear losses are not installed in this build of unlearn_ext; "
                               "use the logits path (fused: false / --no-fused)")

    def run(self, model, part: dict, *, hidden: bool = True) -> Outputs:
        h, weight, bias, softcap = self.api.causal_lm_hidden_and_head(model, part["input_ids"],
                                                                      part["attention_mask"])
        return Outputs(labels=part["labels"][:, 1:], hidden=h[:, :-1], weight=weight, bias=bias, softcap=softcap)

    def _call(self, op: str, out: Outputs, *teachers: Outputs, **kwargs):
        teacher_args = {}
        for prefix, t in zip(("teacher", "teacher2"), teachers):
            teacher_args.update({f"{prefix}_hidden": t.hidden, f"{prefix}_weight": t.weight,
                                 f"{prefix}_bias": t.bias})
        fn = getattr(self.api, f"fused_linear_{op}")
        return fn(out.hidden, out.weight, out.labels, bias=out.bias, softcap=out.softcap, backend=self.backend,
                  **teacher_args, **kwargs)

    def cross_entropy(self, out):
        return self._call("cross_entropy", out)

    def forward_kl(self, out, teacher):
        return self._call("forward_kl", out, teacher)

    def reverse_kl(self, out, teacher):
        return self._call("reverse_kl", out, teacher)

    def rkld(self, out, original, augmented, *, alpha):
        return self._call("rkld", out, original, augmented, alpha=alpha)

    def undial(self, out, teacher, *, gamma):
        return self._call("undial", out, teacher, gamma=gamma)

    def sequence_logprob(self, out):
        return self._call("sequence_logprob", out)

    def ga_loss(self, out):
        return self._call("ga_loss", out)

    def retain_loss(self, out, reference=None):
        return self._call("retain_loss", out) if reference is None else self._call("retain_loss", out, reference)

    def npo_loss(self, out, ref_logprob, *, beta):
        return self._call("npo_loss", out, ref_logprob=ref_logprob, beta=beta)

    def simnpo_loss(self, out, *, beta, delta):
        return self._call("simnpo_loss", out, beta=beta, delta=delta)


def fused_available() -> bool:
    return _fused_api() is not None


def make_head(fused: bool | None = None, backend: str | None = None) -> LogitsHead:
    """``fused=None``: the fused-linear path where installed, else logits; True forces it
    (an error if missing); False: logits."""
    if fused is None:
        fused = fused_available()
    return FusedLinearHead(backend) if fused else LogitsHead(backend)
