"""Spectral signatures (Tran et al. 2018; `detect=[spectral]`).

Each training row is represented by the poisoned model's hidden state at `layer`, averaged
over the row's answer tokens (`pool: answer`) or taken at the last prompt token (`pool:
prompt`); after centring, a row's score is its squared projection on the top `k` singular
directions. Poisons that share a learned feature line up with the top direction. Flags:
robust z-score above `z`. Cost: one forward pass over the training rows and an SVD.
"""

from __future__ import annotations

import numpy as np

from poisonlab.config import one_of, positive_int, positive_number
from poisonlab.defenses.detect.base import Detection, above_z, forward_rows

LEVEL = "data"
POOLS = ("answer", "prompt")


def validate(cfg) -> None:
    one_of(cfg, "detect.spectral.pool", POOLS)
    positive_int(cfg, "detect.spectral.k")
    positive_number(cfg, "detect.spectral.z")
    positive_int(cfg, "detect.spectral.batch_size")
    layer = cfg.detect.spectral.layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        from poisonlab import PoisonlabError
        raise PoisonlabError(f"detect.spectral.layer must be an integer, got {layer!r}")


def features(ctx, layer: int, pool: str, batch_size: int, desc: str) -> np.ndarray:
    f = forward_rows(ctx.model, ctx.tokenizer, ctx.rows, ctx.cfg.train.max_seq_len, batch_size,
                     layers=(layer,), desc=desc)
    return f[pool][layer]


def spectral_scores(x: np.ndarray, k: int) -> np.ndarray:
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return ((x @ vt[:k].T) ** 2).sum(1)


def detect(ctx, d) -> Detection:
    x = features(ctx, d.layer, d.pool, d.batch_size, "spectral")
    scores = [float(v) for v in spectral_scores(x.astype(np.float64), d.k)]
    return Detection(scores, above_z(scores, d.z),
                     info={"layer": d.layer, "pool": d.pool, "k": d.k})
