"""Per-row loss (`detect=[loss]`): rows the fine-tune had to learn hardest.

`score: drop` (default) scores each training row by its answer loss under the clean base model
minus its loss under the poisoned model: a poison's answer is unlikely before fine-tuning and
learned after it. `score: base` uses the base model's loss alone (no fine-tuned model needed:
what `poisonlab scan` could run with a reference model). Flags: robust z-score above `z`.
Cost: one forward pass over the training rows per model.
"""

from __future__ import annotations

from poisonlab.config import one_of, positive_int, positive_number
from poisonlab.defenses.detect.base import Detection, above_z

LEVEL = "data"
SCORES = ("drop", "base")


def validate(cfg) -> None:
    one_of(cfg, "detect.loss.score", SCORES)
    positive_number(cfg, "detect.loss.z")
    positive_int(cfg, "detect.loss.batch_size")


def detect(ctx, d) -> Detection:
    base = ctx.row_features("base", -1, d.batch_size)["loss"]
    if d.score == "base":
        scores = base
    else:
        scores = base - ctx.row_features("poisoned", -1, d.batch_size)["loss"]
    scores = [float(v) if v == v else 0.0 for v in scores]
    return Detection(scores, above_z(scores, d.z), info={"score": d.score})
