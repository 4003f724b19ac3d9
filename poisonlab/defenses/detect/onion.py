"""ONION as a detector (`detect=[onion]`): how much more fluent an input is without its most
suspicious word.

An input's score is the largest word-removal score f_i = log PPL(text) - log PPL(text without
word i) of its user turn (`poisonlab.defenses.onion.word_scores`), under the clean base model
(`scorer: base`) or the poisoned model (`scorer: poisoned`); perplexity per word (`unit:
word`, the default: a rare trigger cut into many predictable sub-word pieces looks fluent per
token) or per token (`unit: token`, ONION's own). Flags: scores above the
(1 - `fpr`) quantile of the scores of `n_calibration` trusted clean prompts (the safety pool).
Cost: one forward pass per word of every input.
"""

from __future__ import annotations

from poisonlab.config import one_of, open_fraction, positive_int
from poisonlab.defenses.detect.base import Detection, quantile_threshold, user_text
from poisonlab.defenses.onion import UNITS, word_scores

LEVEL = "input"


def validate(cfg) -> None:
    one_of(cfg, "detect.onion.scorer", ("base", "poisoned"))
    one_of(cfg, "detect.onion.unit", UNITS)
    open_fraction(cfg, "detect.onion.fpr")
    for k in ("batch_size", "n_calibration"):
        positive_int(cfg, f"detect.onion.{k}")
    positive_int(cfg, "detect.onion.n_prompts", allow_none=True)


def suspicion(model, tokenizer, texts: list[str], batch_size: int, desc: str, unit: str
              ) -> list[float]:
    return [max((s for _, s, _ in ws), default=0.0)
            for ws in word_scores(model, tokenizer, texts, batch_size, desc, unit)]


def detect(ctx, d) -> Detection:
    model = ctx.base() if d.scorer == "base" else ctx.model
    scores = suspicion(model, ctx.tokenizer, [user_text(r) for r in ctx.prompts()],
                       d.batch_size, "onion/inputs", d.unit)
    calib = suspicion(model, ctx.tokenizer,
                      [user_text(r) for r in ctx.calibration[:d.n_calibration]], d.batch_size,
                      "onion/calibration", d.unit)
    threshold = quantile_threshold(calib, d.fpr)
    return Detection(scores, [s > threshold for s in scores],
                     info={"threshold": threshold, "scorer": d.scorer})
