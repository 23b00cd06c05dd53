"""evaluate() and its scoring on a fake model whose answers are known exactly.

The fake model is a bigram table: the logits after token x are ``table[x]``, whatever came
before. So an answer's log-probability is a sum of table entries (the oracle below walks the
tokens one by one in float64), and greedy generation follows the table's row maxima.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKEND_DEVICES
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

from unlearn_ext.data import format_prompt
from unlearn_ext.eval import evaluate, forget_quality_against, kind_of, metrics, report
from unlearn_ext.eval.scoring import greedy_answers, score_answers

WORDS = ["<eos>", "<pad>", "<unk>", "Question:", "Answer:", "who", "where", "what", "is", "was", "born", "x", "y",
         "z", "in", "Paris", "Rome", "Oslo", "Lima", "the", "author", "city", "of", "a", "b", "c"]
ID = {w: i for i, w in enumerate(WORDS)}
V = len(WORDS)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


class BigramConfig(PretrainedConfig):
    model_type = "unlearn_ext_test_bigram"


class Bigram(PreTrainedModel, GenerationMixin):
    config_class = BigramConfig

    def __init__(self, table: torch.Tensor):
        super().__init__(BigramConfig(vocab_size=V, eos_token_id=ID["<eos>"], pad_token_id=ID["<pad>"]))
        self.table = torch.nn.Parameter(table.float())
        self.generation_config.use_cache = False  # nothing to cache: each step reads one row

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutputWithPast(logits=self.table[input_ids])


def oracle_token_logprobs(table, tokenizer, question, answer):
    """Log-probabilities of the answer's tokens (+ end of sequence), walked one by one."""
    prev = tokenizer(format_prompt(question))["input_ids"][-1]
    logp = torch.log_softmax(table.double(), dim=-1)
    out = []
    for token in tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [ID["<eos>"]]:
        out.append(float(logp[prev, token]))
        prev = token
    return out


PAIRS = [("who is x", "Paris"), ("where was y born", "the author was born in Rome"), ("what is z", "Oslo"),
         ("who is x", "a b c"), ("where is the city", "Lima is the city of a"), ("what", "y")]


@pytest.mark.parametrize("backend", sorted({b for b, d in BACKEND_DEVICES if d == "cpu"}))
def test_score_answers_match_oracle(seed, backend):
    table = torch.randn(V, V) * 3
    tok = word_tokenizer()
    got = score_answers(Bigram(table), tok, PAIRS, batch_size=4, min_k=0.4, backend=backend)
    for i, (q, a) in enumerate(PAIRS):
        tokens = oracle_token_logprobs(table, tok, q, a)
        assert got["length"][i] == len(tokens)
        assert got["logprob"][i].item() == pytest.approx(sum(tokens), rel=1e-5, abs=1e-5)
        num = max(1, int(len(tokens) * 0.4))
        assert got["min_k"][i].item() == pytest.approx(sum(sorted(tokens)[:num]) / num, rel=1e-5, abs=1e-5)


def chain_table(chains: dict[str, list[str]]) -> torch.Tensor:
    """A table whose greedy continuation of each key is its chain, then <eos>."""
    table = torch.zeros(V, V)
    for start, words in chains.items():
        for prev, nxt in zip([start] + words, words + ["<eos>"]):
            table[ID[prev], ID[nxt]] = 10.0
    return table


def test_greedy_answers_follow_the_table():
    tok = word_tokenizer()
    model = Bigram(chain_table({"Answer:": ["Paris", "is", "a", "city"]}))
    got = greedy_answers(model, tok, ["who is x", "where was y born in the city of a"], max_new_tokens=10,
                         batch_size=2)
    assert got == ["Paris is a city", "Paris is a city"]
    assert tok.padding_side == "right"  # restored after left-padded generation


def _record(q, a, para, perturbed):
    return {"question": q, "answer": a, "paraphrased_answer": para, "perturbed_answer": perturbed}


