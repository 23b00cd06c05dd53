"""Block sizes and warp counts of the row kernels, per device.

A table rather than triton.autotune: autotuning re-runs a kernel on the caller's buffers,
which the in-place and fused paths overwrite (restoring them would cost a copy of the
[N, V] logits), and it costs seconds per new vocabulary size. Entries are (BLOCK columns,
num_warps), keyed by the number of [N, V] inputs a forward reads (1: token ops, 2: one
teacher, 3: RKLD's two teacher inputs).

One table per device, chosen by the GPU's compute capability: sm_90 (H100, H200) and
sm_80 (A100); any other GPU takes the sm_80 entries (the same 64K registers per SM,
A100's or less bandwidth to hide). How they were chosen (tests/test_triton_kernels.py
compiles every kernel for both with its table's entries and checks for spills): a block
is BLOCK / (32 * num_warps) = 8-16 elements per thread, never a whole row. On sm_90 the token-op forward at (4096, 8) takes 53 registers per thread, so
four programs fit an SM (32 KB of bf16 loads in flight per SM, more than the ~20 KB that
H100's bandwidth-latency product asks for); the teacher ops hold three accumulators and
two or three loaded blocks, 120-128 registers at (4096, 8) but 64-88 at (4096, 16): the
same bytes in flight with twice the warps to hide latency. The backward is a stream (40-80
registers at (4096, 8)). An A100 has 108 SMs and 2 TB/s, less than half the bandwidth to
hide: its teacher ops take half the bytes in flight, (2048, 8). (The per-lane maxima of the
row loop, row_math.online_update, add one vector per input to these counts.)
These are reasoned, not yet measured: benchmarks/bench_triton_configs.py sweeps them on
a GPU, and its best entries belong here.
"""
from __future__ import annotations

import functools

import torch
import triton

# Compute capability -> forward entries by input count, and the backward entry.
_TABLE = {
    (9, 0): {"forward": {1: (4096, 8), 2: (4096, 16), 3: (4096, 16)}, "backward": (4096, 8)},  # H100, H200
    (8, 0): {"forward": {1: (4096, 8), 2: (2048, 8), 3: (2048, 8)}, "backward": (4096, 8)},  # A100
}
_DEFAULT = (8, 0)  # other GPUs

# Under TRITON_INTERPRET=1 (CPU tests) a row is cut into about this many blocks whatever its
# length: enough to exercise the online rescaling and a ragged last block, few enough for
# the interpreter, whose cost is per block. Warps mean nothing there.
INTERPRETER_BLOCKS_PER_ROW = 3

INPUTS = {"token_logprob": 1, "cross_entropy": 1, "forward_kl": 2, "reverse_kl": 2, "undial": 2, "jsd": 2, "rkld": 3}


def _fit(block: int, warps: int, vocab: int) -> tuple[int, int]:
    """Shrinks a block to the row (a power of two, at least 128) and its warps with it."""
    fitted = min(block, max(128, triton.next_power_of_2(vocab)))
    return fitted, max(1, min(warps, fitted // 256))


def gpu_config(kind: str, op: str, vocab: int, capability: tuple[int, int]) -> tuple[int, int]:
    """(BLOCK, num_warps) of the `kind` ("forward" or "backward") kernel of `op` on a GPU of
    that compute capability, (major, minor)."""
    entry = _TABLE.get(tuple(capability), _TABLE[_DEFAULT])[kind]
    block, warps = entry[INPUTS[op]] if kind == "forward" else entry
    return _fit(block, warps, vocab)


def config(kind: str, op: str, vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) of a kernel launch on `device` (CPU: the interpreter)."""
    if device.type != "cuda":
        return triton.next_power_of_2(-(-vocab // INTERPRETER_BLOCKS_PER_ROW)), 1
    return gpu_config(kind, op, vocab, _capability(_index(device)))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device_index))


def blocks_per_program(rows: int, blocks: int, device: torch.device) -> int:
    """How many blocks of a row one backward program writes: whole rows when there are rows
    enough to fill the GPU (a few programs per SM), else rows split so that there are."""
    if device.type != "cuda":  # the interpreter: its cost is per program
        return blocks
    wanted = 4 * _sm_count(_index(device))
    splits = min(blocks, max(1, -(-wanted // rows)))
    return -(-blocks // splits)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
