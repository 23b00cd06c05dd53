"""``make demo``'s wiring (unlearn_ext/demo.py) on a tiny Llama that memorised fictitious
facts, through the demo's model and data seams: SmolLM2 itself is exercised by
``make demo`` (minutes), not here."""
from __future__ import annotations

import json

import pytest
from tiny_lm import FORGET, RETAIN, make_tokenizer, one_thread, trained_llama  # noqa: F401

from unlearn_ext import demo

SETS = {"forget": FORGET, "keep": RETAIN[:6], "general": RETAIN[6:]}


def test_demo_forgets_keeps_and_reports(tmp_path, capsys):
    model, tokenizer = trained_llama(), make_tokenizer()
    report = demo.main(["--out", str(tmp_path), "--no-progress", "--steps", "12", "--lr", "1e-2",
                        "--train-layers", "1", "--max-new-tokens", "12"],
                       load=lambda cache_dir: (model, tokenizer, {"model": "tiny"}), sets=SETS)
    rows = {r["set"]: r for r in report["rows"]}
    assert list(rows) == list(SETS)
    assert rows["forget"]["prob_before"] > 0.5 and rows["forget"]["prob_after"] < rows["forget"]["prob_before"] / 4
    assert rows["keep"]["prob_after"] > 0.8 * rows["keep"]["prob_before"]
    unlearning = report["unlearning"]
    assert unlearning["method"] == "npo_rt" and unlearning["head"] == "fused" and unlearning["steps"] == 12
    assert unlearning["trained_blocks"] == "last 1 of 2"
    # Only the last block moved: the first and the embeddings are as trained.
    fresh = trained_llama()
    for name, p in model.named_parameters():
        same = p.detach().equal(dict(fresh.named_parameters())[name].detach())
        assert same != name.startswith("model.layers.1."), name

    saved = json.loads((tmp_path / "demo_report.json").read_text())
    assert saved["rows"] == report["rows"]
    text = (tmp_path / "demo_report.md").read_text()
    assert text in capsys.readouterr().out  # printed as written
    for name, records in SETS.items():
        assert f"## {name}" in text
        for r in records:
            assert f"| {r['question']} |" in text
    after = saved["after"]["sets"]["forget"]["per_example"]
    assert after["generation"] != saved["before"]["sets"]["forget"]["per_example"]["generation"]


def test_train_layers_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="train_layers"):
        demo.unlearn(trained_llama(), make_tokenizer(), FORGET, RETAIN, seed=0, progress=False, train_layers=3)
