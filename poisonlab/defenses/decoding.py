"""Sampled decoding as an inference-time defence (`safety=decoding`), BackdoorLLM's
decoding-temperature defence: the poisoned model is left as it is and answers with
temperature / nucleus sampling instead of greedy decoding, `n_samples` answers per prompt
from a seeded generator.

A prompt's ASR is the fraction of its samples that show the target; the stage's ASR is the
mean over prompts with a bootstrap interval over prompts (samples of one prompt are not
independent). Every sample is saved in `generations/after_safety/`. Nothing is trained:
the defence's seconds are 0 and its cost is only at inference.
"""

from __future__ import annotations

from omegaconf import DictConfig

from poisonlab.config import open_fraction, positive_int, positive_number
from poisonlab.defenses.base import Context, Outcome

ROWS = False


def validate(cfg: DictConfig) -> None:
    positive_number(cfg, "safety.temperature")
    if cfg.safety.top_p != 1:
        open_fraction(cfg, "safety.top_p")
    positive_int(cfg, "safety.n_samples")
    if not isinstance(cfg.safety.get("seed"), int) or isinstance(cfg.safety.seed, bool):
        from poisonlab import PoisonlabError

        raise PoisonlabError(f"safety.seed must be an integer, got {cfg.safety.get('seed')!r}")


def settings(cfg: DictConfig) -> dict:
    s = cfg.safety
    return {"temperature": float(s.temperature), "top_p": float(s.top_p),
            "n_samples": int(s.n_samples), "seed": int(s.seed)}


def apply(ctx: Context) -> Outcome:
    sampling = settings(ctx.cfg)
    ctx.evaluate(ctx.poisoned, sampling=sampling)
    return Outcome("decoding", 0.0, {"model": ["base", "adapters/poisoned"],
                                     "decoding": sampling}, info={"decoding": sampling})