def test_evaluate_on_uniform_model_closed_form():
    """Uniform logits: every token has probability 1/V, so every answer's normalised
    probability is 1/V, every truth ratio is 1, every option has probability 1/(K+1),
    and members and non-members score alike."""
    tok = word_tokenizer()
    model = Bigram(torch.zeros(V, V))
    forget = [_record("who is x", "Paris", "the city Paris", ["Rome", "Oslo is a city"]),
              _record("what is z", "a b", "b", ["c", "a"])]
    retain = [_record("where was y born", "Lima", "in Lima", ["in Rome", "in Oslo"])]
    facts = [{"question": "what is the city", "answer": "Rome", "perturbed_answer": ["Lima", "Oslo", "Paris"]}]
    holdout = [{"question": "who is y", "answer": "Oslo"}, {"question": "who is z", "answer": "c a"}]
    res = evaluate(model, tok, {"forget10_perturbed": forget, "retain_perturbed": retain, "world_facts": facts,
                                "holdout10": holdout}, generate=False, batch_size=2)
    sets = res["sets"]
    assert sets["forget10_perturbed"]["prob"] == pytest.approx(1 / V)
    assert sets["forget10_perturbed"]["truth_ratio"] == pytest.approx(1.0)  # min(R, 1/R) = 1
    assert sets["retain_perturbed"]["truth_ratio"] == pytest.approx(0.0)  # max(0, 1 - R) = 0
    assert sets["world_facts"]["prob"] == pytest.approx(1 / 4)
    assert res["mia_auc"] == pytest.approx(0.5)
    assert res["model_utility"] is None  # no ROUGE without generation
    assert sets["holdout10"]["kind"] == "holdout" and "prob" not in sets["holdout10"]


def test_evaluate_matches_oracle_and_generates(seed):
    tok = word_tokenizer()
    table = torch.randn(V, V)
    table[ID["Answer:"], ID["Paris"]] = 12.0  # greedy answer: "Paris", then <eos>
    table[ID["Paris"], ID["<eos>"]] = 12.0
    model = Bigram(table)
    forget = [_record("who is x", "Paris", "the city Paris", ["Rome", "Oslo is a city", "Lima"]),
              _record("what is z", "Paris is a city", "a b", ["c", "a", "b c"])]
    retain = [_record("where was y born", "in Lima", "Lima", ["Rome", "Oslo", "Paris"])]
    books = [{"question": "who is the author", "answer": "Paris", "perturbed_answer": ["Rome", "Lima"]}]
    facts = [{"question": "what is the city", "answer": "Rome", "perturbed_answer": ["Lima", "Oslo"]}]
    holdout = [{"question": "who is y", "answer": "Oslo"}, {"question": "who is z", "answer": "a b c"}]
    sets_in = {"forget05_perturbed": forget, "retain_perturbed": retain, "real_authors_perturbed": books,
               "world_facts_perturbed": facts, "holdout05": holdout}
    res = evaluate(model, tok, sets_in, batch_size=2)

    def lp(q, a):
        return sum(oracle_token_logprobs(table, tok, q, a))

    def norm(q, a):
        return lp(q, a) / len(oracle_token_logprobs(table, tok, q, a))

    def ratio(r, reference):
        return math.exp(sum(norm(r["question"], p) for p in r["perturbed_answer"]) / len(r["perturbed_answer"])
                        - norm(r["question"], reference))

    sets = res["sets"]
    f = sets["forget05_perturbed"]
    assert f["prob"] == pytest.approx(sum(math.exp(norm(r["question"], r["answer"])) for r in forget) / 2, rel=1e-5)
    ratios = [ratio(r, r["paraphrased_answer"]) for r in forget]
    assert f["per_example"]["truth_ratio_raw"] == pytest.approx(ratios, rel=1e-4)
    assert f["truth_ratio"] == pytest.approx(sum(min(x, 1 / x) for x in ratios) / 2, rel=1e-4)
    assert f["per_example"]["generation"] == ["Paris", "Paris"]
    assert f["rouge"] == pytest.approx((1.0 + 1 / 4) / 2)  # "Paris" recalls 1 of 4 words of the second
    r = retain[0]
    assert sets["retain_perturbed"]["truth_ratio"] == pytest.approx(max(0.0, 1 - ratio(r, r["paraphrased_answer"])),
                                                                    rel=1e-4, abs=1e-6)
    for name, recs in (("real_authors_perturbed", books), ("world_facts_perturbed", facts)):
        r = recs[0]
        options = [math.exp(norm(r["question"], a)) for a in [r["answer"]] + r["perturbed_answer"]]
        assert sets[name]["prob"] == pytest.approx(options[0] / sum(options), rel=1e-5)
        # no paraphrase on these sets: the truth ratio's reference is the answer
        assert sets[name]["truth_ratio"] == pytest.approx(max(0.0, 1 - ratio(r, r["answer"])), rel=1e-4, abs=1e-6)
    values = [sets[n][m] for n in ("retain_perturbed", "real_authors_perturbed", "world_facts_perturbed")
              for m in ("prob", "rouge", "truth_ratio")]
    assert res["model_utility"] == pytest.approx(metrics.model_utility(values))
    assert 0.0 <= res["mia_auc"] <= 1.0
    assert res["forget_quality"] is None

    same = forget_quality_against(res, res)
    assert same["forget_quality"] == pytest.approx(1.0) and same["ks_statistic"] == 0.0
    with_reference = evaluate(model, tok, sets_in, generate=False, retain_reference=res)
    assert with_reference["forget_quality"] == pytest.approx(1.0)


