"""Checkpoint save/load under FSDP2 (``fully_shard``, 2 CPU processes, gloo): a run restored
from the step-1 checkpoint takes step 2 exactly like the run that saved it. Prints
``max diff <x>`` on rank 0. Usage: torchrun --nproc_per_node 2 fsdp_checkpoint_script.py DIR"""
import os
import sys
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from tiny_lm import method_batch, tiny_llama
from unlearn_ext import checkpoint
dist.init_process_group("gloo")
torch.manual_seed(0)
torch.set_num_threads(1)
def build():
    m = tiny_llama()
    for layer in m.model.layers:
        fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return m, opt, sched
b = method_batch()["forget"]
def step(m, opt, sched):
    m(**b).loss.backward(); opt.step(); sched.step(); opt.zero_grad()
m, opt, sched = build()
step(m, opt, sched)
checkpoint.save_checkpoint(sys.argv[1], 1, m, opt, sched, is_main=dist.get_rank()==0, barrier=dist.barrier, keep=0)
step(m, opt, sched)
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
want = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
m2, opt2, sched2 = build()
checkpoint.load_checkpoint(sys.argv[1] + "/step_1", m2, opt2, sched2)
step(m2, opt2, sched2)
got = get_model_state_dict(m2, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if dist.get_rank() == 0:
    print("max diff", max(float((want[k]-got[k]).abs().max()) for k in want))
dist.destroy_process_group()
