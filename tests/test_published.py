"""The report's side-by-side with the published TOFU figures (unlearn_ext/published.py)."""
from unlearn_ext.published import PUBLISHED, side_by_side


def _row(method, fq, mu, split="forget10"):
    return {"split": split, "method": method, "forget_quality": fq, "model_utility": mu}


def test_each_row_gets_the_published_pairs_and_the_orderings_are_counted():
    # RKLD's paper at forget10: rkld 0.52 > npo_rt 0.40 > npo 0.10 > graddiff 0.0012 > ga 1.2e-4.
    rows = [_row("retain", 1.0, 0.5), _row("finetuned", 1e-9, 0.5), _row("ga", 0.3, 0.1), _row("npo", 0.2, 0.4),
            _row("rkld", 0.6, 0.45), _row("idkdpo", 0.01, 0.5), _row("npo_rt", 0.1, 0.4, split="forget05")]
    text = "\n".join(side_by_side(rows, ["forget01", "forget10", "forget05"]))
    assert "### forget01" not in text  # no rows of ours there
    assert "| ga | 0.3 / 0.10 | 0.00012 / 0.00 | 1e-239 / 0.00 |" in text
    assert "| rkld | 0.6 / 0.45 | 0.52 / – | – |" in text
    assert "| idkdpo | 0.01 / 0.50 | – | – |" in text
    # ours: rkld > ga > npo; theirs: rkld > npo > ga: (ga, npo) unlike, (ga, rkld) and (npo, rkld) alike.
    assert "against RKLD paper (Llama-2-7B-chat, its Table 8): 2 of 3 pairs of methods (ga, npo, rkld)" in text
    # open-unlearning has only ga among ours at forget10: no pair, no line; forget05: npo_rt alone, none either.
    assert "against open-unlearning" not in text


def test_the_published_figures_are_fractions_in_range():
    for source in PUBLISHED.values():
        for splits in source.values():
            for fq, mu in splits.values():
                assert 0 <= fq <= 1 and (mu is None or 0 <= mu <= 1)
