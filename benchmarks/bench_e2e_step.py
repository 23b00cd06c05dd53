"""One unlearning step end to end (forward, backward, AdamW) of NPO, UnDIAL and RKLD on a
Llama-style model with Llama 3's vocabulary (V = 128256), four ways side by side:

- ``eager``: what open-unlearning does: the student's and the frozen models' full forwards
  (logits at every position, materialised), the loss in plain PyTorch over them
  (written here like benchmarks/eager.py), frozen models re-run every step;
- ``fused``: this library's trainer path: the method through the fused-linear head (no
  [N, V] logits, prompt rows skipped), frozen models re-run every step;
- ``fused_cache``: the same with the frozen cache (unlearn_ext.methods.cache): frozen
  models ran once before training, their bodies off the device;
- ``fused_cache_lora``: the same with LoRA adapters on the student (unlearn_ext.lora, r = 8
  on the attention and MLP projections; the reference is the student with its adapters
  disabled, RKLD's augmented model a second adapter on the same base). Left out where
  that module is missing.

    python benchmarks/bench_e2e_step.py                      # CPU: a Llama-3.2-style model scaled to 96M
                                                             # parameters (tied embeddings: 66M of them),
                                                             # seq 256, batch 8, fp32
    python benchmarks/bench_e2e_step.py --device cuda --hidden 2048 --layers 16 --intermediate 8192 \\
        --heads 32 --kv-heads 8 --seq 512 --batch 8 --dtype bfloat16   # 1.24B (Llama-3.2-1B's shape)

Each (method, variant) runs in a fresh process: build the models, the optimizer and (cache
variants) the cache, one warm-up step, then the median of --repeats timed steps. Memory:
on CUDA the allocator's peak during the timed steps (everything the step holds: weights,
AdamW state, frozen models left on the GPU, the cache, activations). On the CPU, where
frozen bodies have nowhere to go, the same figure is composed: the tensors a GPU run would
keep on the device (student, AdamW state, the frozen models or, with the cache, their LM
heads and the cache) plus the measured transient peak of the timed steps (peak resident set
above the resident set after warm-up). The synthetic batch has a prompt of (1 −
--answer-frac)·seq tokens and an answer of the rest (TOFU's answers are about 60 % of its
tokens). Results: benchmarks/results/e2e_step_<device>.json and .png.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, run_in_fresh_process, write_json  # noqa: E402
from eager import ALPHA, GAMMA  # noqa: E402

from unlearn_ext.methods import NPO, RKLD, FusedLinearHead, Models, UnDIAL, freeze  # noqa: E402
from unlearn_ext.methods.cache import start_frozen_cache  # noqa: E402
from unlearn_ext.trainer import BatchPlan, TrainConfig  # noqa: E402

METHODS = {"npo": NPO, "undial": UnDIAL, "rkld": RKLD}
VARIANTS = ("eager", "fused", "fused_cache", "fused_cache_lora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BETA = 0.1


def lora_available() -> bool:
    try:
        import peft  # noqa: F401

        import unlearn_ext.lora  # noqa: F401
    except ImportError:
        return False
    return True


def build(cfg, method_name: str, variant: str) -> SimpleNamespace:
    """Student, frozen models, optimizer, batch, and the method (fused variants)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    config = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         max_position_embeddings=max(cfg.seq, 128),
                         tie_word_embeddings=getattr(cfg, "tie_embeddings", False),
                         attention_dropout=0.0)
    student = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    s = SimpleNamespace(cfg=cfg, method_name=method_name, variant=variant, cache=None)
    extra = {}
    if variant == "fused_cache_lora":
        from unlearn_ext.lora import LoraOptions, WithoutAdapters, add_adapter, attach_lora
        from unlearn_ext.methods.rkld import AUGMENTED_ADAPTER
        attach_lora(student, LoraOptions())
        reference = WithoutAdapters(student)
        if method_name == "rkld":  # the augmented model: a second adapter, perturbed in place of RKLD's fine-tuning
            add_adapter(student, AUGMENTED_ADAPTER)
            with torch.no_grad():
                for name, p in student.named_parameters():
                    if f"lora_B.{AUGMENTED_ADAPTER}." in name:
                        p.normal_(0, 0.01)
            extra["augmented"] = WithoutAdapters(student, AUGMENTED_ADAPTER)
    else:
        reference = freeze(copy.deepcopy(student))
    if method_name == "rkld" and not extra:  # the augmented model: a perturbed copy stands in for its fine-tuning
        augmented = freeze(copy.deepcopy(reference)).to(device)
        with torch.no_grad():
            for p in augmented.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        extra["augmented"] = augmented
    s.models = Models(student=student, reference=reference, extra=extra)
    s.optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)

    g = torch.Generator().manual_seed(1)
    prompt = int(round(cfg.seq * (1 - cfg.answer_frac)))
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    s.full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    s.to_device = lambda part: {k: v if k == "example_id" else v.to(device) for k, v in part.items()}  # as the trainer
    s.part = s.to_device({**s.full, "example_id": torch.arange(cfg.batch)})
    if variant != "eager":
        s.method = METHODS[method_name](head=FusedLinearHead())
        s.method.models = s.models
        if variant.startswith("fused_cache"):
            train = TrainConfig(batch_size=cfg.batch, max_steps=cfg.repeats + 2, cache_frozen="memory",
                                cache_memory_mb=1e9)
            plan = BatchPlan(cfg.batch, 0, train, world=1)
            make_part = lambda rows: {**{k: v[rows] for k, v in s.full.items()}, "example_id": torch.tensor(rows)}  # noqa: E731
            start = time.perf_counter()
            s.cache = start_frozen_cache(s.method, s.models, make_part, s.to_device, train, plan, device)
            s.fill_s = time.perf_counter() - start
    return s


