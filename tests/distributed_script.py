"""One unlearning run of the tests of DDP, FSDP and LoRA, started as its own process (plain
python, or torchrun for several processes). Usage:

    distributed_script.py OUTPUT_DIR METHODS GRAD_ACCUM [--head fused|logits] [--fsdp]
        [--shard-frozen] [--lora-r R] [--merge-lora] [--kill-after STEP] [--resume] [--steps N]
        [--eval-every N] [--keep-best]

METHODS: comma-separated, run one after the other, each in OUTPUT_DIR/METHOD. Every process
watches the tensors each run creates (a TorchDispatchMode over every op, in forward and
backward): ``OUTPUT_DIR/METHOD/vocab_rows_<rank>.json`` holds the most rows of any
tensor whose last dimension is the vocabulary size V, and how many such tensors the fused
loop formed (the evidence that it ran), and the bound a fused run must keep to. ``--kill-after`` sends SIGKILL to itself once that
step is done.
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(__file__))
from tiny_lm import FORGET, RETAIN, collate, make_tokenizer, trained_llama  # noqa: E402

from unlearn_ext.eval.dynamics import EvalDuringTraining  # noqa: E402

from unlearn_ext.models.lm_head import VERIFY_TOKENS  # noqa: E402
from unlearn_ext.methods import FusedLinearHead, LogitsHead, Models, freeze, get_method  # noqa: E402
from unlearn_ext.trainer import TrainConfig, TrainData, train  # noqa: E402

VOCAB = 256  # tiny_llama's; no other dimension of the run is 256 (H = 32, T ≈ 20)
CHUNK = 16   # rows per fused chunk: fewer than the B·T rows of a batch's logits
METHOD_ARGS = {"rkld": {"augment_epochs": 2.0, "augment_lr": 1e-3}, "npo": {}, "undial": {}, "graddiff": {},
               "ga": {}, "npo_kl": {}, "npo_rt": {}, "simnpo": {}, "evaluator": {}}

parser = argparse.ArgumentParser()
parser.add_argument("output")
parser.add_argument("methods", help="comma-separated")
parser.add_argument("grad_accum", type=int)
parser.add_argument("--head", choices=("fused", "logits"), default="fused")
parser.add_argument("--fsdp", action="store_true")
parser.add_argument("--shard-frozen", action="store_true")
parser.add_argument("--lora-r", type=int, default=0)
parser.add_argument("--merge-lora", action="store_true")
parser.add_argument("--kill-after", type=int, default=0)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--eval-every", type=int, default=0, help="evaluate during training (forget and retain sets)")
parser.add_argument("--keep-best", action="store_true")
args = parser.parse_args()
torch.set_num_threads(1)


def _storage(t):
    """The address of a plain tensor's memory (None for non-tensors and wrapper subclasses
    such as FSDP's DTensors, whose local tensors go through the same ops)."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


class VocabRows(TorchDispatchMode):
    """Records the largest number of rows of any new tensor an op creates shaped [..., V]."""

    def __init__(self):
        super().__init__()
        self.most_rows, self.count = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_leaves((args, kwargs))}
        for t in tree_leaves(out):  # new memory only: views and in-place results hold their inputs' storage
            if _storage(t) is not None and t.dim() >= 2 and t.shape[-1] == VOCAB and _storage(t) not in inputs:
                self.most_rows = max(self.most_rows, t.numel() // VOCAB)
                self.count += 1
        return out


def kill(step, record):
    if step == args.kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


for name in args.methods.split(","):  # one launch, several runs: each in OUTPUT_DIR/METHOD
    cls = get_method(name)
    head = FusedLinearHead(chunk_size=CHUNK) if args.head == "fused" else LogitsHead()
    method = cls(head=head, **METHOD_ARGS.get(name, {}))
    student = trained_llama(seed=0)
    reference = freeze(trained_llama(seed=0)) if method.needs_reference() and not args.lora_r else None
    out = Path(args.output, name)
    config = TrainConfig(output_dir=str(out), lr=1e-3 if not args.lora_r else 3e-3, max_steps=args.steps,
                         batch_size=2, grad_accum=args.grad_accum, save_every=1, keep_checkpoints=0,
                         resume=args.resume, progress=False, seed=3, fsdp=args.fsdp, shard_frozen=args.shard_frozen,
                         lora_r=args.lora_r, merge_lora=args.merge_lora, eval_every=args.eval_every,
                         keep_best=args.keep_best)
    evaluator = EvalDuringTraining({"forget": FORGET, "retain": RETAIN}, make_tokenizer(), every=args.eval_every,
                                   batch_size=3) if args.eval_every else None
    watch = VocabRows()
    with watch:
        train(method, Models(student=student, reference=reference), TrainData(FORGET, RETAIN, collate()), config,
              callbacks=[kill] if args.kill_after else [], evaluator=evaluator)
    rank = int(os.environ.get("RANK", "0"))
    # The most rows a fused run may hold: a chunk, or the one short sequence whose logits
    # lm_head_inputs compares with the model's once.
    bound = max(CHUNK, VERIFY_TOKENS)
    (out / f"vocab_rows_{rank}.json").write_text(json.dumps({"most_rows": watch.most_rows, "count": watch.count,
                                                             "bound": bound}))
