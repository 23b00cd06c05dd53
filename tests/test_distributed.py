"""The fused-linear loss under DDP and FSDP (2 CPU processes, gloo, torchrun): the fused head
is used, no [N, V] tensor is created, and loss and updated weights equal one process with
grad_accum = 2 (the same global batch), for NPO, RKLD and UnDIAL.

Each run is tests/distributed_script.py in its own process, as users start it (torchrun;
no test-only switch: UNLEARN_EXT_POISON is off as in a user's shell)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("distributed_script.py")


def run_script(out, method, accum, *extra, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNLEARN_EXT_POISON": "0"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    done = subprocess.run([*launcher, str(SCRIPT), str(out), method, str(accum), *extra], env=env,
                          capture_output=True, text=True, timeout=600)
    return done


def finished(out, method, accum, *extra, nproc=1):
    done = run_script(out, method, accum, *extra, nproc=nproc)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def weights(out):
    return load_file(str(Path(out) / "model/model.safetensors"))


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def vocab_rows(out, nproc):
    return [json.loads((Path(out) / f"vocab_rows_{r}.json").read_text()) for r in range(nproc)]


def assert_same_run(got, want):
    torch.testing.assert_close(torch.tensor(losses(got)), torch.tensor(losses(want)), rtol=1e-5, atol=1e-6)
    w, g = weights(want), weights(got)
    assert w.keys() == g.keys()
    for name in w:
        torch.testing.assert_close(g[name], w[name], rtol=1e-5, atol=1e-6, msg=name)


METHODS = ["npo", "rkld", "undial"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One process, grad_accum 2, fused head: the runs the 2-process ones must equal."""
    return finished(tmp_path_factory.mktemp("one"), ",".join(METHODS), 2)


def assert_fused_without_vocab_tensors(out, nproc):
    for rank in vocab_rows(out, nproc):
        assert rank["count"] > 0  # the fused loop formed its chunk logits
        # No tensor of more rows than a chunk (or than the one short sequence on which
        # lm_head_inputs checks the model's logits once): no [N, V] logits.
        assert rank["most_rows"] <= rank["bound"], rank


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_fused_equal_one_process_with_accumulation(fsdp, one_process, tmp_path):
    """NPO, RKLD (its augmented model fine-tuned in the same distributed run) and UnDIAL.
    FSDP also shards the frozen models' layers (--shard-frozen)."""
    finished(tmp_path, ",".join(METHODS), 1, *(["--fsdp", "--shard-frozen"] if fsdp else []), nproc=2)
    for method in METHODS:
        assert_fused_without_vocab_tensors(tmp_path / method, 2)
        assert_same_run(tmp_path / method, one_process / method)


def test_the_vocabulary_check_sees_materialised_logits(tmp_path):
    """The check above can fail: on the logits path the [B·T, V] logits exceed its bound."""
    finished(tmp_path, "npo", 1, "--head", "logits", "--steps", "1")
    assert vocab_rows(tmp_path / "npo", 1)[0]["most_rows"] > vocab_rows(tmp_path / "npo", 1)[0]["bound"]


def test_gradients_left_on_the_model_do_not_join_the_first_step():
    """DDP broadcasts rank 0's weights but not its .grad, FSDP makes new parameters: a
    gradient left on the model by earlier use (here a stale one) must not be added to step
    1, or one process and several disagree."""
    from tiny_lm import FORGET, RETAIN, collate, trained_llama

    from unlearn_ext.methods import GA, LogitsHead, Models
    from unlearn_ext.trainer import TrainConfig, TrainData, train

    def trained(stale: bool):
        model = trained_llama()
        for p in model.parameters():
            p.grad = torch.ones_like(p) if stale else None
        config = TrainConfig(lr=1e-2, max_steps=1, batch_size=2, progress=False, max_grad_norm=None)
        return train(GA(head=LogitsHead()), Models(student=model), TrainData(FORGET, RETAIN, collate()), config)

    clean, stale = trained(False).state_dict(), trained(True).state_dict()
    for name in clean:
        assert torch.equal(clean[name], stale[name]), name


def evaluations(out):
    return [json.loads(line) for line in (Path(out) / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_evaluated(tmp_path_factory):
    return finished(tmp_path_factory.mktemp("one_eval"), "npo", 2, "--eval-every", "1", "--keep-best")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_evaluation_during_training_and_keep_best_under_two_processes(fsdp, one_process_evaluated, tmp_path):
    """--eval-every / --keep-best with 2 processes: every rank evaluates (under FSDP the
    root unit gathered, the layers gathering per forward, step 0 before any training
    forward included), no hang, and the evaluations and the best model equal one process
    with grad_accum = 2."""
    finished(tmp_path, "npo", 1, "--eval-every", "1", "--keep-best", *(["--fsdp"] if fsdp else []), nproc=2)
    got, want = evaluations(tmp_path / "npo"), evaluations(one_process_evaluated / "npo")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3]
    for g, w in zip(got, want):
        for key in ("forget_prob", "retain_prob"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["step"], key)
    assert_same_run(tmp_path / "npo", one_process_evaluated / "npo")
    best, best_want = (load_file(str(Path(o) / "npo/best/model.safetensors"))
                       for o in (tmp_path, one_process_evaluated))
    assert best.keys() == best_want.keys()
    for name in best:
        torch.testing.assert_close(best[name], best_want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_rkld_with_lora_under_ddp_equals_one_process(tmp_path):
    """RKLD's augmented model as a second adapter, fine-tuned in the same DDP run (the
    student wrapped twice: for the augmented adapter, then for its own): losses and final
    adapters equal one process with grad_accum = 2."""
    one = finished(tmp_path / "one", "rkld", 2, "--lora-r", "4")
    two = finished(tmp_path / "two", "rkld", 1, "--lora-r", "4", nproc=2)
    torch.testing.assert_close(torch.tensor(losses(two / "rkld")), torch.tensor(losses(one / "rkld")),
                               rtol=1e-5, atol=1e-6)
    want, got = (load_file(str(o / "rkld/adapter/adapter_model.safetensors")) for o in (one, two))
    assert want.keys() == got.keys() and len(want) > 0 and not any("augmented" in k for k in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max(float(v.abs().max()) for k, v in want.items() if "lora_B" in k) > 0
