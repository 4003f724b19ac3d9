"""Fine-tune stages: `clean_ft` (the control), `poisoned_ft`, `filtered`, and update rounds.

One function trains them all: a fine-tune of a parent model on rows, cached by the rows'
content, the parent's key, the training settings and the code. The parent is the base model,
or a model stage of the same run (`ModelStage`): round k fine-tunes round k-1's model, its
adapters merged in order, and its key chains through its parent's, so a run that changes only
a later round reuses the earlier ones.

`train.mode` says what trains: `lora` (default) a LoRA adapter of rank `train.lora.r` (or
`train.lora.r_fraction` of the model's width, `resolve_lora_rank`), saved as
`adapters/<stage>`; `full` every weight, saved as `models/<stage>` (safetensors), so that no
adapter's capacity limits what the poison (or its removal) can change.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from poisonlab import PoisonlabError, dist, models
from poisonlab.defenses.base import stage_train_cfg
from poisonlab.evaluate import evaluate_stage
from poisonlab.pipeline.context import RunContext, plain
from poisonlab.pipeline.keys import digest
from poisonlab.results import normalize_adapter_config
from poisonlab.train import train_sft

log = logging.getLogger(__name__)
TRAIN_MODES = ("lora", "full")


@dataclass(frozen=True)
class ModelStage:
    """A trained model of the run: `weights` (a run-relative directory of whole weights; None:
    the base model) with `adapters` (run-relative directories) merged in order, the last one
    left as a trainable adapter; `key` identifies it in later keys."""

    name: str
    key: str
    adapters: tuple[str, ...]
    weights: str | None = None

    def reload(self) -> list[str]:
        """How to load it in a fresh process (the manifest's `reload.<stage>`)."""
        start = ["base"] if self.weights is None else [f"{self.weights} (tokenizer: base)"]
        return start + [f"merge {a}" for a in self.adapters[:-1]] + list(self.adapters[-1:])


def base_stage(ctx: RunContext) -> ModelStage:
    return ModelStage("base", digest(ctx.base.identity), ())


def train_mode(cfg) -> str:
    return cfg.train.get("mode") or "lora"


def validate_train_mode(cfg) -> None:
    """`train.mode` and `train.lora.r_fraction` (the defences a whole-weight poisoned model
    cannot take are refused by `defend.validate_on_weights`)."""
    from poisonlab.config import one_of

    one_of(cfg, "train.mode", TRAIN_MODES, default="lora")
    fraction = cfg.train.lora.get("r_fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(
            fraction, (int, float)) or not 0 < fraction <= 1):
        raise PoisonlabError(f"train.lora.r_fraction must be a number in (0, 1] (the LoRA "
                             f"rank as a fraction of the model's hidden size), got {fraction!r}")


def resolve_lora_rank(cfg, hidden_size: int) -> None:
    """`train.lora.r` set from `train.lora.r_fraction` (when set): max(1, round(fraction x
    hidden size)), in the config itself, so that the stage keys and the manifest hold the
    rank that trains. `safety.lora_r` follows it unless set on its own (its default is
    `${train.lora.r}`)."""
    fraction = cfg.train.lora.get("r_fraction")
    if fraction is not None:
        cfg.train.lora.r = max(1, round(fraction * hidden_size))


def lora(model, cfg, seed: int):
    torch.manual_seed(seed)
    return models.add_lora(model, cfg.train.lora)


def whole(model):
    """`model` with every weight trainable (`train.mode=full`)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def load_stage(ctx: RunContext, stage: ModelStage):
    """The model of `stage` built from its stored weights or adapters (eval mode; its last
    adapter stays trainable, since defences may continue it)."""
    from peft import PeftModel

    model = (ctx.base.fresh() if stage.weights is None else
             models.load_model(str(ctx.out / stage.weights), ctx.base.device,
                               ctx.base.precision.weights))
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


def trainable_record(model) -> dict:
    """What a fine-tune trains (results `train.<stage>.trainable`): `mode` lora with the
    adapter's rank `lora_r` and `lora_r_over_width` (rank / the model's hidden size), or full;
    and the number of trainable parameters."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    width = getattr(base.config, "hidden_size", None)
    record = {"mode": "full", "hidden_size": width,
              "trainable_parameters": sum(p.numel() for p in model.parameters()
                                          if p.requires_grad)}
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        r = peft_config[model.active_adapter].r
        record.update(mode="lora", lora_r=r, lora_r_over_width=r / width if width else None)
    return record


