"""A small GradDiff run for the trainer tests, started as its own process (plain python,
or torchrun for several processes). Usage:

    trainer_script.py OUTPUT_DIR GRAD_ACCUM [--kill-after STEP] [--resume]

``--kill-after`` sends SIGKILL to itself once that step is done (before any later save).
"""
import argparse
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_lm import FORGET, RETAIN, collate, tiny_llama  # noqa: E402

from unlearn_ext.methods import GradDiff, LogitsHead, Models  # noqa: E402
from unlearn_ext.trainer import TrainConfig, TrainData, train  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("output")
parser.add_argument("grad_accum", type=int)
parser.add_argument("--kill-after", type=int, default=0)
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()
torch.set_num_threads(1)


def kill(step, record):
    if step == args.kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


config = TrainConfig(output_dir=args.output, lr=3e-3, max_steps=6, batch_size=2, grad_accum=args.grad_accum,
                     warmup_ratio=0.34, save_every=2, keep_checkpoints=True, checkpoint_limit=0, resume=args.resume, progress=False, seed=5)
train(GradDiff(head=LogitsHead()), Models(student=tiny_llama(seed=0)), TrainData(FORGET, RETAIN, collate()), config,
      callbacks=[kill] if args.kill_after else [])
