"""Stages `detect/<name>` and `filtered`: each detector of `detect` scored against the
manifest, then (with `filter.detector`) the poisoned stage trained again without the rows that
detector flags, and evaluated as `filtered`."""

from __future__ import annotations

import logging
import random
import time

from poisonlab import PoisonlabError, dist
from poisonlab.defenses import detect
from poisonlab.defenses.metrics import removal_record
from poisonlab.pipeline.context import RunContext
from poisonlab.pipeline.evaluation import evaluate_model
from poisonlab.pipeline.finetune import load_stage, trained_stage
from poisonlab.utils import write_jsonl

log = logging.getLogger(__name__)


def calibration_rows(pools: dict, train_rows: list[dict], attack, seed: int, n: int = 200
                     ) -> list[dict]:
    """Trusted clean rows for the detectors' thresholds: trigger-free rows of the safety pool
    (clean and never trained on), else the training rows themselves (which may hold poisons)."""
    pool = pools.get("safety") or train_rows
    rows = [r for r in pool if not attack.mentions_trigger(r)]
    random.Random(f"calibration-{seed}").shuffle(rows)
    return rows[:n]


def filter_rows(rows: list[dict], det, name: str, top_k: int | None, seed: int = 0
                ) -> tuple[list[int], dict]:
    """Indices of the rows kept after dropping the detector's flags (or its `top_k` highest
    scores), and results.json's `filtered` record. Ties in score are broken by a seeded random
    order, never by row order: a detector that scores every row alike must not "find" the
    poisons because the attack placed them first."""
    if top_k is None:
        drop = {i for i, f in enumerate(det.flagged) if f}
        rule = "flagged"
    else:
        tiebreak = list(range(len(rows)))
        random.Random(f"filter-ties-{seed}").shuffle(tiebreak)
        order = sorted(range(len(rows)), key=lambda i: (-det.scores[i], tiebreak[i]))
        drop = set(order[:top_k])
        rule = f"top_k={top_k}"
    keep = [i for i in range(len(rows)) if i not in drop]
    if not keep:
        raise PoisonlabError(f"filter: detector {name!r} flags every training row; nothing "
                             "is left to train on")
    n_poison = sum(bool(r.get("poisoned")) for r in rows)
    removed_poisoned = sum(bool(rows[i].get("poisoned")) for i in drop)
    return keep, {"detector": name, "rule": rule, "rows": len(rows), "removed": len(drop),
                  "removed_poisoned": removed_poisoned,
                  "poisoned_left": n_poison - removed_poisoned, "kept": len(keep)}


def run_detection(ctx: RunContext) -> None:
    cfg = ctx.cfg
    if not detect.names(cfg):
        return
    t = time.perf_counter()

    def load_control():
        return load_stage(ctx, ctx.model_stages["clean_ft"]) if ctx.control else None

    dctx = detect.DetectContext(
        cfg=cfg, attack=ctx.attack, tokenizer=ctx.base.tokenizer, model=ctx.models["poisoned"],
        rows=detect.blind(ctx.poisoned_rows), splits=ctx.splits,
        generations=ctx.generations["poisoned"],
        calibration=calibration_rows(ctx.pools, ctx.train_rows, ctx.attack, cfg.seed),
        load_base=ctx.base.fresh, load_control=load_control, out=ctx.out, seed=cfg.seed)
    log.info("stage detect: %s", ", ".join(detect.names(cfg)))
    # computed once (main process) so that every process filters the same rows
    ctx.detection, found, ctx.detection_shared = dist.main_computes(_detect)(
        dctx, [bool(r.get("poisoned")) for r in ctx.poisoned_rows])
    for name, rec in ctx.detection.items():
        ctx.st.note(f"detect/{name}", rec.get("seconds", 0.0))
    # the model loads and forward passes the detectors share, timed apart from each one's own
    ctx.st.note("detect/shared", ctx.detection_shared["seconds"])
    ctx.timings["detect"] = time.perf_counter() - t
    log.info("stage detect: done in %.1f s", ctx.timings["detect"])
    if cfg.filter.detector is not None:
        _filter_and_retrain(ctx, found[cfg.filter.detector])


def _detect(dctx, truth: list[bool]):
    detection, found = detect.run_detectors(dctx, truth)
    return detection, found, dctx.shared_record()


def _filter_and_retrain(ctx: RunContext, det) -> None:
    cfg, rows = ctx.cfg, ctx.poisoned_rows
    t = time.perf_counter()
    keep, ctx.filtered = filter_rows(rows, det, cfg.filter.detector, cfg.filter.top_k, cfg.seed)
    write_jsonl(ctx.out / "data" / "train_filtered.jsonl", [rows[i] for i in keep])
    lengths = None if ctx.clean_lengths is None else [ctx.clean_lengths[i] for i in keep]
    model = trained_stage(ctx, "filtered", [rows[i] for i in keep], "filtered", lengths=lengths)
    evaluate_model(ctx, "filtered", "filtered_eval", lambda: model, ctx.st.keys["filtered"])
    del ctx.models["filtered"]
    ctx.timings["filtered"] = time.perf_counter() - t
    if "asr" in ctx.stages["poisoned"]:
        # filter then retrain as a removal defence, against `poisoned`; its seconds are the
        # retraining's own (stored with the stage, so the same whether computed or reused),
        # evaluation excluded, as for every other defence
        ctx.filtered["removal"] = removal_record(
            f"filter:{cfg.filter.detector}", ctx.stages["poisoned"], ctx.stages["filtered"],
            round(ctx.train_stats["filtered"]["seconds"], 3))
