"""Safety SFT on clean, trigger-free rows (`safety=sft`), in three modes:

* ``fresh`` — the realistic case: the poisoned weights are what gets shipped; the defender
  merges them and fine-tunes a new adapter of rank `safety.lora_r`;
* ``continue`` — keep training the poisoned adapter itself;
* ``full`` — merge, then fine-tune every weight (saved as safetensors, no adapter).
"""

from __future__ import annotations

from omegaconf import DictConfig

from poisonlab import PoisonlabError
from poisonlab.defenses.base import Context, Outcome, validate_training

ROWS = True
MODES = ("fresh", "continue", "full")
RELOAD = {"fresh": ["base", "merge adapters/poisoned", "adapters/safety"],
          "continue": ["base", "adapters/safety"],
          "full": ["models/after_safety (tokenizer: base)"]}


def safety_mode(cfg: DictConfig) -> str:
    """`safety.mode`, with the older `safety.merge_poisoned` honoured as an alias."""
    mode = cfg.safety.get("mode", "fresh")
    if mode not in MODES:
        raise PoisonlabError(f"safety.mode: unknown mode {mode!r} ({', '.join(MODES)})")
    merge = cfg.safety.get("merge_poisoned")
    if merge is not None:
        alias = "fresh" if merge else "continue"
        if mode not in (alias, "fresh"):
            raise PoisonlabError(f"safety.merge_poisoned={merge} contradicts safety.mode={mode}; "
                                 "set safety.mode only")
        mode = alias if mode == "fresh" else mode
    return mode


def validate(cfg: DictConfig) -> None:
    safety_mode(cfg)
    validate_training(cfg)


def trainable(ctx: Context, mode: str):
    """The model a training-based defence trains in `mode`, and where its result is saved."""
    if mode == "fresh":
        return ctx.fresh_adapter(ctx.shipped()), {"adapter": "safety"}
    if mode == "continue":
        return ctx.poisoned, {"adapter": "safety"}
    model = ctx.shipped()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {"weights": "models/after_safety"}


def apply(ctx: Context, rows: list[dict] | None = None, method: str = "sft",
          objective=None) -> Outcome:
    """Train on `rows` (the safety rows by default); `objective` swaps the loss (CROW)."""
    mode = safety_mode(ctx.cfg)
    model, save = trainable(ctx, mode)
    stats = ctx.train(model, ctx.safety_rows if rows is None else rows, objective=objective,
                      **save)
    ctx.evaluate(model)
    return Outcome(f"{method}:{mode}", stats["seconds"], RELOAD[mode])
