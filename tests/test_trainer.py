"""The trainer: batch plan, schedule, checkpoints, resume after SIGKILL, 2 processes = 1 process."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import FORGET, RETAIN, collate, one_thread, tiny_llama  # noqa: F401

from unlearn_ext import checkpoint
from unlearn_ext.methods import GA, LogitsHead, Models
from unlearn_ext.train_layers import block_range, select_train_layers
from unlearn_ext.trainer import BatchPlan, TrainConfig, TrainData, lr_factor, train

SCRIPT = Path(__file__).with_name("trainer_script.py")


def test_one_process_with_accumulation_walks_the_batches_of_several_processes():
    one = BatchPlan(10, 7, TrainConfig(batch_size=2, grad_accum=2), world=1)
    two = BatchPlan(10, 7, TrainConfig(batch_size=2, grad_accum=1), world=2)
    for step in range(6):
        assert [one.examples(step, m, 0) for m in range(2)] == [two.examples(step, 0, r) for r in range(2)]
        assert [one.retain(step, m, 0) for m in range(2)] == [two.retain(step, 0, r) for r in range(2)]
    assert two.retain(0, 0, 0) != two.retain(0, 0, 1)  # each rank draws its own retain examples


def test_every_example_once_per_epoch_and_a_new_order_each_epoch():
    plan = BatchPlan(12, 5, TrainConfig(batch_size=3, grad_accum=1, epochs=2), world=2)
    assert plan.total_steps() == 4
    epochs = [[i for s in range(2 * e, 2 * e + 2) for r in range(2) for i in plan.examples(s, 0, r)] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]
    again = BatchPlan(12, 5, TrainConfig(batch_size=3, grad_accum=1, epochs=2), world=2)
    assert again.examples(3, 0, 1) == plan.examples(3, 0, 1)  # stateless: resuming recomputes it


def test_warmup_then_linear_decay():
    factors = [lr_factor(s, total=10, warmup=2) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2:] == pytest.approx([(10 - s) / 8 for s in range(2, 10)])
    assert lr_factor(0, total=5, warmup=0) == 1.0


def test_constant_and_cosine_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in range(10)] == [0.5] + [1.0] * 9
    cosine = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert cosine[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)])
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, linear, cosine"):
        lr_factor(5, 10, 0, "step")


def test_retain_examples_are_drawn_without_replacement_within_an_epoch():
    """7 retain examples, 3 per slot: slots 0.. walk a permutation of the retain set, a new
    one each retain epoch; one process with grad_accum 2 draws what 2 processes draw."""
    config = TrainConfig(batch_size=2, retain_batch_size=3, grad_accum=2)
    plan = BatchPlan(10, 7, config, world=1)
    stream = [i for step in range(7) for micro in range(2) for i in plan.retain(step, micro, 0)]  # 42 = 6 epochs
    epochs = [stream[7 * e:7 * e + 7] for e in range(6)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    two = BatchPlan(10, 7, TrainConfig(batch_size=2, retain_batch_size=3, grad_accum=1), world=2)
    for step in range(5):
        assert [plan.retain(step, m, 0) for m in range(2)] == [two.retain(step, 0, r) for r in range(2)]
    again = BatchPlan(10, 7, config, world=1)
    assert again.retain(5, 1, 0) == plan.retain(5, 1, 0)  # stateless: resuming recomputes it
    with pytest.raises(ValueError, match="retain_batch_size must be >= 1"):
        BatchPlan(10, 7, TrainConfig(retain_batch_size=-1), world=1)


@pytest.mark.parametrize("spec,blocks", [("top:2", [3, 4]), ("bottom:1", [0]), ("1-3", [1, 2, 3]),
                                         ("all", [0, 1, 2, 3, 4])])
def test_train_layers_selects_blocks(spec, blocks):
    assert list(block_range(spec, 5)) == blocks
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                                         num_attention_heads=2, num_key_value_heads=1))
    select_train_layers(model, spec)
    trained = {int(n.split(".")[2]) for n, p in model.named_parameters() if p.requires_grad and ".layers." in n}
    assert trained == set(blocks)
    others = [n for n, p in model.named_parameters() if p.requires_grad and ".layers." not in n]
    assert bool(others) == (spec == "all")  # embeddings, final norm and head train only with "all"


@pytest.mark.parametrize("spec,message", [("top:0", "N must be in"), ("3-1", "need 0 <= A <= B"),
                                          ("top10", "expected 'all', 'top:N'")])
def test_train_layers_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        block_range(spec, 5)


def test_completed_run_prunes_checkpoints_unless_asked(tmp_path):
    _run(tmp_path / "default", keep_checkpoints=False)
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == ["log.jsonl", "manifest.json", "model"]


def _run(tmp_path, **overrides):
    config = dict(lr=1e-3, max_steps=4, batch_size=2, progress=False, save_every=2, keep_checkpoints=True, checkpoint_limit=0)
    config.update(overrides)
    return train(GA(head=LogitsHead()), Models(student=tiny_llama()), TrainData(FORGET, collate=collate()),
                 TrainConfig(output_dir=str(tmp_path), **config))


def test_checkpoints_logs_and_model_are_written(tmp_path):
    model = _run(tmp_path)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == ["step_2", "step_4"]
    state = checkpoint.read_state(tmp_path / "checkpoints/step_4")
    assert state["step"] == 4 and state["global_batch"] == 2
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("loss" in r and "lr" in r for r in log)
    saved = load_file(str(tmp_path / "checkpoints/step_4/trainable.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(saved[name], p.detach()), name
    reloaded = type(model).from_pretrained(tmp_path / "model", local_files_only=True)
    for (name, p), q in zip(model.named_parameters(), reloaded.parameters()):
        assert torch.equal(p, q), name


def test_refuses_to_overwrite_a_run_and_ignores_partial_checkpoints(tmp_path):
    _run(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="is not empty: pass --resume"):
        _run(tmp_path, max_steps=2)
    (tmp_path / "checkpoints/.tmp-step_9-123").mkdir()  # what a kill during a save leaves
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == ["step_2"]
    with pytest.raises(ValueError, match="total_steps"):
        _run(tmp_path, max_steps=3, resume=True)


def _script(out, accum, *extra, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNLEARN_EXT_POISON": "0"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, str(SCRIPT), str(out), str(accum), *extra], env=env, capture_output=True,
                          text=True, timeout=300)


def _weights(out):
    return load_file(str(Path(out) / "model/model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    done = _script(out, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_killed_and_resumed_run_ends_with_the_same_weights(uninterrupted, tmp_path):
    """SIGKILL after step 3 (last checkpoint: step 2), resume: bitwise the uninterrupted run
    (same ops in the same order on the CPU; the optimizer state is restored exactly)."""
    killed = _script(tmp_path, 2, "--kill-after", "3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == ["step_2"]
    resumed = _script(tmp_path, 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _weights(uninterrupted), _weights(tmp_path)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's unsaved step 3 was logged once, then replaced


def test_two_processes_equal_one_process_with_the_same_global_batch(uninterrupted, tmp_path):
    """torchrun, 2 CPU processes (gloo), grad_accum 1 vs one process with grad_accum 2:
    same examples, same retain draws; DDP averages the gradients in another summation
    order, so equal to float32 rounding."""
    done = _script(tmp_path, 1, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = _weights(uninterrupted), _weights(tmp_path)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = max(float((want[n] - tiny_llama().state_dict()[n]).abs().max()) for n in want)
    assert moved > 1e-3  # the runs did train


def test_checkpoints_restore_exactly_under_fsdp(tmp_path):
    """accelerate uses DDP on the CPU, so FSDP2 is applied directly (fully_shard) to check
    that checkpoints gather and re-shard parameters and optimizer state exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNLEARN_EXT_POISON": "0"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPT.with_name("fsdp_checkpoint_script.py")), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"max diff (\S+)", done.stdout)
    assert found, done.stdout[-2000:]
    assert float(found.group(1)) == 0.0
