"""python benchmarks/demo_sweep.py SETTINGS.json: the demo's unlearning (``unlearn_ext.demo.unlearn``:
24 steps of 4 forget + 4 keep examples, as ``make demo``) once per setting, SmolLM2 loaded once, each run
from a fresh copy; scored by answer probability only (no greedy answers: 4x faster than the demo's
evaluation). SETTINGS.json: a list of ``demo.unlearn`` keyword arguments, e.g.
``[{"method": "ga", "lr": 1e-5, "train_layers": "8-10"}]``. One JSON line per setting: the probabilities
after, their ratios to before, and whether the README's criterion (forget <= 0.5x, keep >= 0.9x) is met.
How the README's rows of tries beyond the configs were made."""
import copy
import json
import sys
import time

from unlearn_ext import demo, demo_data
from unlearn_ext.eval import evaluate
from unlearn_ext.models.smollm2 import load_smollm2


def score(model, tokenizer):
    result = evaluate(model, tokenizer, demo_data.SETS, kinds=demo.KINDS, batch_size=16, generate=False,
                      progress=False)
    return {name: result["sets"][name]["prob"] for name in demo_data.SETS}


def main(path: str) -> None:
    settings = json.loads(open(path).read())
    base, tokenizer, _ = load_smollm2()
    before = score(base, tokenizer)
    print(json.dumps({"before": before}), flush=True)
    for setting in settings:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        demo.unlearn(model, tokenizer, demo_data.FORGET, demo_data.KEEP, seed=0, progress=False, **setting)
        seconds = time.perf_counter() - t0
        after = score(model, tokenizer)
        ratio = {name: after[name] / before[name] for name in after}
        print(json.dumps({"setting": setting, "after": after, "ratio": ratio,
                          "met": ratio["forget"] <= 0.5 and ratio["keep"] >= 0.9, "unlearn_s": round(seconds, 1)}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