def test_evaluate_membership_separates_memorised_answers():
    tok = word_tokenizer()
    table = chain_table({"Answer:": ["Paris"]})  # "Paris" is certain, anything else is not
    forget = [_record("who is x", "Paris", "Paris", ["Rome"]), _record("what is z", "Paris", "Paris", ["Lima"])]
    holdout = [{"question": "who is y", "answer": "Oslo"}, {"question": "who is z", "answer": "Rome a"}]
    res = evaluate(Bigram(table), tok, {"forget01_perturbed": forget, "holdout01": holdout}, generate=False)
    assert res["mia_auc"] == 1.0


def test_evaluate_bad_sets():
    tok, model = word_tokenizer(), Bigram(torch.zeros(V, V))
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, tok, {"retain": []})
    ragged = [_record("who is x", "Paris", "Paris", ["Rome"]), _record("what is z", "a", "a", ["b", "c"])]
    with pytest.raises(ValueError, match="one length"):
        evaluate(model, tok, {"forget": ragged}, generate=False)
    with pytest.raises(ValueError, match="kind"):
        evaluate(model, tok, {"x": [{"question": "what", "answer": "a"}]}, kinds={"x": "nonsense"})
    with pytest.raises(ValueError, match="forget set"):
        forget_quality_against({"sets": {}}, {"sets": {}})


def test_kind_of_tofu_names():
    assert [kind_of(n) for n in ("forget10_perturbed", "retain_perturbed", "real_authors_perturbed",
                                 "world_facts", "holdout05", "keep")] == \
        ["forget", "retain", "options", "options", "holdout", "retain"]


def test_report_files(tmp_path):
    rows = [{"method": "target", "split": "forget10", "forget_quality": 1e-9, "model_utility": 0.6, "mia_auc": 0.9},
            {"method": "NPO", "split": "forget10", "forget_quality": 0.3, "model_utility": 0.55, "mia_auc": 0.5},
            {"method": "GA", "split": "forget05", "forget_quality": 0.0, "model_utility": 0.0, "mia_auc": None}]
    paths = report.write_report(rows, tmp_path, name="bench", details={"seed": 1}, title="test")
    table = open(paths["markdown"]).read()
    assert "| method | split | forget_quality | model_utility | mia_auc |" in table
    assert "| NPO | forget10 | 0.300 | 0.550 | 0.500 |" in table
    assert "| target | forget10 | 1.00e-09 | 0.600 | 0.900 |" in table
    assert "| GA | forget05 | 0.000 | 0.000 | – |" in table
    import json
    assert json.load(open(paths["json"]))["rows"][1]["method"] == "NPO"
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        report.markdown_table([])


def test_summary_row_flattens_sets():
    result = {"forget_quality": 0.2, "model_utility": 0.5, "mia_auc": 0.6,
              "sets": {"forget10_perturbed": {"prob": 0.1, "rouge": 0.2, "truth_ratio": 0.3, "per_example": {}},
                       "holdout10": {"kind": "holdout", "per_example": {}}}}
    row = report.summary_row("NPO", result, split="forget10")
    assert row == {"method": "NPO", "split": "forget10", "forget_quality": 0.2, "model_utility": 0.5, "mia_auc": 0.6,
                   "forget10_perturbed.prob": 0.1, "forget10_perturbed.rouge": 0.2,
                   "forget10_perturbed.truth_ratio": 0.3}
