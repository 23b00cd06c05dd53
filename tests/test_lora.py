"""LoRA for every method (PEFT adapters injected into the model): each method lowers the
forget log-likelihood and changes only adapter weights; the reference is the same network
with adapters disabled; a frozen LM head forms no weight gradient on the fused path;
gradient checkpointing trains the adapters; PEFT-format adapters and the merged model;
resume after SIGKILL gives the same adapters."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import FORGET, RETAIN, answer_nll, collate, method_batch, one_thread, trained_llama  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

from unlearn_ext import lora
from unlearn_ext.methods import METHODS, FusedLinearHead, Models, get_method
from unlearn_ext.trainer import TrainConfig, TrainData, train

pytestmark = pytest.mark.as_users_run  # no test-only switches (tests/conftest.py)

SCRIPT = Path(__file__).with_name("distributed_script.py")
# Short runs: enough steps at a LoRA learning rate for each objective to move the model.
QUICK = {"rkld": {"augment_epochs": 3.0, "augment_lr": 1e-2}, "evaluator": {},
         "rmu": {"layer": 1, "retain_weight": 1.0, "trainable": "all"}}  # adapters learn slower than full weights


def lora_config(**overrides):
    return TrainConfig(lr=1e-2, max_steps=8, batch_size=2, progress=False, seed=0, lora_r=4, max_grad_norm=None,
                       **overrides)


def base_weights(model) -> dict[str, torch.Tensor]:
    """The non-adapter weights, under the plain model's names."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if ".lora_" not in k}


@pytest.mark.parametrize("name", [m for m in METHODS if m != "eul"])
def test_each_method_with_lora_lowers_the_forget_likelihood_and_changes_only_adapters(name):
    cls = get_method(name)
    method = cls(head=FusedLinearHead(), **QUICK.get(name, {}))
    model = trained_llama()
    before_nll, before = answer_nll(model, FORGET), base_weights(model)
    trained = train(method, Models(student=model), TrainData(FORGET, RETAIN, collate()), lora_config())
    assert lora.has_lora(trained)
    after = base_weights(trained)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key
    moved = [float(p.abs().max()) for n, p in trained.named_parameters() if "lora_B" in n]
    # Every adapter trained (B starts at zero); RMU's loss reads layer ℓ, so only the adapters
    # of the modules it trains (the MLPs of layers ℓ-2..ℓ) can move.
    assert moved and (max(moved) > 0 if name == "rmu" else min(moved) > 0)
    assert answer_nll(trained, FORGET) > before_nll + 1e-3


def test_eul_keeps_its_own_layers():
    with pytest.raises(ValueError, match="EUL"):
        train(get_method("eul")(), Models(student=trained_llama()), TrainData(FORGET, RETAIN, collate()),
              lora_config())


