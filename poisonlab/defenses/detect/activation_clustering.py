"""Activation clustering (Chen et al. 2018; `detect=[activation_clustering]`).

As in the original, per output class: the training rows are grouped by their answer (first 12
words, as `ngram` compares answers; `by: all` clusters all rows together) and each group of at
least `min_group` rows is clustered on its own (with `others: true`, the rows whose answers
fewer rows share form one more group; by default they are not scored and rank lowest). Within a
group, the rows' hidden states (as in `spectral`) are reduced to `components` principal
components and split by 2-means (k-means++, `n_init` seeded restarts). Poisons that share an
answer with clean rows (a refusal of a benign request beside the refusals of harmful ones) form
their own, small cluster: its rows are flagged when it holds at most `max_share` of the group.
A row's score is how much nearer it lies to its group's smaller cluster than to the larger one,
in units of the group's spread. Cost: one forward pass, a PCA and a few k-means runs per group.
"""

from __future__ import annotations

import numpy as np

from poisonlab.config import one_of, open_fraction, positive_int
from poisonlab.defenses.detect.base import Detection, answer_groups
from poisonlab.defenses.detect.spectral import POOLS, features

LEVEL = "data"


def validate(cfg) -> None:
    key = "detect.activation_clustering"
    one_of(cfg, f"{key}.pool", POOLS)
    one_of(cfg, f"{key}.by", ("answer", "all"))
    one_of(cfg, f"{key}.others", (True, False))
    for k in ("components", "n_init", "batch_size", "min_group"):
        positive_int(cfg, f"{key}.{k}")
    open_fraction(cfg, f"{key}.max_share")


def kmeans2(x: np.ndarray, seed: int, n_init: int, iters: int = 100) -> np.ndarray:
    """Labels (0/1) of the best of `n_init` k-means++ runs with k = 2 (lowest inertia)."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        c0 = x[rng.integers(len(x))]
        d0 = ((x - c0) ** 2).sum(1)
        p = d0 / d0.sum() if d0.sum() > 0 else np.full(len(x), 1 / len(x))
        centres = np.stack([c0, x[rng.choice(len(x), p=p)]])
        for _ in range(iters):
            dist = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
            labels = dist.argmin(1)
            new = np.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j]
                            for j in (0, 1)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = ((x - centres[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def cluster_group(x: np.ndarray, components: int, seed: int, n_init: int
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """(score per row, in the smaller cluster?, the smaller cluster's share) for one group."""
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    z = x @ vt[:components].T
    labels = kmeans2(z, seed, n_init)
    sizes = np.bincount(labels, minlength=2)
    small = int(sizes.argmin())
    if sizes.min() == 0:
        return np.zeros(len(z)), np.zeros(len(z), bool), 0.0
    dist = [np.sqrt(((z - z[labels == j].mean(0)) ** 2).sum(1)) for j in (0, 1)]
    scores = dist[1 - small] - dist[small]
    spread = np.sqrt(((z - z.mean(0)) ** 2).sum(1)).mean()
    return scores / max(spread, 1e-12), labels == small, float(sizes[small] / len(z))


def detect(ctx, d) -> Detection:
    x = features(ctx, d.layer, d.pool, d.batch_size).astype(np.float64)
    groups = answer_groups(ctx.rows, d.by, d.min_group, d.others)
    scores = np.full(len(x), np.nan)
    flagged = np.zeros(len(x), bool)
    shares = {}
    for key, idx in groups.items():
        if len(idx) < d.min_group:
            continue
        s, small, share = cluster_group(x[idx], d.components, ctx.seed, d.n_init)
        scores[idx] = s
        flagged[idx] = small & (share <= d.max_share)
        shares[key[:40]] = round(share, 3)
    floor = np.nanmin(scores) - 1 if np.isfinite(scores).any() else 0.0
    scores = np.where(np.isnan(scores), floor, scores)
    return Detection([float(v) for v in scores], [bool(v) for v in flagged],
                     info={"groups_clustered": len(shares),
                           "small_cluster_share": dict(sorted(shares.items())[:20]),
                           "layer": d.layer, "pool": d.pool, "by": d.by})
