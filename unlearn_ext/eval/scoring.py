"""What the metrics need from a model: answer log-probabilities and greedy answers.

Answers are scored exactly as they are trained (:class:`unlearn_ext.data.QACollator`:
prompt tokens masked, one end-of-sequence token counted), and token log-probabilities come
from the library's own ``token_logprob`` kernel over the whole [B, T, V] batch. Batches
are formed from examples sorted by length, so little compute goes to padding; results come
back in the caller's order.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from ..data.collate import IGNORE_INDEX, QACollator, format_prompt
from ..ops.token_logprob import token_logprob
from .metrics import min_k_scores


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _length_sorted_batches(lengths: Sequence[int], batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score_answers(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                  min_k: float | None = None, max_length: int = 512, backend: str | None = None,
                  on_batch: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """For each (question, answer): ``logprob`` ℓ (sum over answer tokens, float64),
    ``length`` n (answer tokens) and, with ``min_k``, ``min_k`` (the Min-K % score)."""
    collator = QACollator(tokenizer, max_length)
    device = model_device(model)
    out = {"logprob": torch.zeros(len(pairs), dtype=torch.float64),
           "length": torch.zeros(len(pairs), dtype=torch.long)}
    if min_k is not None:
        out["min_k"] = torch.zeros(len(pairs), dtype=torch.float64)
    for index in _length_sorted_batches([len(q) + len(a) for q, a in pairs], batch_size):
        batch = collator([{"question": pairs[i][0], "answer": pairs[i][1]} for i in index])
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
        tokens = token_logprob(logits[:, :-1], labels, backend=backend)  # 0 on ignored positions
        counted = labels != IGNORE_INDEX
        out["logprob"][index] = tokens.sum(dim=1).double().cpu()
        out["length"][index] = counted.sum(dim=1).cpu()
        if min_k is not None:
            out["min_k"][index] = min_k_scores(tokens, counted, min_k).cpu()
        if on_batch is not None:
            on_batch()
    return out


@contextlib.contextmanager
def _left_padded(tokenizer):
    """Batched generation needs prompts padded on the left (their last token is where
    generation starts); restore the tokenizer afterwards."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 64,
                   batch_size: int = 16, on_batch: Callable[[], None] | None = None) -> list[str]:
    """The model's greedy answer to each question, prompted as in training
    (:func:`unlearn_ext.data.format_prompt`), special tokens removed."""
    device = model_device(model)
    answers: list[str] = [""] * len(questions)
    prompts = [format_prompt(q, tokenizer) for q in questions]
    with _left_padded(tokenizer):
        for index in _length_sorted_batches([len(p) for p in prompts], batch_size):
            enc = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=True)
            generated = model.generate(input_ids=enc["input_ids"].to(device),
                                       attention_mask=enc["attention_mask"].to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(index, texts):
                answers[i] = text.strip()
            if on_batch is not None:
                on_batch()
    return answers