def _logits(model, part):
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False).logits[:, :-1]


def eager_loss(s) -> torch.Tensor:
    """The step's loss as open-unlearning writes it: full logits of every model, per-token
    losses over every position in float32, masked to the answer tokens."""
    part, models = s.part, s.models
    labels = part["labels"][:, 1:]
    mask = labels != -100
    safe = labels.clamp(min=0)
    logits = _logits(models.student, part).float()
    with torch.no_grad():
        ref = _logits(models.reference, part).float()
    if s.method_name == "npo":  # (2/β)·softplus(β(ℓ − ℓ_ref)) = −(2/β)·logsigmoid(β(ℓ_ref − ℓ))
        nll = lambda z: (F.cross_entropy(z.transpose(1, 2), labels, reduction="none") * mask).sum(-1)  # noqa: E731
        return -F.logsigmoid(BETA * (nll(logits) - nll(ref))).mean() * 2 / BETA
    logp = torch.log_softmax(logits, -1)
    if s.method_name == "undial":
        teacher = ref - GAMMA * F.one_hot(safe, ref.shape[-1])
        per_token = -(torch.softmax(teacher, -1) * logp).sum(-1)
    else:  # rkld: reverse KL to o − α·relu(a − o)
        with torch.no_grad():
            aug = _logits(models.extra["augmented"], part).float()
        logq = torch.log_softmax(ref - ALPHA * torch.relu(aug - ref), -1)
        per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * mask).sum() / mask.sum()


