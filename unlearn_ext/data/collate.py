"""Question/answer examples to causal-LM batches.

A batch is a dict of [B, T] int64 tensors: ``input_ids``, ``attention_mask`` and
``labels``; ``labels`` equal ``input_ids`` on answer tokens and −100 on the prompt and on
padding, unshifted (the losses compare logits[:, :-1] with labels[:, 1:]). Unlearning
methods take ``{"forget": batch, "retain": batch}``. The trainer adds ``example_id`` [B] to
each part it collates (the examples' numbers, the frozen cache's key; see unlearn_ext.trainer).

Prompt and answer are tokenised separately and concatenated, so the label mask falls
exactly on the answer's tokens whatever the tokenizer merges across the boundary.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

IGNORE_INDEX = -100


def format_prompt(question: str, tokenizer=None) -> str:
    """The text before the answer: the tokenizer's chat template when it has one (instruct
    models), else ``Question: …\\nAnswer:``."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def encode_qa(tokenizer, question: str, answer: str, max_length: int = 512) -> dict[str, list[int]]:
    """Token ids of prompt + answer (+ end-of-sequence) and labels masking the prompt.
    Over-long examples lose the end of the answer, never the prompt."""
    prompt_ids = tokenizer(format_prompt(question, tokenizer), add_special_tokens=True)["input_ids"]
    chat = bool(getattr(tokenizer, "chat_template", None))
    answer_ids = tokenizer(answer if chat else " " + answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        raise ValueError(f"the prompt alone has {len(prompt_ids)} tokens, max_length is {max_length}")
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


class QACollator:
    """Encodes a list of {"question", "answer"} examples into one right-padded batch."""

    def __init__(self, tokenizer, max_length: int = 512):
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token")
        self.pad_id = pad

    def __call__(self, examples: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        encoded = [encode_qa(self.tokenizer, ex["question"], ex["answer"], self.max_length) for ex in examples]
        width = max(len(e["input_ids"]) for e in encoded)
        batch = {
            "input_ids": torch.full((len(encoded), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(encoded), width), dtype=torch.long),
            "labels": torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(e["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(e["labels"])
        return batch
