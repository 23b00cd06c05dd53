"""What every method shares: the models it sees, the data ``prepare`` gets, its options.

A method is a small class (DESIGN.md, "Methods"):

- ``Options``: a dataclass of its hyperparameters with the paper's defaults; each field's
  ``metadata["help"]`` documents it (the command line prints them), ``metadata["choices"]``
  lists the values a text option may take (checked when the method is made).
- ``open_unlearning_names``: the names open-unlearning (locuslab/open-unlearning) gives
  the same options, e.g. ``{"gamma": "forget_weight", "alpha": "retain_weight"}``. They
  are documented, printed by ``describe`` and named in the error for an unknown option;
  they are not accepted as aliases: ``gamma`` and ``alpha`` mean other things in UnDIAL,
  RKLD and EUL (their papers' γ and α), so a ported config must say which it means.
- ``prepare(models, data)``: one-off work before training, on unwrapped models (RKLD's
  augmented model, EUL's adapters, the evaluator-guided classifier). Runs on every rank
  with the same seed, so every rank prepares the same thing.
- ``loss(batch) -> (loss, logs)``: ``batch = {"forget": part, "retain": part}`` (collated
  by :class:`unlearn_ext.data.QACollator`); ``logs`` are floats-to-be (0-dim tensors).

The student is ``models.student``, the bare model (the trainer calls ``loss`` inside the
forward of its DDP/FSDP wrapper); ``models.reference`` is a frozen copy of the starting
model when the method asks for one (``needs_reference()``), or with LoRA the student with
its adapters disabled.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from .head import MASKINGS, LogitsHead, Outputs, make_head


def option(default, help: str, choices: tuple[str, ...] | None = None):
    """A hyperparameter with its documentation (and, for a text option, its allowed values)."""
    return field(default=default, metadata={"help": help, **({"choices": choices} if choices else {})})


def masking_option():
    """The ``masking`` option of the methods with an UnDIAL or KL term (DESIGN.md)."""
    return option("answer", "answer: UnDIAL and KL terms average over answer tokens; open_unlearning: over every "
                            "position, as open-unlearning computes them (to compare with its leaderboards); NLL "
                            "terms are the same either way", MASKINGS)


def check_choices(options) -> None:
    """ValueError naming the option whose value is not one of its ``choices``."""
    for f in dataclasses.fields(options):
        choices = f.metadata.get("choices")
        value = getattr(options, f.name)
        if choices and value not in choices:
            raise ValueError(f"option {f.name!r} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass
class Models:
    """The models a method works with. ``student`` trains; the others are frozen."""
    student: torch.nn.Module
    reference: torch.nn.Module | None = None
    extra: dict[str, torch.nn.Module] = field(default_factory=dict)


@dataclass
class PrepareData:
    """What ``prepare`` may use: the examples ({"question", "answer"} dicts), their
    collator, the run's training configuration (for a nested fine-tuning) and a seed."""
    forget: Sequence[dict]
    retain: Sequence[dict] | None
    collate: Callable[[Sequence[dict]], dict]
    train_config: Any = None
    seed: int = 0


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model: no gradients, eval mode (no dropout)."""
    return model.requires_grad_(False).eval()


def _parse_value(text: str, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if default is None or kind is str:
        return text
    return kind(text)


class Method:
    """Base class. Subclasses set ``name``, ``Options`` and implement ``loss``."""

    name: ClassVar[str]
    Options: ClassVar[type]
    primary: ClassVar[str] = "forget"  # the batch part the epochs walk through
    open_unlearning_names: ClassVar[dict[str, str]] = {}  # open-unlearning's option name -> ours

    def __init__(self, options=None, *, head: LogitsHead | None = None, **kwargs):
        if options is None:
            options = self.make_options(kwargs)
        elif kwargs:
            raise TypeError("pass either an options object or keyword options, not both")
        try:
            check_choices(options)
        except ValueError as e:
            raise ValueError(f"method {self.name!r}: {e}") from None
        self.options = options
        self.head = head if head is not None else make_head()
        self.models: Models | None = None

    @classmethod
    def make_options(cls, values: dict[str, Any]):
        """Options from a mapping (YAML values, or strings from KEY=VALUE flags)."""
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            hints = [f"open-unlearning's {k!r} is {cls.open_unlearning_names[k]!r} here" for k in unknown
                     if k in cls.open_unlearning_names]
            raise ValueError(f"method {cls.name!r} has no option {', '.join(map(repr, unknown))}"
                             f"{' (' + '; '.join(hints) + ')' if hints else ''}; "
                             f"its options: {', '.join(fields) or 'none'}")
        parsed = {}
        for key, value in values.items():
            default = fields[key].default
            try:
                parsed[key] = _parse_value(value, default) if isinstance(value, str) else value
            except ValueError as e:
                raise ValueError(f"method {cls.name!r}, option {key!r}: {e}") from None
        return cls.Options(**parsed)

    @classmethod
    def describe(cls) -> str:
        """One line per option: name, default, help."""
        lines = []
        theirs = {ours: name for name, ours in cls.open_unlearning_names.items()}
        for f in dataclasses.fields(cls.Options):
            alias = f" [open-unlearning: {theirs[f.name]}]" if f.name in theirs else ""
            lines.append(f"    {f.name} (default {f.default!r}): {f.metadata.get('help', '')}{alias}")
        return "\n".join(lines) if lines else "    (no options)"

    def needs_reference(self) -> bool:
        """Whether the trainer must give ``prepare`` a frozen copy of the starting model."""
        return False

    def needs_retain(self) -> bool:
        """Whether batches must carry a ``retain`` part: by default, when the method has a
        ``retain_weight`` option and it is not 0."""
        return getattr(self.options, "retain_weight", 0) != 0

    def prepare(self, models: Models, data: PrepareData) -> None:
        self.models = models

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def finish(self, output_dir, is_main: bool = True) -> None:
        """After the last step, on every rank (``output_dir`` may be None; only the main
        process writes): e.g. EUL's fusion."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.models.student.parameters() if p.requires_grad]

    # Helpers shared by the methods.
    def student(self, part: dict, *, hidden: bool = False) -> Outputs:
        return self.head.run(self.models.student, part, hidden=hidden)

    # The frozen cache (unlearn_ext.methods.cache) when the trainer keeps the frozen models'
    # outputs instead of re-running them every step; None: run them.
    frozen_cache = None

    @torch.no_grad()
    def frozen(self, model: torch.nn.Module, part: dict, *, hidden: bool = False) -> Outputs:
        """A frozen model's outputs on ``part`` (a teacher), from the frozen cache when it
        holds them. ``hidden=True`` (hidden states at every position) is never cached."""
        if self.frozen_cache is not None and not hidden:
            return self.frozen_cache.outputs(self.head, model, part)
        return self.head.run(model, part, hidden=hidden)

    @torch.no_grad()
    def frozen_logprob(self, model: torch.nn.Module, part: dict) -> torch.Tensor:
        """A frozen model's summed answer log-probability per sequence of ``part`` [B]
        (NPO's ℓ^ref), from the frozen cache when it holds them."""
        if self.frozen_cache is not None:
            return self.frozen_cache.logprob(self.head, model, part)
        return self.head.sequence_logprob(self.head.run(model, part))[0]

    def add_retain(self, batch: dict, value: torch.Tensor, logs: dict, kind: str, weight: float,
                   masking: str = "answer"):
        """``value + weight·R`` with R the NLL on the retain answers (``kind="nll"``) or
        KL(π_ref ‖ π_θ) over them (``"kl"``; ``masking="open_unlearning"``: over every
        position, as open-unlearning averages it); ``value`` unchanged when the weight is 0."""
        if kind not in ("nll", "kl"):
            raise ValueError(f"retain loss must be 'nll' or 'kl', got {kind!r}")
        if weight == 0:
            return value, logs
        out = self.student(batch["retain"])
        ref = self.frozen(self.models.reference, batch["retain"]) if kind == "kl" else None
        retain = self.head.retain_loss(out, ref, masking=masking)
        return value + weight * retain, {**logs, f"retain_{kind}": retain.detach()}
