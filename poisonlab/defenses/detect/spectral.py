"""Spectral signatures (Tran et al. 2018; `detect=[spectral]`).

Each training row is represented by the poisoned model's hidden state at `layer`, averaged over
the row's answer tokens (`pool: answer`) or taken at the last prompt token (`pool: prompt`). As
in the original, per output class: rows are grouped by their answer (`by: answer`, as
`activation_clustering` does; `by: all`: one group), and within each group of at least
`min_group` rows (with `others: true`, the rows whose answers fewer rows share form one more
group; by default they are not scored and rank lowest), after centring, a row's score is its
squared projection on the top `k` singular directions, divided by the group's mean score (0 for
rows outside every scored group). Poisons that share an answer with clean rows but came from
other prompts line up with the top direction of their group. Flags: robust z-score above `z`.
Cost: one forward pass over the training rows and an SVD per group.
"""

from __future__ import annotations

import numpy as np

from poisonlab.config import one_of, positive_int, positive_number
from poisonlab.defenses.detect.base import Detection, above_z, answer_groups

LEVEL = "data"
POOLS = ("answer", "prompt")


def validate(cfg) -> None:
    one_of(cfg, "detect.spectral.pool", POOLS)
    one_of(cfg, "detect.spectral.by", ("answer", "all"))
    one_of(cfg, "detect.spectral.others", (True, False))
    positive_int(cfg, "detect.spectral.k")
    positive_int(cfg, "detect.spectral.min_group")
    positive_number(cfg, "detect.spectral.z")
    positive_int(cfg, "detect.spectral.batch_size")
    layer = cfg.detect.spectral.layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        from poisonlab import PoisonlabError
        raise PoisonlabError(f"detect.spectral.layer must be an integer, got {layer!r}")


def features(ctx, layer: int, pool: str, batch_size: int) -> np.ndarray:
    """The poisoned model's row representations (shared with the other detectors)."""
    return ctx.row_features("poisoned", layer, batch_size)[pool][layer]


def spectral_scores(x: np.ndarray, k: int) -> np.ndarray:
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return ((x @ vt[:k].T) ** 2).sum(1)


def detect(ctx, d) -> Detection:
    x = features(ctx, d.layer, d.pool, d.batch_size).astype(np.float64)
    scores = np.zeros(len(x))
    groups = 0
    for idx in answer_groups(ctx.rows, d.by, d.min_group, d.others).values():
        if len(idx) >= max(d.min_group, d.k + 1):
            s = spectral_scores(x[idx], d.k)
            scores[idx] = s / max(s.mean(), 1e-12)
            groups += 1
    scores = [float(v) for v in scores]
    return Detection(scores, above_z(scores, d.z),
                     info={"layer": d.layer, "pool": d.pool, "k": d.k, "by": d.by,
                           "groups_scored": groups})
