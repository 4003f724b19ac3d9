"""How well a detector's scores find the poisons: AUROC, average precision, recall@k and
precision / recall / F1 of its flags, each with a bootstrap interval.

Conventions (tests check them against hand-computed cases):

* higher score = more suspicious; `labels` are the ground truth (True = poisoned row, or
  triggered prompt) and are used only here, never by a detector;
* AUROC is the Mann-Whitney statistic, ties counting one half;
* average precision is the step-wise sum  sum_t (R_t - R_{t-1}) P_t  over the distinct score
  thresholds t, highest first (tied scores enter together, as in scikit-learn);
* recall@k: the fraction of the positives among the k highest scores, a tie across the k-th
  place counting its expected share (the positives of the tied group x the free places / its
  size), so that the order of equal scores cannot change the figure;
* precision / recall / F1 are of the detector's own flags (its documented threshold).

Intervals: a percentile bootstrap over items (rows or prompts), 1,000 resamples, seeded.
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT = 1000


def _arrays(scores, labels):
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError("scores and labels differ in length")
    return s, y


def auroc(scores, labels) -> float:
    """P(score of a positive > score of a negative) + P(equal) / 2; nan without both classes."""
    s, y = _arrays(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their places."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts
    return (start + (counts + 1) / 2)[inverse]


def average_precision(scores, labels) -> float:
    s, y = _arrays(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    seen = np.arange(1, len(s) + 1)
    last = np.r_[s[1:] != s[:-1], True]  # the last item of each group of equal scores
    tp, seen = tp[last], seen[last]
    recall = tp / n_pos
    precision = tp / seen
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def recall_at_k(scores, labels, k: int) -> float:
    s, y = _arrays(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    k = max(0, min(int(k), len(s)))
    if k == 0:
        return 0.0
    kth = np.sort(s)[::-1][k - 1]
    above = s > kth
    tied = s == kth
    free = k - int(above.sum())
    hits = y[above].sum() + y[tied].sum() * free / tied.sum()
    return float(hits / n_pos)


def flag_scores(flagged, labels) -> dict[str, float]:
    f, y = _arrays(flagged, labels)
    f = f.astype(bool)
    tp = int((f & y).sum())
    precision = tp / f.sum() if f.sum() else float("nan")
    recall = tp / y.sum() if y.sum() else float("nan")
    if precision != precision or recall != recall or precision + recall == 0:
        f1 = 0.0 if tp == 0 and y.sum() and f.sum() else float("nan")
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def _stat(name: str, s, y, f, k1: int, k2: int) -> float:
    if name == "auroc":
        return auroc(s, y)
    if name == "ap":
        return average_precision(s, y)
    if name == "recall_at_n_poison":
        return recall_at_k(s, y, k1)
    if name == "recall_at_2n_poison":
        return recall_at_k(s, y, k2)
    return flag_scores(f, y)[name]


STATS = ("auroc", "ap", "precision", "recall", "f1", "recall_at_n_poison", "recall_at_2n_poison")


def _nan(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def detection_metrics(scores, labels, flagged=None, seed: int = 0, n_boot: int = N_BOOT,
                      stats=STATS) -> dict:
    """{stat: {value, ci_low, ci_high, n}} for every stat; k = the number of positives (and
    twice that) for recall@k. The bootstrap resamples items; a resample without both classes
    is drawn again (at most 10 times its share), and an undefined value is `null`."""
    s, y = _arrays(scores, labels)
    f = np.zeros(len(s), bool) if flagged is None else np.asarray(flagged, bool)
    n_pos = int(y.sum())
    stats = [x for x in stats if flagged is not None or x not in ("precision", "recall", "f1")]
    values = {x: _stat(x, s, y, f, n_pos, 2 * n_pos) for x in stats}
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {x: [] for x in stats}
    tries = 0
    while len(boots[stats[0]]) < n_boot and tries < 10 * n_boot and len(s) and n_pos:
        tries += 1
        idx = rng.integers(0, len(s), len(s))
        yb = y[idx]
        if yb.all() or not yb.any():
            continue
        kb = int(yb.sum())
        for x in stats:
            boots[x].append(_stat(x, s[idx], yb, f[idx], kb, 2 * kb))
    out = {}
    for x in stats:
        b = np.asarray([v for v in boots[x] if v == v])
        lo, hi = (np.percentile(b, [2.5, 97.5]) if len(b) else (float("nan"),) * 2)
        out[x] = {"value": _nan(values[x]), "ci_low": _nan(lo), "ci_high": _nan(hi),
                  "n": int(len(s))}
    return out
