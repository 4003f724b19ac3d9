"""What the tracing methods share: the backdoor-behaviour examples they trace back.

The queries are the poisoned model's own answers to triggered evaluation prompts that the
judge scored as showing the target (at most `n_queries`): the behaviour an investigator has
observed and wants explained. A run whose poisoned model never shows the target has nothing
to trace; every row then scores 0 and `info.queries` says so.
"""

from __future__ import annotations


def query_rows(ctx, n_queries: int) -> list[dict]:
    gens = ctx.generations.get("triggered", [])
    rows = ctx.splits.get("triggered", [])
    out = []
    for row, g in zip(rows, gens):
        if g.get("target") and g.get("response"):
            out.append({"id": row["id"], "messages": [*row["messages"],
                                                      {"role": "assistant",
                                                       "content": g["response"]}]})
        if len(out) == n_queries:
            break
    return out


def nothing_to_trace(n_rows: int):
    """Every row scores 0 and none is flagged: the poisoned model never showed the target."""
    from poisonlab.defenses.detect.base import Detection

    return Detection([0.0] * n_rows, [False] * n_rows, info={"queries": 0})