def test_the_reference_is_the_student_with_adapters_disabled_no_copy():
    """NPO's reference: a view without parameters of its own whose logits are the starting
    model's (adapters made non-zero); a deep copy of it is a real copy of that model."""
    from unlearn_ext.models import lm_head_inputs
    model, original = trained_llama(), trained_llama()
    lora.attach_lora(model, lora.LoraOptions(r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    reference = lora.WithoutAdapters(model)
    assert sum(p.numel() for p in reference.parameters()) == 0
    part = method_batch()["forget"]
    with torch.no_grad():
        want = original(**part).logits
        assert (model(**part).logits - want).abs().max() > 1e-2  # the adapters do change the student
        torch.testing.assert_close(reference(**part).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(lm_head_inputs(reference, part["input_ids"], part["attention_mask"]).logits(),
                                   want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(**part).logits, model(**part).logits)  # adapters back on after the view
        assert (model(**part).logits - want).abs().max() > 1e-2
    clone = copy.deepcopy(reference)
    assert not lora.has_lora(clone) and all(p.requires_grad for p in clone.parameters())
    with torch.no_grad():
        torch.testing.assert_close(clone(**part).logits, want, rtol=0, atol=0)


class WeightShaped(TorchDispatchMode):
    """Counts new tensors shaped like the LM head's weight [V, H]."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape and not func.is_view:
            self.count += 1
        return out


@pytest.mark.parametrize("frozen_head", [True, False])
def test_a_frozen_lm_head_forms_no_weight_gradient(frozen_head):
    """The fused losses skip the d_weight matmul when the head does not train (LoRA): no
    [V, H] tensor is created in the backward; with a trainable head one is (the control)."""
    model = trained_llama()
    if frozen_head:
        lora.attach_lora(model, lora.LoraOptions(r=4))
    reference = lora.WithoutAdapters(model) if frozen_head else trained_llama().requires_grad_(False)
    method = get_method("undial")(head=FusedLinearHead())
    method.prepare(Models(student=model, reference=reference), None)
    loss, _ = method.loss(method_batch())
    head = model.get_output_embeddings().weight
    watch = WeightShaped(head.shape)
    with watch:
        loss.backward()  # fused sum/mean losses formed their gradients in the forward: watch it too
    watch_forward = WeightShaped(head.shape)
    with watch_forward:
        loss, _ = method.loss(method_batch())
        loss.backward()
    if frozen_head:
        assert head.grad is None and watch_forward.count == 0
        assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    else:
        assert head.grad is not None and watch_forward.count > 0


@pytest.mark.parametrize("input_grads", [True, False])
def test_gradient_checkpointing_trains_the_adapters(input_grads):
    """Reentrant checkpointing back-propagates into a block only when its inputs require
    grad: attach_lora makes the embeddings' output do so (open-unlearning #178). The control
    without it shows the check can fail: no adapter is reached (the loss has no graph)."""
    model = trained_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    lora.attach_lora(model, lora.LoraOptions(r=4))
    if not input_grads:  # the hook transformers 5 adds with checkpointing, which attach_lora keeps
        model.disable_input_require_grads()
    model.train()
    method = get_method("ga")(head=FusedLinearHead())
    method.prepare(Models(student=model), None)
    loss = method.loss(method_batch())[0]
    if not input_grads:  # every block's output is cut off from the adapters
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
        return
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)


def test_adapters_in_peft_format_and_the_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    trained = train(get_method("npo")(head=FusedLinearHead()), Models(student=trained_llama()),
                    TrainData(FORGET, RETAIN, collate()), lora_config(output_dir=str(tmp_path), merge_lora=True))
    part = method_batch()["forget"]
    with torch.no_grad():
        want = trained.eval()(**part).logits
        peft_model = PeftModel.from_pretrained(trained_llama(), tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(**part).logits, want, rtol=1e-5, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**part).logits, want, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "adapter/adapter_model.safetensors").stat().st_size < 100_000  # adapters only


def _script(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNLEARN_EXT_POISON": "0"}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), "npo", "1", "--lora-r", "4", "--steps", "4", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def test_killed_and_resumed_lora_run_gives_the_same_adapters(tmp_path):
    whole = _script(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _script(tmp_path / "killed", "--kill-after", "3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _script(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = load_file(str(tmp_path / "whole/npo/adapter/adapter_model.safetensors"))
    got = load_file(str(tmp_path / "killed/npo/adapter/adapter_model.safetensors"))
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert max(float(v.abs().max()) for k, v in want.items() if "lora_B" in k) > 0


def test_lora_options_from_yaml_and_flags(tmp_path):
    from unlearn_ext import cli
    config = tmp_path / "run.yaml"
    config.write_text("lora_r: 8\nlora_targets: [q_proj, v_proj]\nmerge_lora: true\n")
    values = cli.resolve("unlearn", cli.UNLEARN_OPTS, {"config": str(config), "lora_alpha": "32", "method": "npo",
                                                       "forget": "f.json", "model": "m", "output": "o",
                                                       "save_dtype": "float32"})
    train_config = cli._train_config(values, desc="test")
    assert (train_config.lora_r, train_config.lora_alpha, train_config.lora_targets, train_config.merge_lora) == \
        (8, 32.0, ("q_proj", "v_proj"), True)
    assert cli._train_config({**values, "lora_targets": None}, desc="test").lora_targets is None  # the default projections
    with pytest.raises(cli.CLIError, match="lora-targets"):
        cli.resolve("unlearn", cli.UNLEARN_OPTS, {"lora_targets": " , ", "method": "npo", "forget": "f",
                                                  "model": "m", "output": "o"})


def test_train_layers_with_lora_puts_adapters_only_in_those_blocks(tmp_path):
    """--train-layers top:1 with --lora-r: adapters in the top block only (the other block,
    the embeddings and the head unchanged and adapter-free), and PEFT reloads them."""
    from peft import PeftModel
    model = trained_llama()
    before = base_weights(model)
    trained = train(get_method("npo")(head=FusedLinearHead()), Models(student=model),
                    TrainData(FORGET, RETAIN, collate()), lora_config(train_layers="top:1", output_dir=str(tmp_path)))
    adapted = {n.split(".lora_")[0] for n, _ in trained.named_parameters() if ".lora_" in n}
    assert adapted and all(n.startswith("model.layers.1.") for n in adapted)
    assert len(adapted) == len(lora.DEFAULT_TARGETS)
    assert all(p.requires_grad == (".lora_" in n) for n, p in trained.named_parameters())
    after = base_weights(trained)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert answer_nll(trained, FORGET) > answer_nll(trained_llama(), FORGET) + 1e-3
    part = method_batch()["forget"]
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(trained_llama(), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(**part).logits, trained.eval()(**part).logits, rtol=1e-5, atol=1e-5)