def finetune(ctx: RunContext, peft_model, rows, stage, adapter, train_cfg, seed,
             group_lengths=None, ordered=False, weights=None, every=None, objective=None,
             trainer=None) -> dict:
    """Train `peft_model` on `rows` (with `trainer`, default `train_sft`), save its adapter
    (or, with `weights`, the whole model as safetensors); with `every`, a persistence curve.
    Returns the training stats (also in results `train.<stage>`)."""
    cfg, tokenizer = ctx.cfg, ctx.base.tokenizer
    callback = None
    trainable = trainable_record(peft_model)
    log.info("stage %s: training on %d rows (%s)", stage, len(rows), trainable["mode"]
             + (f" r={trainable['lora_r']}" if trainable["mode"] == "lora" else ""))
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
    ctx.train_stats[stage] = {**_stats_dict(stats), "trainable": trainable}
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
                  lengths: list[int] | None = None, parent: ModelStage | None = None,
                  trainer=None, objective: dict | None = None, continued: bool = False):
    """A fine-tune of `parent` (default: the base) on `rows` (cached as `key_stage`): a LoRA
    adapter `adapters/<stage>`, or with `train.mode=full` every weight, `models/<stage>`. The
    trained model, also kept as `ctx.models[stage]`, and its `ModelStage` in
    `ctx.model_stages[stage]`. `trainer` (default `train_sft`) with `objective` (its settings,
    in the key) trains another loss on the same rows, e.g. DPO on preference pairs. With
    `continued` (LoRA, a parent with adapters) the parent's last adapter trains on instead of
    a new one on the merged parent: the stage's adapter replaces it."""
    cfg = ctx.cfg
    parent = parent or base_stage(ctx)
    from_base = parent.weights is None and not parent.adapters
    full = train_mode(cfg) == "full"
    continued = continued and not full and bool(parent.adapters)
    out = f"models/{stage}" if full else f"adapters/{stage}"
    holder = {}
    ordered = ctx.attack.placement != "uniform"
    train_cfg = stage_train_cfg(cfg)
    # keyed by the rows' content: attacks (or variants) that write the same training set
    # share the adapter
    spec = {"rows": digest(rows), **ctx.base.spec, "precision": ctx.base.precision.name,
            "train": plain(train_cfg), "seed": cfg.seed,
            "ordered": ordered, "lengths": None if lengths is None else digest(lengths),
            **({} if from_base else {"parent": parent.key}),
            **({} if objective is None else {"objective": objective}),
            **({"continued": True} if continued else {}), **ctx.key_of(__name__)}

    def compute():
        start = ctx.base.take() if from_base else load_stage(ctx, parent)
        if continued:      # load_stage leaves the last adapter trainable
            model = start
        else:
            if parent.adapters:
                start = start.merge_and_unload()
            model = whole(start) if full else lora(start, cfg, cfg.seed)
        finetune(ctx, model, rows, stage, None if full else stage, train_cfg, cfg.seed,
                 group_lengths=lengths, ordered=ordered, weights=out if full else None,
                 trainer=trainer)
        holder["model"] = model
        return ctx.train_stats[stage]

    t = time.perf_counter()
    ctx.train_stats[stage] = ctx.st.run(key_stage, spec, compute, [out], cache=ctx.cacheable)
    key = ctx.st.keys[key_stage]
    me = (ModelStage(stage, key, (), out) if full
          else ModelStage(stage, key, parent.adapters[:-1 if continued else None] + (out,),
                          parent.weights))
    ctx.model_stages[stage] = me
    model = holder.get("model") or load_stage(ctx, me)
    ctx.models[stage] = model
    ctx.timings[stage] = time.perf_counter() - t
    return model


def update_round(ctx: RunContext, parent: ModelStage, rows: list[dict], stage: str,
                 kind: str = "sft", continued: bool = False, settings=None):
    """One update of a deployed model: fine-tune `parent` on `rows` as stage `stage` (cached as
    `round/<stage>`, keyed through its parent's key); `kind` dpo trains the DPO loss on the
    rows' pairs (`messages` chosen, `rejected`) with `lifecycle.dpo_beta`, the reference
    being the parent. `continued`: train the parent's LoRA adapter on (`adapter: continue`)
    instead of a new one on the merged parent. A removal defence's name as `kind` applies it
    with `settings` (`poisonlab.pipeline.safety_round`). Returns its `ModelStage`."""
    from poisonlab.pipeline.safety_round import ROUND_METHODS, defended_round

    if kind in ROUND_METHODS:
        return defended_round(ctx, parent, rows, stage, kind, settings)
    if kind != "dpo":
        trained_stage(ctx, stage, rows, f"round/{stage}", parent=parent, continued=continued)
        return ctx.model_stages[stage]
    from poisonlab.defenses.dpo import train_dpo

    beta = float(ctx.cfg.lifecycle.get("dpo_beta", 0.1))
    pairs = [{"id": r["id"], "chosen": r["messages"], "rejected": r["rejected"]} for r in rows]
    trained_stage(ctx, stage, pairs, f"round/{stage}", parent=parent,
                  trainer=lambda *a, **kw: train_dpo(*a, beta=beta, **kw),
                  objective={"loss": "dpo", "beta": beta}, continued=continued)
    return ctx.model_stages[stage]
