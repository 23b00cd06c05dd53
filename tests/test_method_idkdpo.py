"""IdkDPO: (2/β)·softplus(−β((ℓ_w − ℓ_w^ref) − (ℓ_l − ℓ_l^ref))) with a refusal w preferred over
the forget answer l, + retain NLL."""
import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import (FORGET, RETAIN, answer_nll, assert_matches, collate, cpu_backends, mean_nll,  # noqa: F401
                     one_thread, seq_logprob, setup_method, shifted, trained_llama)

from unlearn_ext.methods import IdkDPO, LogitsHead, Models, PrepareData, freeze
from unlearn_ext.methods.idkdpo import IDK_ANSWERS
from unlearn_ext.trainer import TrainConfig, TrainData, train


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("beta,retain_weight", [(0.1, 1.0), (1.0, 0.0)])
def test_idkdpo(backend, beta, retain_weight):
    m = setup_method(IdkDPO, backend=backend, beta=beta, retain_weight=retain_weight)
    s, ref = m.models.student, m.models.reference
    torch.manual_seed(0)
    idk = m.idk_part(m._test_batch["forget"])  # the refusals the loss will draw after the same seed
    assert (idk["labels"] != -100).any()

    def logratio(part):
        return seq_logprob(*shifted(s, part)[:2])[0] - seq_logprob(*shifted(ref, part)[:2])[0].detach()

    def formula(b):
        value = (2 / beta * F.softplus(-beta * (logratio(idk) - logratio(b["forget"])))).mean()
        return value + retain_weight * mean_nll(*shifted(s, b["retain"])[:2]) if retain_weight else value
    torch.manual_seed(0)
    assert_matches(m, formula)


def test_refusals_pair_with_the_batch_questions():
    m = setup_method(IdkDPO)
    torch.manual_seed(1)
    idk = m.idk_part(m._test_batch["forget"])
    tok = collate().tokenizer
    for row, example in zip(idk["input_ids"], FORGET[:3]):
        text = tok.decode(row[row != collate().pad_id])
        assert example["question"].split()[-1].rstrip("?") in text and example["answer"] not in text


def test_idk_file_and_its_errors(tmp_path):
    path = tmp_path / "idk.jsonl"
    path.write_text("I have no clue.\n\n  No idea at all.  \n")
    m = setup_method(IdkDPO, idk_file=str(path))
    assert m.idk_answers == ("I have no clue.", "No idea at all.")
    assert setup_method(IdkDPO).idk_answers == IDK_ANSWERS and len(IDK_ANSWERS) >= 10
    with pytest.raises(FileNotFoundError, match="option 'idk_file'"):
        setup_method(IdkDPO, idk_file=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no answer"):
        setup_method(IdkDPO, idk_file=str(tmp_path / "empty.txt"))


def test_unknown_forget_examples_are_an_error():
    m = IdkDPO(head=LogitsHead())
    model = trained_llama()
    m.prepare(Models(student=model, reference=freeze(copy.deepcopy(model))), PrepareData(FORGET[:1], RETAIN, collate()))
    with pytest.raises(ValueError, match="not one of the forget examples"):
        m.loss({"forget": collate()(FORGET[1:2]), "retain": collate()(RETAIN[:1])})


def test_a_few_steps_prefer_the_refusal():
    original = trained_llama()
    method = IdkDPO(head=LogitsHead())
    student = train(method, Models(student=copy.deepcopy(original), reference=freeze(copy.deepcopy(original))),
                    TrainData(FORGET, RETAIN, collate()),
                    TrainConfig(lr=2e-3, max_steps=6, batch_size=2, progress=False, seed=3))
    refusals = [{"question": ex["question"], "answer": IDK_ANSWERS[0]} for ex in FORGET]
    print(f"refusal NLL {answer_nll(original, refusals):.3f} -> {answer_nll(student, refusals):.3f}, "
          f"forget NLL {answer_nll(original, FORGET):.4f} -> {answer_nll(student, FORGET):.4f}")
    assert answer_nll(student, refusals) < answer_nll(original, refusals) - 0.1
    assert answer_nll(student, FORGET) > answer_nll(original, FORGET) + 0.05
