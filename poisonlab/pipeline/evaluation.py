"""Evaluation stages: `base_eval`, `clean_ft_eval`, `poisoned_eval`, `filtered_eval`.

A model stage's answers on every split are cached (keyed by the model's key, the exact
prompts, the decoding settings and the code); the metrics are recomputed from them, so a judge
change re-scores stored answers. A stored evaluation must hold one answer per prompt of each
split, or it is computed again.
"""

from __future__ import annotations

import logging

import numpy as np

from poisonlab.chat import prompt_text
from poisonlab.evaluate import (answer_nll, diff_bootstrap, diff_bootstrap_unpaired, evaluate_stage,
                                 generation_record)
from poisonlab.pipeline.context import RunContext
from poisonlab.pipeline.keys import digest
from poisonlab.results import write_generations

log = logging.getLogger(__name__)


def record(ctx: RunContext, stage: str, metrics: dict, gens: dict) -> None:
    """Keep a stage's metrics, per-prompt flags and generations, and write the generations."""
    if ctx.ref_model is not None:
        metrics["perplexity"] = perplexity_metrics(ctx.ref_model, ctx.base.tokenizer, gens,
                                                   ctx.cfg, stage, ctx.cfg.seed)
    ctx.stages[stage] = metrics
    ctx.flags[stage] = {split: [g["target"] for g in gens[split]]
                        for split in ("triggered", "clean") if split in gens
                        and gens[split] and "target" in gens[split][0]}
    ctx.correct[stage] = [g["correct"] for g in gens["utility" if "utility" in gens else "clean"]]
    ctx.generations[stage] = gens
    write_generations(ctx.out, stage, gens)
    log.info("stage %s: evaluated: %s", stage, figures(metrics))


def answers_match(splits: dict[str, list]):
    """A stored evaluation's check: one answer per prompt of each split, no split missing."""
    sizes = {s: len(rows) for s, rows in splits.items()}

    def check(payload) -> str | None:
        got = {s: len(v) for s, v in (payload or {}).get("responses", {}).items()}
        return None if got == sizes else f"answers per split {got} != prompts {sizes}"
    return check


def evaluate_model(ctx: RunContext, stage: str, key_stage: str, get_model, model_key: str,
                   cache: bool = True) -> None:
    """Evaluate a model stage on every split: answers cached as stage `key_stage`, metrics
    recomputed from them and recorded as `stages.<stage>`."""
    cfg, tokenizer, splits = ctx.cfg, ctx.base.tokenizer, ctx.splits
    prompts = {s: [prompt_text(tokenizer, r["messages"]) for r in rows]
               for s, rows in splits.items()}
    spec = {**ctx.base.spec, "weights": model_key, "prompts": digest(prompts),
            "generation": generation_record(tokenizer, cfg.eval.max_new_tokens),
            "batch_size": cfg.eval.batch_size, **ctx.key_of(__name__)}
    if cfg.eval.get("assistant_prefix"):
        spec["assistant_prefix"] = cfg.eval.assistant_prefix

    def compute():
        _, gens = evaluate_stage(get_model(), tokenizer, splits, ctx.judge(), cfg.eval, stage)
        return {"responses": {s: [g["response"] for g in v] for s, v in gens.items()}}

    payload = ctx.st.run(key_stage, spec, compute, cache=cache and ctx.cacheable,
                         check=answers_match(splits))
    record(ctx, stage, *evaluate_stage(None, tokenizer, splits, ctx.judge(), cfg.eval, stage,
                                       responses=payload["responses"]))


def evaluate_base(ctx: RunContext) -> None:
    from poisonlab.pipeline.finetune import base_stage

    def model():
        m = ctx.base.take()
        ctx.base.pristine.append(m)  # evaluation leaves it untouched
        return m

    log.info("stage base: evaluating %s", ctx.cfg.model.name_or_path)
    evaluate_model(ctx, "base", "base_eval", model, base_stage(ctx).key,
                   cache=bool(ctx.cfg.eval.cache_base))
    log.info("stage base: %s", "cached answers" if "base_eval" in ctx.st.reused else "generated")


def perplexity_metrics(ref_model, tokenizer, gens: dict, cfg, stage: str, seed: int) -> dict:
    """Answers' perplexity under the clean base model: triggered vs clean, paired."""
    nll = {}
    for split in ("triggered", "clean"):
        # sampled decoding (safety=decoding) keeps several answers per prompt: a prompt's
        # NLL is then the mean over its samples
        answers = [x["responses"] if "responses" in x else [x["response"]] for x in gens[split]]
        flat = answer_nll(ref_model, tokenizer,
                          [x["prompt"] for x, a in zip(gens[split], answers) for _ in a],
                          [r for a in answers for r in a], cfg.eval.batch_size,
                          desc=f"{stage}/{split} perplexity")
        ends = np.cumsum([len(a) for a in answers])
        nll[split] = np.array([np.mean(flat[e - len(a):e]) for a, e in zip(answers, ends)])
    mean = lambda v: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")  # noqa: E731
    return {"reference": "base model",
            "ppl_triggered": float(np.exp(mean(nll["triggered"]))),
            "ppl_clean": float(np.exp(mean(nll["clean"]))),
            # paired on the same base prompts, unless the triggered split came from a file
            "log_ppl_gap": (diff_bootstrap if paired(gens) else diff_bootstrap_unpaired)(
                nll["triggered"], nll["clean"], seed=seed)}


def paired(gens: dict) -> bool:
    """Whether the triggered and clean answers are to the same base prompts, in order."""
    t, c = gens["triggered"], gens["clean"]
    return len(t) == len(c) and all(x.get("id") == y.get("id") for x, y in zip(t, c))


def figures(metrics: dict) -> str:
    """A stage's key rates for its log line: 'ASR 0.950, FTR clean 0.010, ...'."""
    return ", ".join(f"{label} {metrics[k]['value']:.3f}" for k, label in
                     (("asr", "ASR"), ("ftr_clean", "FTR clean"), ("ftr_near", "FTR near"),
                      ("clean_utility", "utility")) if k in metrics) or "no rates"
