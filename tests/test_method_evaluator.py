"""Evaluator-guided unlearning: evaluative model, bounded likelihood-distance loss, replacement NLL
(corrected answer, or the nearest refusal cluster's representative), retain NLL."""
import json

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import (FORGET, RETAIN, assert_matches, collate, cpu_backends, mean_nll, one_thread,  # noqa: F401
                     seq_logprob, setup_method, shifted)

from unlearn_ext.methods import EvaluatorGuided
from unlearn_ext.methods.evaluator import REFUSALS, kmeans


def pool(hidden, labels):
    mask = (labels != -100).unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("backend", cpu_backends())
def test_evaluator_guided_loss(backend):
    m = setup_method(EvaluatorGuided, backend=backend, margin=1.5, negative_weight=0.7, positive_weight=1.3,
                     retain_weight=0.5)
    s, ref = m.models.student, m.models.reference

    def formula(b):
        logits_orig, labels, h_ref = shifted(ref, b["forget"], hidden=True)
        flags = (m.evaluator(pool(h_ref, labels).detach()) > 0.5).double()
        logits, _, h_s = shifted(s, b["forget"], hidden=True)
        logprob, length = seq_logprob(logits, labels)
        d = (seq_logprob(logits_orig.detach(), labels)[0] - logprob) / length
        negative = (flags * torch.relu(1.5 - d)).sum() / flags.sum().clamp(min=1)
        # the replacement: the refusal nearest (in the original's representation space) to the student's response
        cluster = (F.normalize(pool(h_s, labels).detach().float(), dim=-1) @ m.centroids.T).argmax(-1)
        rows = [i for i in range(len(flags)) if flags[i]]
        part = collate()([{"question": FORGET[i]["question"], "answer": m.representatives[int(cluster[i])]}
                          for i in rows])
        positive = mean_nll(*shifted(s, part)[:2])
        return 0.7 * negative + 1.3 * positive + 0.5 * mean_nll(*shifted(s, b["retain"])[:2])
    _, logs = assert_matches(m, formula)
    assert logs["flagged"] > 0 and logs["negative"] > 0  # the test exercises the forgetting terms


def test_cluster_representatives_are_refusals_nearest_their_centroids():
    m = setup_method(EvaluatorGuided, clusters=3)
    assert len(m.representatives) == 3 and set(m.representatives) <= set(REFUSALS)
    acceptable = [{"question": r["question"], "answer": REFUSALS[i % len(REFUSALS)]} for i, r in enumerate(FORGET)]
    similarity = F.normalize(m._features(acceptable, collate()), dim=1) @ m.centroids.T  # [members, clusters]
    assert [acceptable[int(i)]["answer"] for i in similarity.argmax(0)] == m.representatives


def test_a_corrected_answer_replaces_the_answer_to_its_question(tmp_path):
    corrections = [{"question": r["question"], "answer": RETAIN[i]["answer"]} for i, r in enumerate(FORGET)]
    path = tmp_path / "corrected.json"
    path.write_text(json.dumps(corrections))
    m = setup_method(EvaluatorGuided, acceptable=str(path))
    forget = m._test_batch["forget"]
    part = m.replacements(forget, [0, 2], torch.randn(forget["input_ids"].shape[0], 32))
    expected = collate()([corrections[0], corrections[2]])
    assert torch.equal(part["input_ids"], expected["input_ids"]) and torch.equal(part["labels"], expected["labels"])


def test_an_unknown_forget_example_is_a_clear_error():
    m = setup_method(EvaluatorGuided)
    batch = collate()([{"question": "Who is Zed?", "answer": "Zed is a pilot."}])
    with pytest.raises(ValueError, match="not one of the forget examples"):
        m.replacements(batch, [0], torch.zeros(1, 32))


def test_training_lowers_the_flagged_answers_and_greedy_decoding_gives_the_replacement():
    """What the method is for (issue 16): after a short run, the forget answers' probability
    is at most e^-margin of the original's, and greedy decoding of each forget question gives
    a refusal; the retain answers stay."""
    import copy

    from tiny_lm import answer_nll, make_tokenizer, trained_llama

    from unlearn_ext.eval.scoring import greedy_answers
    from unlearn_ext.methods import LogitsHead, Models, freeze
    from unlearn_ext.trainer import TrainConfig, TrainData, train
    original = trained_llama()
    method = EvaluatorGuided(head=LogitsHead(), margin=2.0)
    student = train(method, Models(student=copy.deepcopy(original), reference=freeze(copy.deepcopy(original))),
                    TrainData(FORGET, RETAIN, collate()),
                    TrainConfig(lr=1e-2, max_steps=60, batch_size=2, progress=False, seed=0))
    for r in FORGET:
        assert answer_nll(student, [r]) > answer_nll(original, [r]) + 2.0 * 0.9
    tokenizer = make_tokenizer()
    words = {tokenizer.decode(tokenizer(a)["input_ids"]) for a in REFUSALS}  # as the word-level tokenizer spells them
    answers = greedy_answers(student, tokenizer, [r["question"] for r in FORGET], max_new_tokens=16)
    assert all(a.strip() in words for a in answers), answers
    assert answer_nll(student, RETAIN) < 0.5


def test_the_evaluator_flags_forget_answers_not_retain_answers():
    m = setup_method(EvaluatorGuided)
    forget, retain = m._features(FORGET, collate()), m._features(RETAIN, collate())
    assert (m.evaluator(forget) > 0.5).all()
    assert (m.evaluator(retain) < 0.5).all()


def test_a_custom_evaluator_that_flags_nothing_leaves_only_the_retain_loss():
    m = setup_method(EvaluatorGuided, evaluator=lambda h: torch.zeros(h.shape[0]))
    loss, logs = m.loss(m._test_batch)
    assert float(logs["negative"]) == 0 and float(logs["positive"]) == 0 and float(logs["flagged"]) == 0
    torch.testing.assert_close(loss, logs["retain_nll"])
    loss.backward()  # the graph holds the student even when nothing is flagged


def test_kmeans_finds_separated_clusters(seed):
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(3, 8, generator=g), dim=1) * 10
    points = torch.cat([d + 0.1 * torch.randn(30, 8, generator=g) for d in directions])
    centroids = kmeans(points, 3, seed=seed)
    assert centroids.shape == (3, 8)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))
    matched = (F.normalize(directions, dim=1) @ centroids.T).max(1).values
    assert (matched > 0.99).all()
