"""Evaluation with TOFU's metrics: ``evaluate`` (one model on a set of QA sets), the metric
functions themselves, and reports (JSON, Markdown, the forget-quality/utility plot)."""
from .evaluate import evaluate, forget_quality_against, kind_of
from .metrics import (answer_probability, auc, forget_quality, min_k_scores, model_utility, option_probability,
                      rouge_l_recall, truth_ratio, truth_ratio_score)
from .report import markdown_table, plot_tradeoff, summary_row, write_json, write_report, write_text

__all__ = ["evaluate", "forget_quality_against", "kind_of", "answer_probability", "auc", "forget_quality",
           "min_k_scores", "model_utility", "option_probability", "rouge_l_recall", "truth_ratio",
           "truth_ratio_score", "markdown_table", "plot_tradeoff", "summary_row", "write_json", "write_report",
           "write_text"]
