"""Fine-tune stages: `clean_ft` (the control), `poisoned_ft`, `filtered`, and update rounds.

One function trains them all: a LoRA fine-tune of a parent model on rows, cached by the rows'
content, the parent's key, the training settings and the code. The parent is the base model,
or a model stage of the same run (`ModelStage`): round k fine-tunes round k-1's model, its
adapters merged in order, and its key chains through its parent's, so a run that changes only
a later round reuses the earlier ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from poisonlab import dist, models
from poisonlab.defenses.base import stage_train_cfg
from poisonlab.evaluate import evaluate_stage
from poisonlab.pipeline.context import RunContext, plain
from poisonlab.pipeline.keys import digest
from poisonlab.results import normalize_adapter_config
from poisonlab.train import train_sft

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStage:
    """A trained model of the run: the base with `adapters` (run-relative directories) merged
    in order, the last one left as a trainable adapter; `key` identifies it in later keys."""

    name: str
    key: str
    adapters: tuple[str, ...]


def base_stage(ctx: RunContext) -> ModelStage:
    return ModelStage("base", digest(ctx.base.identity), ())


def lora(model, cfg, seed: int):
    torch.manual_seed(seed)
    return models.add_lora(model, cfg.train.lora)


def load_stage(ctx: RunContext, stage: ModelStage):
    """The model of `stage` built from its stored adapters on a fresh base (eval mode; its last
    adapter stays trainable, since defences may continue it)."""
    from peft import PeftModel

    model = ctx.base.fresh()
    for i, adapter in enumerate(stage.adapters):
        last = i == len(stage.adapters) - 1
        model = PeftModel.from_pretrained(model, str(ctx.out / adapter), is_trainable=last)
        if not last:
            model = model.merge_and_unload()
    model.eval()
    return model


def _stats_dict(st) -> dict:
    return {"steps": st.steps, "epochs": round(st.epochs, 3), "examples": st.examples,
            "packed_rows": st.packed_rows, "truncated_rows": st.truncated_rows,
            "tokens": st.tokens, "supervised_tokens": st.supervised_tokens,
            "seconds": round(st.seconds, 3), "tokens_per_second": round(st.tokens_per_second, 1),
            "final_loss": st.final_loss, "losses": st.losses}


def finetune(ctx: RunContext, peft_model, rows, stage, adapter, train_cfg, seed,
             group_lengths=None, ordered=False, weights=None, every=None, objective=None,
             trainer=None) -> dict:
    """Train `peft_model` on `rows` (with `trainer`, default `train_sft`), save its adapter
    (or, with `weights`, the whole model as safetensors); with `every`, a persistence curve.
    Returns the training stats (also in results `train.<stage>`)."""
    cfg, tokenizer = ctx.cfg, ctx.base.tokenizer
    callback = None
    log.info("stage %s: training on %d rows", stage, len(rows))
    if every:
        n = cfg.safety.curve_n_prompts
        subset = {k: v[:n] for k, v in ctx.splits.items()}
        points = ctx.curves.setdefault(stage, [])

        def callback(step, rows_seen):
            m, _ = evaluate_stage(peft_model, tokenizer, subset, ctx.judge(), cfg.eval,
                                  f"{stage}@{step}")
            points.append({"step": step, "rows_seen": rows_seen,
                           **{k: m[k] for k in ("asr", "ftr_clean", "clean_utility") if k in m}})
            log.info("%s step %d: %s", stage, step, {k: round(v["value"], 3) for k, v in
                                                     points[-1].items() if isinstance(v, dict)})
    stats = (trainer or train_sft)(peft_model, tokenizer, rows, train_cfg, seed, stage,
                                   group_lengths=group_lengths, ordered=ordered, every=every,
                                   callback=callback, objective=objective,
                                   autocast=ctx.base.precision.autocast)
    ctx.train_stats[stage] = _stats_dict(stats)
    log.info("stage %s: trained %d steps (%d examples), final loss %s, %.0f tokens/s, %.1f s",
             stage, stats.steps, stats.examples,
             "n/a" if stats.final_loss is None else f"{stats.final_loss:.4f}",
             stats.tokens_per_second, stats.seconds)
    if stats.truncated_rows:
        log.warning("%s: %d training rows cut at train.max_seq_len=%d", stage,
                    stats.truncated_rows, train_cfg.max_seq_len)
    if dist.is_main():
        if adapter is not None:
            peft_model.save_pretrained(ctx.out / "adapters" / adapter)
            normalize_adapter_config(ctx.out / "adapters" / adapter)
        if weights is not None:
            peft_model.save_pretrained(ctx.out / weights, safe_serialization=True)
    return ctx.train_stats[stage]


def trained_stage(ctx: RunContext, stage: str, rows: list[dict], key_stage: str,
                  lengths: list[int] | None = None, parent: ModelStage | None = None):
    """A LoRA fine-tune of `parent` (default: the base) on `rows` (cached as `key_stage`,
    adapter `adapters/<stage>`): the trained model, also kept as `ctx.models[stage]`, and its
    `ModelStage` in `ctx.model_stages[stage]`."""
    cfg = ctx.cfg
    parent = parent or base_stage(ctx)
    holder = {}
    ordered = ctx.attack.placement != "uniform"
    train_cfg = stage_train_cfg(cfg)
    # keyed by the rows' content: attacks (or variants) that write the same training set
    # share the adapter
    spec = {"rows": digest(rows), **ctx.base.spec, "precision": ctx.base.precision.name,
            "train": plain(train_cfg), "seed": cfg.seed,
            "ordered": ordered, "lengths": None if lengths is None else digest(lengths),
            **({"parent": parent.key} if parent.adapters else {}), **ctx.key_of(__name__)}

    def compute():
        start = (ctx.base.take() if not parent.adapters
                 else load_stage(ctx, parent).merge_and_unload())
        peft_model = lora(start, cfg, cfg.seed)
        finetune(ctx, peft_model, rows, stage, stage, train_cfg, cfg.seed,
                 group_lengths=lengths, ordered=ordered)
        holder["model"] = peft_model
        return ctx.train_stats[stage]

    t = time.perf_counter()
    ctx.train_stats[stage] = ctx.st.run(key_stage, spec, compute, [f"adapters/{stage}"],
                                        cache=ctx.cacheable)
    me = ModelStage(stage, ctx.st.keys[key_stage], parent.adapters + (f"adapters/{stage}",))
    ctx.model_stages[stage] = me
    model = holder.get("model") or load_stage(ctx, me)
    ctx.models[stage] = model
    ctx.timings[stage] = time.perf_counter() - t
    return model


def update_round(ctx: RunContext, parent: ModelStage, rows: list[dict], stage: str):
    """One update of a deployed model: fine-tune `parent` on `rows` as stage `stage` (cached as
    `round/<stage>`, keyed through its parent's key). Returns its `ModelStage`."""
    trained_stage(ctx, stage, rows, f"round/{stage}", parent=parent)
    return ctx.model_stages[stage]
