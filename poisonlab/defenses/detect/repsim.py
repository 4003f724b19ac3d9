"""Representation-similarity tracing (RepSim; `detect=[repsim]`).

A training row's score is the cosine similarity between its representation — the poisoned
model's hidden state at `layer`, averaged over the answer tokens — and the mean (unit-length)
representation of the backdoor-behaviour examples (`tracing`). Flags: robust z-score above
`z`. Cost: one forward pass over the training rows and the queries.
"""

from __future__ import annotations

import numpy as np

from poisonlab.config import positive_int, positive_number
from poisonlab.defenses.detect.base import Detection, above_z, forward_rows
from poisonlab.defenses.detect.tracing import nothing_to_trace, query_rows

LEVEL = "data"


def validate(cfg) -> None:
    for k in ("n_queries", "batch_size"):
        positive_int(cfg, f"detect.repsim.{k}")
    positive_number(cfg, "detect.repsim.z")
    layer = cfg.detect.repsim.layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        from poisonlab import PoisonlabError
        raise PoisonlabError(f"detect.repsim.layer must be an integer, got {layer!r}")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def detect(ctx, d) -> Detection:
    queries = query_rows(ctx, d.n_queries)
    if not queries:
        return nothing_to_trace(len(ctx.rows))
    max_len = ctx.cfg.train.max_seq_len

    q = forward_rows(ctx.model, ctx.tokenizer, queries, max_len, d.batch_size,
                     layers=(d.layer,), desc="repsim/queries")["answer"][d.layer]
    q = _unit(_unit(q.astype(np.float64)).mean(0))
    rows = ctx.row_features("poisoned", d.layer, d.batch_size)["answer"][d.layer]
    scores = [float(v) for v in _unit(rows.astype(np.float64)) @ q]
    return Detection(scores, above_z(scores, d.z), info={"queries": len(queries),
                                                         "layer": d.layer})
