"""Unlearning methods, one file each (DESIGN.md, "Methods"), and their registry.

    from unlearn_ext.methods import get_method
    method = get_method("npo")(beta=0.1)       # options as keywords, defaults from the paper
"""
from .base import Method, Models, PrepareData, freeze
from .eul import EUL
from .evaluator import EvaluatorGuided, LogisticEvaluator
from .finetune import Finetune
from .ga import GA
from .graddiff import GradDiff
from .head import FusedLinearHead, LogitsHead, Outputs, make_head
from .idkdpo import IdkDPO
from .npo import NPO, NPOKL, NPORT
from .rkld import RKLD
from .rmu import RMU
from .simnpo import SimNPO
from .undial import UnDIAL

METHODS: dict[str, type[Method]] = {m.name: m for m in (GA, GradDiff, NPO, NPORT, NPOKL, SimNPO, RKLD, UnDIAL, EUL,
                                                         EvaluatorGuided, RMU, IdkDPO)}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name`` (see ``METHODS``)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "get_method", "Method", "Models", "PrepareData", "freeze", "Outputs", "LogitsHead",
           "FusedLinearHead", "make_head", "GA", "GradDiff", "NPO", "NPORT", "NPOKL", "SimNPO",
           "RKLD", "UnDIAL", "EUL", "EvaluatorGuided", "LogisticEvaluator", "Finetune", "RMU", "IdkDPO"]
