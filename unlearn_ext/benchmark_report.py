"""The benchmark's report, rewritten after every stage from what has finished:
``benchmark.json`` (rows, the grid, the details), ``benchmark.md`` (tables),
``benchmark.png`` (forget quality against model utility, each method's selected setting),
``grid.png`` (every setting run) and ``dynamics/<split>-<method>.png`` (the selected run's
answer probabilities during unlearning, when the benchmark evaluates during training) and,
with the grid, ``configs/<method>.yaml`` (:mod:`unlearn_ext.benchmark_configs`)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from .benchmark_configs import write_configs
from .eval import summary_row
from .eval.report import markdown_table, plot_tradeoff, write_json, write_text
from .published import side_by_side

TABLE_COLUMNS = ("split", "method", "setting", "forget_quality", "model_utility", "forget.prob", "forget.rouge",
                 "forget.truth_ratio", "retain.prob", "retain.rouge", "real_authors.prob", "world_facts.prob",
                 "mia_auc", "unlearn_s")
GRID_COLUMNS = ("split", "method", "setting", "selected", "forget_quality", "model_utility", "forget.prob",
                "retain.prob", "unlearn_s")
KNOWLEDGE_COLUMNS = ("split", "model", "forget.prob", "forget.rouge", "forget.truth_ratio",
                     "retain.prob", "retain.rouge")


def _row(name: str, result: dict, split: str, **extra) -> dict:
    return {**summary_row(name, result, split=split), **extra}


def build_rows(state: dict) -> dict:
    """rows (retain, finetuned, each method's selected setting), default_rows (each method
    at its defaults), grid_rows (every run), knowledge (target vs retain model), details."""
    from .benchmark import default_setting, select
    scale = state["scale"]
    rows, default_rows, grid_rows, knowledge, details = [], [], [], [], {}
    for split in state["splits"]:
        done = state["splits_done"].get(split)
        if done is None:
            continue
        reference, target = done["retain"], done["finetuned"]
        rows.append(_row("retain", reference, split, forget_quality=1.0, unlearn_s=None))  # KS test against itself
        rows.append(_row("finetuned", target, split, unlearn_s=None))
        for model, result in (("finetuned (target)", target), ("retain model", reference)):
            knowledge.append({"split": split, "model": model,
                              **{f"{s}.{m}": result["sets"][s].get(m) for s in ("forget", "holdout", "retain")
                                 for m in ("prob", "rouge", "truth_ratio") if m in result["sets"][s]}})
        results = {"retain": reference, "finetuned": target}
        options, selected = {}, {}
        for name in state["methods"]:
            runs = done["runs"].get(name)
            if not runs:
                continue
            best = select([r["summary"] for r in runs.values()], target["model_utility"])
            chosen = runs[best["label"]]
            selected[name] = best["label"]
            rows.append(_row(name, chosen["result"], split, setting=chosen["setting"], unlearn_s=chosen["unlearn_s"]))
            results[name], options[name] = chosen["result"], chosen["options"]
            default = runs.get(default_setting(name, split, scale).label())
            if default is not None:
                default_rows.append(_row(name, default["result"], split, setting=default["setting"],
                                         unlearn_s=default["unlearn_s"]))
            for label, run in runs.items():
                grid_rows.append(_row(name, run["result"], split, setting=run["setting"], unlearn_s=run["unlearn_s"],
                                      selected="yes" if label == best["label"] else ""))
        details[split] = {"method_options": options, "selected": selected, "results": results}
    return {"rows": rows, "default_rows": default_rows, "grid_rows": grid_rows, "knowledge": knowledge,
            "details": details}


def markdown_report(report: dict) -> str:
    from .benchmark import KNOBS, LR_FACTORS, METHOD_LR, METHOD_LR_FACTORS, SELECTION, method_options, Scale
    s = report["scale"]
    scale = Scale(**s)
    methods = ", ".join(report["methods"])
    if s["model"] == "smollm2":
        model = (f"SmolLM2-135M-Instruct ({report['parameters'] / 1e6:.1f}M parameters, its own tokenizer and chat "
                 "template) as the pretrained base")
    else:
        model = (f"a Llama of {report['parameters'] / 1e6:.2f}M parameters (size `{s['model']}`, BPE vocabulary "
                 f"{s['vocab_size']}) built from a config")
    stand_ins = ("both with the real-world stand-ins" if s["teach_stand_ins"]
                 else "the real-world sets are not trained on: they probe what the base brought from pre-training")
    lines = [
        "# unlearn-ext benchmark", "",
        f"TOFU's protocol on a generated TOFU-style benchmark: {s['num_authors']} fictitious authors x "
        f"{s['questions_per_author']} questions, {s['num_perturbed']} perturbed answers each (seed "
        f"{report['seed']}); {model}.", "",
        f"- Fine-tuning (target: every author; retain models: the retain authors; {stand_ins}): AdamW, lr "
        f"{s['finetune_lr']:g}, {s['finetune_epochs']:g} epochs, batch {s['finetune_batch_size']}, warmup "
        f"{s['warmup_ratio']:g}, linear decay.",
        f"- Unlearning ({methods}): AdamW, {s['unlearn_epochs']:g} epochs over the forget set, batch "
        f"{s['unlearn_batch_size']} forget (+ {s['unlearn_batch_size']} retain where the method has a retain term), "
        f"linear decay, clipping 1.0; loss head `{report['head']}`, kernels `{report['backend']}`; learning rate "
        f"{s['unlearn_lr']:g}" + "".join(f" ({n}: x{f:g})" for n, f in METHOD_LR.items()) + ".",
        "- forget_quality: KS-test p-value of the forget truth ratios against the split's retain model "
        "(> 0.05: indistinguishable from never trained on); model_utility: harmonic mean of probability, "
        "ROUGE-L and truth ratio on retain, real authors and world facts"
        + (f" ({s['eval_utility_questions']} questions of each real-world set)" if s["eval_utility_questions"] else "")
        + "; mia_auc: Min-K % AUC of forget against holdout authors (0.5: indistinguishable). `finetuned` is "
        "the target before unlearning, `retain` the retain model.", "",
    ]
    if s["grid"]:
        knobs = ", ".join(f"{n} {o} {{{', '.join(f'{v:g}' for v in vals)}}}" for n, (o, vals) in KNOBS.items()
                          if n in report["methods"])
        factors = "".join(f" ({n}: {{{', '.join(f'{f:g}' for f in fs)}}})" for n, fs in METHOD_LR_FACTORS.items()
                          if n in report["methods"])
        lines += [f"Tuning: per method and split, the learning rate x {{{', '.join(f'{f:g}' for f in LR_FACTORS)}}}"
                  f"{factors} at the default options, then the main knob at the chosen learning rate ({knobs}). "
                  f"Selection: {SELECTION}. Each method's selection as a run configuration for `unlearn-ext unlearn "
                  "--config`: `configs/<method>.yaml` (the largest split's).", ""]
    lines += ["## Does the target know the authors? (target against retain model, forget and holdout authors)", "",
              markdown_table(report["knowledge"], KNOWLEDGE_COLUMNS) if report["knowledge"] else "(not yet)\n",
              "## Selected settings" if s["grid"] else "## Results", "",
              markdown_table(report["rows"], TABLE_COLUMNS) if report["rows"] else "(not yet)\n"]
    if s["grid"] and report["default_rows"]:
        lines += ["## Every method at its defaults", "", markdown_table(report["default_rows"], TABLE_COLUMNS)]
    if s["grid"] and report["grid_rows"]:
        lines += ["## Every setting run", "", markdown_table(report["grid_rows"], GRID_COLUMNS)]
    if report["rows"]:
        lines += ["## Side by side with published figures (forget quality / model utility)", "",
                  "Other models, data and budgets (`unlearn_ext/published.py`): compare the orderings, not the "
                  "numbers.", "", *side_by_side(report["rows"], report["splits"])]
    overrides = ", ".join(f"{split} {name}: {opts}" for split in report["splits"] for name in report["methods"]
                          if (opts := method_options(name, split, scale)))
    missing = [split for split in report["splits"] if split not in report["details"]]
    lines += [f"Method options that differ from the defaults: {overrides or 'none'}.", "",
              f"Machine: {report['machine']}. Wall time of this run {report['total_s']:.0f} s"
              + (f"; not reached yet: {', '.join(missing)}" if missing else "") + ".", ""]
    return "\n".join(lines)


def write_report(state: dict, out: Path) -> dict:
    built = build_rows(state)
    report = {**{k: v for k, v in state.items() if k != "splits_done"}, "scale": dataclasses.asdict(state["scale"]),
              **{k: v for k, v in built.items() if k != "details"}}
    write_json({**report, "details": built["details"]}, out / "benchmark.json")
    write_text(markdown_report({**report, "details": built["details"]}), out / "benchmark.md")
    title = f"unlearn-ext benchmark, scale {report['scale']['model']}: forget quality vs model utility"
    if any(r["method"] not in ("retain", "finetuned") for r in report["rows"]):
        plot_tradeoff(report["rows"], out / "benchmark.png", title=title)
    if report["scale"]["grid"] and report["grid_rows"]:
        plot_tradeoff(report["grid_rows"], out / "grid.png", title=title + " (every setting)")
    _copy_dynamics(state, built["details"], out)
    write_configs(state, built["details"], out)
    return report


def _copy_dynamics(state: dict, details: dict, out: Path) -> None:
    """The selected run's dynamics plot and log of each method, under ``dynamics/``."""
    for split, detail in details.items():
        for name, label in detail["selected"].items():
            run = state["splits_done"][split]["runs"][name][label]
            source = Path(run["summary"]["directory"]) / "eval.png"
            if source.is_file():
                (out / "dynamics").mkdir(exist_ok=True)
                shutil.copyfile(source, out / "dynamics" / f"{split}-{name}.png")
                write_json({"setting": run["setting"], "records": run["dynamics"]},
                           out / "dynamics" / f"{split}-{name}.json")
