"""The CPU-scale model: a byte-level BPE tokenizer trained on the benchmark, a small Llama."""
from __future__ import annotations

import pytest
import torch

from unlearn_ext.data import QACollator
from unlearn_ext.data.synthetic import generate_benchmark
from unlearn_ext.eval import evaluate
from unlearn_ext.models.tiny import SIZES, build_tiny_llama, corpus_texts, train_tokenizer


@pytest.fixture(scope="module")
def splits():
    return generate_benchmark(num_authors=10, questions_per_author=20, seed=0)


@pytest.fixture(scope="module")
def tokenizer(splits):
    return train_tokenizer(corpus_texts(splits), vocab_size=1024)


def test_tokenizer_round_trips_and_specials(tokenizer, splits):
    texts = corpus_texts(splits)[:200] + ["Ünïcode, emoji 🙂 and \"quotes\" never seen in training."]
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.chat_template is None  # prompts are "Question: ...\nAnswer:"


def test_tokenizer_compresses_its_corpus(tokenizer, splits):
    text = " ".join(r["answer"] for r in splits["full"][:50])
    assert len(tokenizer(text)["input_ids"]) < len(text) / 3  # merges were learnt


def test_tokenizer_is_deterministic(splits):
    texts = corpus_texts(splits)
    assert train_tokenizer(texts, 600).get_vocab() == train_tokenizer(texts, 600).get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, 100)


def test_corpus_texts_cover_every_field(splits):
    texts = set(corpus_texts({"x": splits["forget10_perturbed"][:1]}))
    r = splits["forget10_perturbed"][0]
    assert "Question: " + r["question"] + "\nAnswer:" in texts
    assert {" " + r["answer"], " " + r["paraphrased_answer"], " " + r["perturbed_answer"][0]} <= texts


def test_build_is_seeded_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_llama(tokenizer, seed=1)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b, c = build_tiny_llama(tokenizer, seed=1), build_tiny_llama(tokenizer, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert a.config.vocab_size == len(tokenizer) and a.config.hidden_size == SIZES["cpu"]["hidden_size"]
    assert a.get_output_embeddings().weight is a.get_input_embeddings().weight  # tied
    with pytest.raises(ValueError, match="size"):
        build_tiny_llama(tokenizer, size="huge")


def test_tiny_llama_learns_and_is_evaluated_end_to_end(tokenizer, splits):
    """Fit four answers, then evaluate: the greedy answers are the trained ones (the
    generation prompt is the training prompt) and probabilities match a float64 oracle."""
    records = splits["forget10_perturbed"][:4]
    model = build_tiny_llama(tokenizer, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    batch = QACollator(tokenizer)(records)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    result = evaluate(model, tokenizer, {"forget": records}, batch_size=3)
    f = result["sets"]["forget"]
    assert f["per_example"]["generation"] == [r["answer"] for r in records]
    assert f["rouge"] == 1.0
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits.double(), -1)[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    expected = (picked.sum(1) / mask.sum(1)).exp()
    torch.testing.assert_close(torch.tensor(f["per_example"]["prob"], dtype=torch.float64), expected,
                               rtol=1e-4, atol=1e-6)
    assert f["prob"] > 0.9 and f["truth_ratio"] < 0.5  # right answers far above the wrong ones
