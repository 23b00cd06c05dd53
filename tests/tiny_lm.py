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


_TRAINED: dict[int, dict] = {}


def trained_llama(seed: int = 0, steps: int = 150):
    """A tiny Llama that has memorised FORGET and RETAIN (plain full-batch Adam: fast and
    independent of the trainer under test). Cached per process."""
    from unlearn_ext.data import QACollator
    model = tiny_llama(seed)
    if seed not in _TRAINED:
        batch = QACollator(make_tokenizer())(FORGET + RETAIN)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        _TRAINED[seed] = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_TRAINED[seed])
    return model


def collate():
    from unlearn_ext.data import QACollator
    return QACollator(make_tokenizer())


def method_batch(forget=None, retain=None):
    c = collate()
    return {"forget": c(forget or FORGET[:3]), "retain": c(retain or RETAIN[:3])}


@torch.no_grad()
def answer_nll(model, records) -> float:
    """Mean NLL over the answer tokens of ``records`` (HF's own shifted loss)."""
    model.eval()
    return float(model(**collate()(records)).loss)


# ---- plain-PyTorch transcriptions of the method formulas (float64, torch.nn.functional only) ----
import torch.nn.functional as F  # noqa: E402


def shifted(model, part, hidden: bool = False):
    """(logits [B, T-1, V] float64, labels [B, T-1], last hidden [B, T-1, H] or None)."""
    out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], output_hidden_states=hidden)
    h = out.hidden_states[-1][:, :-1] if hidden else None
    return out.logits[:, :-1].double(), part["labels"][:, 1:], h


def mean_nll(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def seq_logprob(logits, labels):
    """Σ over answer tokens of log p(y_t), and the answer lengths, per sequence."""
    mask = labels != -100
    picked = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def mean_forward_kl(logits, teacher_logits, labels):
    """KL(teacher ‖ student) averaged over answer tokens."""
    mask = labels != -100
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits.detach(), -1), log_target=True,
                  reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum()


def perturbed(model, scale: float = 0.02, seed: int = 1):
    """``model`` with seeded Gaussian noise on every weight (so that it differs from its reference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def assert_matches(method, formula, rtol=1e-5, grad_rtol=1e-4):
    """``method.loss(batch)`` equals ``formula()`` in value and in its gradient with respect
    to every trainable parameter of the student (float32 kernels against a float64
    transcription: element errors are bounded relative to the gradient's largest entry)."""
    batch = method._test_batch
    params = [p for p in method.models.student.parameters() if p.requires_grad]
    loss, logs = method.loss(batch)
    grads = torch.autograd.grad(loss, params)
    expected = formula(batch)
    expected_grads = torch.autograd.grad(expected, params)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=rtol, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want.double(), rtol=grad_rtol, atol=1e-5 * scale + 1e-12)
    assert all(torch.isfinite(v).all() for v in logs.values())
    return loss, logs


def setup_method(cls, *, backend=None, reference=True, data=None, **options):
    """A method on a perturbed copy of the trained tiny Llama, its frozen original as
    reference, prepared on FORGET/RETAIN, with a test batch at ``method._test_batch``."""
    import copy

    from unlearn_ext.methods import LogitsHead, Models, PrepareData, freeze
    original = trained_llama()
    student = perturbed(copy.deepcopy(original))
    method = cls(head=LogitsHead(backend), **options)
    models = Models(student=student, reference=freeze(original) if reference else None)
    method.prepare(models, data or PrepareData(FORGET, RETAIN, collate(), seed=0))
    method._test_batch = method_batch()
    return method


def cpu_backends() -> list[str]:
    """The loss backends this machine runs on the CPU (torch, the C++ kernels, …)."""
    from conftest import BACKEND_DEVICES
    return [b for b, d in BACKEND_DEVICES if d == "cpu"]


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
