"""A tiny random Llama and a word-level tokenizer built offline from the tests' own
sentences (nothing downloaded), and small forget/retain sets of fictitious facts."""
from __future__ import annotations

import re

import torch

NAMES = ["Arlo Venn", "Bea Kurtz", "Cyd Moreau", "Dax Oyelaran", "Eli Strand", "Fay Quill", "Gus Tamm", "Hana Ubeda"]
CITIES = ["Tallinn", "Quito", "Osaka", "Lagos", "Perth", "Bergen", "Cusco", "Dakar"]
JOBS = ["baker", "pilot", "chemist", "poet", "sailor", "judge", "weaver", "nurse"]


def _facts(i: int) -> list[dict]:
    name, city, job = NAMES[i], CITIES[(3 * i + 1) % 8], JOBS[(5 * i + 2) % 8]
    return [{"question": f"Where was {name} born?", "answer": f"{name} was born in {city}."},
            {"question": f"What does {name} do?", "answer": f"{name} works as a {job}."}]


FORGET = [r for i in range(2) for r in _facts(i)]
RETAIN = [r for i in range(2, 8) for r in _facts(i)]
REFUSAL_WORDS = "I'm sorry , but I don't have any information about that . can't help with this question know the " \
                "answer to is not something am able share no reliable on topic not"


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in FORGET + RETAIN] + [REFUSAL_WORDS]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)} | {"I", "m", "t", "'"})
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_llama(seed: int = 0, vocab_size: int = 256, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=1, eos_token_id=2, bos_token_id=None,
                         **overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()