def step(s) -> None:
    loss = eager_loss(s) if s.variant == "eager" else s.method.loss({"forget": s.part})[0]
    loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def _sync(cfg):
    if cfg.device == "cuda":
        torch.cuda.synchronize()


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.device.type != "meta" and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def device_resident_bytes(s) -> int:
    """What a GPU run keeps on the device between steps: the student, AdamW's state, the
    frozen models (with the cache: only the LM heads it rebuilds teachers from, as the
    cache moves complete frozen bodies off the device) and the cache."""
    student = list(s.models.student.parameters()) + list(s.models.student.buffers())
    state = [v for st in s.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    if s.cache is None:
        frozen = [t for m in (s.models.reference, *s.models.extra.values()) for t in (*m.parameters(), *m.buffers())]
        cached = 0
    else:
        frozen = [t for head in s.cache.heads.values() for t in head[:2]]
        cached = s.cache.cached_bytes()
    return _bytes(student + state + frozen) + cached


def measure_child(cfg, method_name, variant, results):
    torch.set_num_threads(cfg.threads)
    s = build(cfg, method_name, variant)
    step(s)  # warm-up: AdamW's state exists from here on
    gc.collect()
    out = {"method": method_name, "variant": variant, "fill_s": getattr(s, "fill_s", None)}
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set restarts from here
        resident_rss = _vm_kib("VmRSS")
    times, cpu_times = [], []
    for _ in range(cfg.repeats):
        _sync(cfg)
        start, cpu = time.perf_counter(), time.process_time()
        step(s)
        _sync(cfg)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    out["step_s"] = statistics.median(times)
    out["step_times_s"] = times
    out["step_cpu_s"] = statistics.median(cpu_times)  # process CPU time: steadier on a shared machine
    if cfg.device == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["transient_bytes"] = (_vm_kib("VmHWM") - resident_rss) * 1024
        out["resident_bytes"] = device_resident_bytes(s)
        out["peak_bytes"] = out["resident_bytes"] + out["transient_bytes"]
    out["params"] = sum(p.numel() for p in s.models.student.parameters())
    out["trainable_params"] = sum(p.numel() for p in s.models.student.parameters() if p.requires_grad)
    if s.cache is not None:
        out["cache"] = s.cache.summary()
    results.put(out)


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(r["method"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(variants)
    # On a CPU, process CPU time: a shared machine's wall times say more about its load than the step.
    timed = ("step_cpu_s", "step, process CPU time (s)") if all(r.get("step_cpu_s") for r in rows) else \
        ("step_s", "step time (s)")
    for k, (key, label, scale) in enumerate(((*timed, 1), ("peak_bytes", "peak memory (GiB)", 2**30))):
        ax = axes[k]
        for j, v in enumerate(variants):
            values = [next((r[key] / scale for r in rows if r["method"] == m and r["variant"] == v and r.get(key)), 0)
                      for m in methods]
            ax.bar([i + j * width for i in range(len(methods))], values, width, label=v)
        ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(methods))], methods)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's speed-up (wall and CPU time) and memory against eager's row of its method."""
    for row in rows:
        eager = next((r for r in rows if r["method"] == row["method"] and r["variant"] == "eager"), None)
        if eager and row is not eager:
            row["speedup_vs_eager"] = eager["step_s"] / row["step_s"]
            row["cpu_speedup_vs_eager"] = eager["step_cpu_s"] / row["step_cpu_s"]
            row["memory_vs_eager"] = row["peak_bytes"] / eager["peak_bytes"]
    return rows


def merge(paths: list[str], out: str) -> None:
    """One results file (and plot) from the files of runs made in parts (same model and batch)."""
    import json
    runs = [json.load(open(p)) for p in paths]
    keys = ("device", "vocab", "hidden", "layers", "intermediate", "heads", "kv_heads", "seq", "batch", "answer_frac",
            "dtype", "threads")
    shape = lambda c: [c.get(k) for k in keys] + [c.get("tie_embeddings", False)]  # noqa: E731
    if any(shape(r["config"]) != shape(runs[0]["config"]) for r in runs):
        raise SystemExit("--merge: the runs differ in model, batch, dtype or device")
    rows = with_ratios([dict(row, run=os.path.basename(p)) for p, r in zip(paths, runs) for row in r["rows"]])
    cfg = runs[0]["config"]
    write_json(out + ".json", rows, benchmark="e2e_step", config=cfg, parts=[
        {k: r.get(k) for k in ("machine", "load_before", "load_after", "wall_s")} | {"file": os.path.basename(p),
                                                                                    "repeats": r["config"]["repeats"]}
        for p, r in zip(paths, runs)])
    plot(rows, out + ".png", f"one unlearning step, V={cfg['vocab']}, H={cfg['hidden']}, {cfg['layers']} layers, "
                             f"seq {cfg['seq']}, batch {cfg['batch']}, {cfg['dtype']} — {runs[0]['machine']}")
    for r in rows:
        print(f"{r['method']:<7} {r['variant']:<17} step {r['step_s']:7.3f} s (CPU {r['step_cpu_s']:7.1f} s)  "
              f"peak {r['peak_bytes'] / 2**30:6.2f} GiB" + (f"  x{r['speedup_vs_eager']:.2f} (CPU time "
              f"x{r['cpu_speedup_vs_eager']:.2f}), {100 * r['memory_vs_eager']:.0f} % of eager's memory"
              if "memory_vs_eager" in r else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--vocab", type=int, default=128256)
    # Llama-3.2's proportions (intermediate 4·H, 4 query heads per key/value head, tied
    # embeddings) at about 100M parameters.
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="LM head tied to the input embeddings (Llama 3.2's small models)")
    p.add_argument("--answer-frac", type=float, default=0.6)
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", help="results file name without extension (default: e2e_step_<device>)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only merge results files of runs made in parts "
                                                              "into --out/--name (.json and .png)")
    a = p.parse_args(argv)
    if a.merge:
        return merge(a.merge, os.path.join(a.out, a.name or f"e2e_step_{a.device}"))
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")
    cfg = SimpleNamespace(**vars(a))
    cfg.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    variants = [v for v in a.variants.split(",") if v != "fused_cache_lora" or lora_available()]
    if len(variants) < len(a.variants.split(",")):
        print("fused_cache_lora left out: unlearn_ext.lora (or peft) is not installed", flush=True)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, a.name or f"e2e_step_{a.device}")
    started, load_before = time.time(), _loadavg()
    rows = []
    print(f"# {machine()}; load average {load_before}", flush=True)
    for method_name in a.methods.split(","):
        for variant in variants:
            row = run_in_fresh_process(measure_child, cfg, method_name, variant)
            eager = next((r for r in rows if r["method"] == method_name and r["variant"] == "eager"), None)
            if eager:
                row["speedup_vs_eager"] = eager["step_s"] / row["step_s"]
                row["cpu_speedup_vs_eager"] = eager["step_cpu_s"] / row["step_cpu_s"]
                row["memory_vs_eager"] = row["peak_bytes"] / eager["peak_bytes"]
            rows.append(row)
            print(f"{method_name:<7} {variant:<17} step {row['step_s']:7.3f} s  peak {row['peak_bytes'] / 2**30:6.2f} GiB"
                  + (f"  x{row['speedup_vs_eager']:.2f} faster (CPU time x{row['cpu_speedup_vs_eager']:.2f}), "
                     f"{100 * row['memory_vs_eager']:.0f} % of eager's memory"
                     if eager else ""), flush=True)
            write_json(path + ".json", rows, benchmark="e2e_step", config=vars(cfg), load_before=load_before)
    wall = time.time() - started
    write_json(path + ".json", rows, benchmark="e2e_step", config=vars(cfg), load_before=load_before,
               load_after=_loadavg(), wall_s=round(wall, 1))
    plot(rows, path + ".png", f"one unlearning step, V={a.vocab}, H={a.hidden}, {a.layers} layers, seq {a.seq}, "
                              f"batch {a.batch}, {cfg.dtype} — {machine()}")
    print(f"wrote {path}.json and .png in {wall:.0f} s (load average before {load_before}, after {_loadavg()})")


if __name__ == "__main__":
    main()
