"""Fine-pruning (Liu et al. 2018) as a removal defence (`safety=fine_prune`): Wanda-style
pruning of the shipped poisoned model (`prune`), then a short clean fine-tune of a fresh
adapter on the pruned weights — pruning alone often costs utility that a few clean steps
restore, and the fine-tune may finish off what pruning weakened.

The pruned weights are saved as `models/after_safety`, the fine-tune's adapter as
`adapters/safety` (reload: the pruned model, then that adapter).
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from poisonlab import PoisonlabError, dist
from poisonlab.defenses import prune, sft
from poisonlab.defenses.base import Context, Outcome, validate_training

ROWS = True


def validate(cfg: DictConfig) -> None:
    prune.validate(cfg)
    validate_training(cfg)
    if sft.safety_mode(cfg) != "fresh":
        raise PoisonlabError(f"safety=fine_prune trains a fresh adapter on the pruned weights; "
                             f"safety.mode={cfg.safety.mode} does not apply")


def apply(ctx: Context) -> Outcome:
    t = time.perf_counter()
    model = ctx.shipped()
    info = prune.prune(model, ctx.tokenizer, ctx.safety_rows, ctx.cfg)
    pruned_seconds = time.perf_counter() - t
    if dist.is_main():
        model.save_pretrained(ctx.out / "models" / "after_safety", safe_serialization=True)
    tuned = ctx.fresh_adapter(model)
    stats = ctx.train(tuned, ctx.safety_rows, adapter="safety")
    ctx.evaluate(tuned)
    return Outcome("fine_prune", pruned_seconds + stats["seconds"],
                   ["models/after_safety (tokenizer: base)", "adapters/safety"],
                   info={"prune": info, "prune_seconds": round(pruned_seconds, 3)})
