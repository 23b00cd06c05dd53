"""Every method, run by the trainer for a few steps on the memorised tiny Llama, lowers the
forget log-likelihood while the retain NLL stays within a bound."""
import copy

import pytest
from tiny_lm import FORGET, RETAIN, answer_nll, collate, one_thread, trained_llama  # noqa: F401

from unlearn_ext.methods import METHODS, LogitsHead, Models, freeze
from unlearn_ext.trainer import TrainConfig, TrainData, train

# Per-method learning rates and options for a 6-step run (adapters need a larger step; SimNPO's
# forget term has weight 0.1375; RMU's default α = 1200 and layer 0 (a third of 2 layers) suit a 7B model: with
# c = 2 × the activation norm (≈ 2 here), α = 10 lets 6 steps move the forget activations).
SETTINGS = {"eul": (3e-2, {}), "rkld": (5e-3, {"augment_epochs": 4, "augment_lr": 1e-2}), "simnpo": (6e-3, {}),
            "rmu": (2e-2, {"retain_weight": 10.0, "layer": 1})}
RETAIN_BOUND = 0.5  # nats: the memorised retain answers start at NLL ≈ 0.002


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_few_steps_forget_without_losing_the_retain_set(name):
    lr, options = SETTINGS.get(name, (2e-3, {}))
    method = METHODS[name](head=LogitsHead(), **options)
    original = trained_llama()
    reference = freeze(copy.deepcopy(original)) if method.needs_reference() else None
    forget_before, retain_before = answer_nll(original, FORGET), answer_nll(original, RETAIN)
    student = train(method, Models(student=copy.deepcopy(original), reference=reference),
                    TrainData(FORGET, RETAIN, collate()),
                    TrainConfig(lr=lr, max_steps=6, batch_size=2, progress=False, seed=3))
    forget_after, retain_after = answer_nll(student, FORGET), answer_nll(student, RETAIN)
    print(f"{name}: forget NLL {forget_before:.4f} -> {forget_after:.4f}, "
          f"retain NLL {retain_before:.4f} -> {retain_after:.4f}")
    assert forget_after > forget_before + 0.05
    assert retain_after < RETAIN_BOUND
