"""Gradient-similarity tracing (TracIn with the final checkpoint; `detect=[tracin]`).

A training row's influence on the backdoor behaviour is the cosine similarity between its
loss gradient and the mean loss gradient of the backdoor-behaviour examples (`tracing`), both
over the LoRA parameters of the poisoned model (cosine rather than the raw dot product, so
that rows with large gradients do not rank first for that alone). Flags: robust z-score above
`z`. Cost: one forward and backward pass per training row and per query.
"""

from __future__ import annotations

import numpy as np
import torch

from poisonlab.chat import encode_example
from poisonlab.config import positive_int, positive_number
from poisonlab.defenses.detect.base import Detection, above_z
from poisonlab.defenses.detect.tracing import nothing_to_trace, query_rows
from poisonlab.train import collate, completion_loss
from poisonlab.utils import progress

LEVEL = "data"


def validate(cfg) -> None:
    positive_int(cfg, "detect.tracin.n_queries")
    positive_number(cfg, "detect.tracin.z")


def gradients(model, tokenizer, rows: list[dict], max_len: int, desc: str):
    """Yield the flattened LoRA gradient of each row's completion loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()  # no dropout; gradients still flow
    device = next(model.parameters()).device
    for r in progress(rows, desc=desc):
        batch = collate([encode_example(tokenizer, r["messages"], max_len)],
                        tokenizer.pad_token_id)
        loss = completion_loss(model, {k: v.to(device) for k, v in batch.items()})
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        yield torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                         for g, p in zip(grads, params)])


def detect(ctx, d) -> Detection:
    queries = query_rows(ctx, d.n_queries)
    if not queries:
        return nothing_to_trace(len(ctx.rows))
    max_len = ctx.cfg.train.max_seq_len
    q = torch.stack(list(gradients(ctx.model, ctx.tokenizer, queries, max_len,
                                   "tracin/queries"))).mean(0)
    q = q / q.norm().clamp(min=1e-12)
    scores = []
    for g in gradients(ctx.model, ctx.tokenizer, ctx.rows, max_len, "tracin/rows"):
        scores.append(float(g @ q / g.norm().clamp(min=1e-12)))
    scores = [v if np.isfinite(v) else 0.0 for v in scores]
    return Detection(scores, above_z(scores, d.z), info={"queries": len(queries)})
