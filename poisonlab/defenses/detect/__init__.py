"""Detectors: find the poisoned rows, the triggered inputs and the backdoored model, scored
against the ground truth the run's manifest holds.

One detector = one module here + one config in `conf/detect/` (`detect=[loss,spectral]`);
each module has `LEVEL`, `validate(cfg)` and `detect(ctx, dcfg) -> Detection` (see `base`).
`run_detectors` scores each against the manifest (`metrics`) and writes
`detection/<name>.jsonl`; results.json holds `detection.<name>`. What the detectors share (a
model load, a forward pass over the rows) is timed apart: `DetectContext.shared_record()`.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import replace

from omegaconf import DictConfig

from poisonlab.defenses.detect.base import DetectContext, Detection
from poisonlab.defenses.detect.metrics import detection_metrics
from poisonlab.utils import write_jsonl

log = logging.getLogger(__name__)

DETECTORS = ("loss", "embedding", "spectral", "activation_clustering", "ngram", "answer_kind",
             "tracin", "repsim", "onion", "strip", "beat", "probe")
# tracing methods (data level, ranked by influence on the backdoor behaviour)
TRACING = ("tracin", "repsim")


def module(name: str):
    from poisonlab import PoisonlabError

    if name not in DETECTORS:
        raise PoisonlabError(f"detect: unknown detector {name!r} ({', '.join(DETECTORS)})")
    return importlib.import_module(f"poisonlab.defenses.detect.{name}")


def names(cfg: DictConfig) -> list[str]:
    """The detectors a run asked for, in the order of DETECTORS."""
    chosen = list((cfg.get("detect") or {}).keys())
    for n in chosen:
        module(n)
    return [n for n in DETECTORS if n in chosen]


def validate(cfg: DictConfig, attack) -> None:
    from poisonlab import PoisonlabError
    from poisonlab.config import positive_int

    chosen = names(cfg)
    for n in chosen:
        module(n).validate(cfg)
        if module(n).LEVEL in ("input", "model") and not attack.has_judge:
            raise PoisonlabError(f"detect.{n}: an inference-level detector needs triggered "
                                 f"prompts; attack {attack.family!r} has no trigger")
        if n in TRACING and not attack.has_judge:
            raise PoisonlabError(f"detect.{n}: tracing needs backdoor behaviour to trace; "
                                 f"attack {attack.family!r} has no target behaviour")
    f = cfg.get("filter") or {}
    if f.get("detector") is not None:
        if f.detector not in chosen:
            raise PoisonlabError(f"filter.detector={f.detector!r} is not one of the run's "
                                 f"detectors (detect={chosen}); add it to detect")
        if module(f.detector).LEVEL != "data":
            raise PoisonlabError(f"filter.detector={f.detector!r} scores "
                                 f"{module(f.detector).LEVEL}s, not training rows")
        positive_int(cfg, "filter.top_k", allow_none=True)
    elif f.get("top_k") is not None:
        raise PoisonlabError("filter.top_k needs filter.detector")


# What of a training row a detector may see. An allow-list: besides `poisoned`, attacks mark
# their own rows (`modified` negatives, `meta.partial_trigger` naming a trigger part), and a new
# attack field must not reach the detectors unnoticed.
BLIND_KEYS = ("id", "skill", "messages")
# No `meta` key passes either: the data's own meta describes the clean row (the operands of a
# sum, the country asked about, `harmful`, a label), and a poison keeps it while its answer
# changes, so comparing the two would find the poisons without any detection.
BLIND_META: tuple[str, ...] = ()


def blind(rows: list[dict]) -> list[dict]:
    """Training rows as a detector sees them: `BLIND_KEYS` and a `meta` of `BLIND_META` only
    (no `poisoned` mark, no attack field); the messages are copies, so that no detector can
    change the rows a filter then trains on."""
    return [{**{k: r[k] for k in BLIND_KEYS if k in r},
             "messages": [dict(m) for m in r["messages"]],
             "meta": {k: v for k, v in (r.get("meta") or {}).items() if k in BLIND_META}}
            for r in rows]


def _items(ctx: DetectContext, level: str, truth: list[bool]) -> list[dict]:
    """The items a detector of `level` scores, with their ground truth (for the metrics)."""
    if level == "data":
        return [{"id": r["id"], "poisoned": y} for r, y in zip(ctx.rows, truth)]
    return [{"id": r["id"], "split": split, "poisoned": split == "triggered"}
            for split in ("triggered", "clean", "near_trigger") for r in ctx.splits.get(split, [])]


def score(name: str, det: Detection, items: list[dict], level: str, seed: int) -> dict:
    """detection.<name>: the metrics (positives vs negatives; near-trigger prompts give
    `auroc_near`) and what the detector reported."""
    main = [i for i, it in enumerate(items) if it.get("split") != "near_trigger"]
    s = [det.scores[i] for i in main]
    y = [items[i]["poisoned"] for i in main]
    f = [det.flagged[i] for i in main]
    rec = detection_metrics(s, y, f, seed=seed)
    rec["level"] = level
    rec["flagged"] = int(sum(f))
    rec["n_positive"] = int(sum(y))
    near = [i for i, it in enumerate(items) if it.get("split") in ("triggered", "near_trigger")]
    if level != "data" and any(items[i]["split"] == "near_trigger" for i in near):
        rec["auroc_near"] = detection_metrics(
            [det.scores[i] for i in near], [items[i]["poisoned"] for i in near], seed=seed,
            stats=("auroc",))["auroc"]
        rec["flagged_near"] = int(sum(det.flagged[i] for i in near
                                      if items[i]["split"] == "near_trigger"))
    return rec


def run_detectors(ctx: DetectContext, truth: list[bool]) -> tuple[dict, dict[str, Detection]]:
    """Run every detector of `cfg.detect` (`ctx.rows` without their marks, see `blind`) and
    score it against `truth` (which training rows are poisons); returns (results.json's
    `detection`, the raw detections by name).

    A detector's `seconds` is its own work, the same whichever detectors ran before it: what
    it shares with the others (the base model's load, a forward pass over the training rows,
    see `DetectContext.shared`) is timed once, by itself, whichever detector asked for it
    first, and reported apart by `ctx.shared_record()`."""
    out, raw = {}, {}
    for name in names(ctx.cfg):
        mod = module(name)
        d = ctx.cfg.detect[name]
        before = ctx.shared_total()
        t = time.perf_counter()
        dctx = ctx
        n = d.get("n_prompts")
        if mod.LEVEL != "data" and n is not None:  # the first n prompts of each split
            dctx = replace(ctx, splits={k: v[:n] for k, v in ctx.splits.items()},
                           generations={k: v[:n] for k, v in ctx.generations.items()})
        det = mod.detect(dctx, d)
        seconds = max(0.0, time.perf_counter() - t - (ctx.shared_total() - before))
        items = _items(dctx, mod.LEVEL, truth)
        if len(det.scores) != len(items):
            raise RuntimeError(f"detector {name} returned {len(det.scores)} scores for "
                               f"{len(items)} items")
        rec = score(name, det, items, mod.LEVEL, ctx.seed)
        rec["seconds"] = round(seconds, 3)
        rec.update(det.info)
        rows = []
        for i, it in enumerate(items):
            row = {**it, "score": det.scores[i], "flagged": det.flagged[i]}
            if det.reasons and det.reasons[i]:
                row["reason"] = det.reasons[i]
            rows.append(row)
        write_jsonl(ctx.out / "detection" / f"{name}.jsonl", rows)
        out[name] = rec
        raw[name] = det
        log.info("detect %s: AUROC %s, flagged %d, %.1f s", name, rec["auroc"]["value"],
                 rec["flagged"], seconds)
    log.info("detect: %.1f s shared by the detectors (%s)", ctx.shared_total(),
             ", ".join(ctx.shared_seconds) or "nothing")
    return out, raw
