"""A small Llama built from a config, with a byte-level BPE tokenizer trained on the
benchmark's own text: the CPU-scale model of the offline benchmark (nothing downloaded).

    splits = generate_benchmark(num_authors=40, questions_per_author=20)
    tokenizer = train_tokenizer(corpus_texts(splits))
    model = build_tiny_llama(tokenizer, size="cpu")

Byte-level BPE decodes exactly what it encoded (ROUGE sees the real text) and never needs
an unknown token. No chat template by default, so prompts are ``Question: …\\nAnswer:``
(:func:`unlearn_ext.data.format_prompt`).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from ..data.collate import format_prompt

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# "cpu": 0.8M parameters besides the embeddings; fits 40 authors x 20 questions (plus the
# real-world sets) in 30 epochs, about 3 CPU-minutes. "gpu": 75M besides the embeddings.
SIZES = {
    "cpu": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2),
    "gpu": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4),
}


def corpus_texts(splits: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """Every prompt and answer text of the given splits (each text once, in a fixed
    order): what the tokenizer should compress well."""
    texts: dict[str, None] = {}
    for records in splits.values():
        for r in records:
            if "question" not in r:
                continue  # e.g. the author profiles
            texts[format_prompt(r["question"])] = None
            for key in ("answer", "paraphrased_answer", "paraphrased_question"):
                if key in r:
                    texts[" " + r[key]] = None
            for a in r.get("perturbed_answer", ()):
                texts[" " + a] = None
    return list(texts)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, chat_template: str | None = None):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``
    with ``<|endoftext|>`` as end-of-sequence and ``<|pad|>`` as padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + special tokens + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   chat_template=chat_template, model_max_length=1024)


def build_tiny_llama(tokenizer, size: str = "cpu", seed: int = 0, max_position_embeddings: int = 256,
                     **overrides):
    """A freshly initialised ``LlamaForCausalLM`` sized by ``SIZES[size]`` (any config
    field can be overridden), its vocabulary matching ``tokenizer``, tied embeddings.
    The initialisation depends on ``seed`` only (the global RNG is left untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **{**SIZES[size], **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
