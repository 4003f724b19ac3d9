"""What every removal defence gets from the pipeline, and what it gives back.

A defence is one module in `poisonlab.defenses` with one config in `conf/safety/`:

* ``validate(cfg)`` — every check on `cfg.safety` that can fail, before any work starts;
* ``apply(ctx) -> Outcome`` — take the shipped poisoned model (`ctx.poisoned`), do the
  defence, evaluate the result through `ctx.evaluate` (stage `after_safety`) and say what it
  cost and how to reload it;
* ``ROWS`` — whether it needs clean trigger-free rows from the safety pool (`safety.n_rows`).

Training-based defences train through `ctx.train` (the pipeline's SFT loop, its accounting,
its persistence curves), so a new one is mostly its loss or its data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from poisonlab.config import one_of, positive_int, positive_number

OPTIMIZERS = ("adamw", "sgd")
TRAIN_KEYS = ("lr", "epochs", "max_steps", "batch_size", "optimizer", "pack")


@dataclass
class Outcome:
    """A defence's record: `removal.method`, its own seconds (evaluation excluded), how to
    reload the defended model (manifest `reload.after_safety`) and anything it measured."""

    method: str
    seconds: float
    reload: Any = None
    info: dict = field(default_factory=dict)
    eliciting_before: int | None = None
    eliciting_after: int | None = None


@dataclass
class Context:
    cfg: DictConfig                 # the whole run config; the method's settings are cfg.safety
    attack: Any
    tokenizer: Any
    poisoned: Any                   # the poisoned peft model, adapter not merged
    safety_rows: list[dict]         # clean, trigger-free rows (empty for methods without ROWS)
    splits: dict[str, list[dict]]   # the evaluation prompts every stage is scored on
    out: Path
    seed: int
    warnings: list[str]
    base_provenance: str            # where the base weights came from (dequantized GGUF, ...)
    load_base: Callable             # a fresh copy of the clean base model
    train: Callable                 # train(model, rows, adapter=, weights=, objective=) -> stats
    evaluate: Callable              # evaluate(model, splits=None, sampling=None) -> metrics
    judge: Callable | None
    _shipped: Any = None

    def shipped(self):
        """The poisoned model as it would be shipped: its adapter merged into the base.

        The poisoned adapter itself stays saved as it was (`adapters/poisoned`); `poisoned`
        must not be used after this call (its adapter is merged away)."""
        if self._shipped is None:
            self._shipped = self.poisoned.merge_and_unload()
        return self._shipped

    def fresh_adapter(self, model, seed_offset: int = 1):
        """A new LoRA adapter (rank `safety.lora_r`) on `model`."""
        from poisonlab import models

        lora = {**OmegaConf.to_container(self.cfg.train.lora, resolve=True),
                "r": self.cfg.safety.get("lora_r") or self.cfg.train.lora.r}
        torch.manual_seed(self.seed + seed_offset)
        return models.add_lora(model, lora)


def stage_train_cfg(cfg: DictConfig, overrides: DictConfig | None = None) -> DictConfig:
    """`cfg.train` with a stage's own lr / epochs / max_steps / batch_size / optimizer."""
    base = OmegaConf.to_container(cfg.train, resolve=True)
    if overrides is not None:
        for k in TRAIN_KEYS:
            if k in overrides:
                base[k] = overrides[k]
    return OmegaConf.create(base)


def validate_training(cfg: DictConfig, n_rows: int | None = None) -> None:
    """The knobs every training-based defence shares (`conf/safety/sft.yaml`)."""
    from poisonlab import PoisonlabError
    from poisonlab.train import planned_steps

    positive_int(cfg, "safety.n_rows")
    one_of(cfg, "safety.optimizer", OPTIMIZERS, default="adamw")
    positive_int(cfg, "safety.lora_r", allow_none=True)
    if cfg.safety.get("eval_every") != "auto":
        positive_int(cfg, "safety.eval_every", allow_none=True)
    positive_int(cfg, "safety.curve_n_prompts")
    positive_int(cfg, "safety.max_steps", allow_none=True)
    positive_int(cfg, "safety.batch_size")
    for key in ("safety.lr", "safety.epochs"):
        positive_number(cfg, key)
    every = cfg.safety.get("eval_every")
    if every is not None and every != "auto":
        planned = planned_steps(n_rows or cfg.safety.n_rows, stage_train_cfg(cfg, cfg.safety))
        if every > planned:
            raise PoisonlabError(f"safety.eval_every={every} is larger than the run "
                                 f"({planned} optimizer steps): no curve point would be "
                                 "taken during training")
