"""The last stage: results.json, the run's figures (its stages' rates, its persistence curve),
the manifest, the printed table."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from poisonlab import defenses, dist, models
from poisonlab.defenses.sft import safety_mode
from poisonlab.evaluate import diff_bootstrap, generation_record
from poisonlab.pipeline.context import RunContext
from poisonlab.pipeline.defend import removal
from poisonlab.pipeline.outdir import RUN_MARKER, code_identity
from poisonlab.report import format_life, format_table, plot_curve, plot_life, plot_stages
from poisonlab.report.collect import negated
from poisonlab.results import write_json, write_manifest
from poisonlab.tracking import log_run

log = logging.getLogger(__name__)


def results_of(ctx: RunContext) -> dict:
    cfg, stages, flags = ctx.cfg, ctx.stages, ctx.flags
    results = {"name": cfg.name, "stages": stages, "train": ctx.train_stats,
               "precision": ctx.base.precision.name, **removal(ctx)}
    if ctx.outcome is not None and ctx.outcome.info:
        results["defense"] = ctx.outcome.info
    if ctx.detection is not None:
        results["detection"] = ctx.detection
        results["detection_shared"] = ctx.detection_shared
    if ctx.filtered is not None:
        results["filtered"] = ctx.filtered
    if "clean_ft" in flags and "clean" in flags["poisoned"]:
        # FTR_clean beside the control's rate on the same prompts: the part of FTR_clean the
        # poison caused, net of the behaviour's ordinary rate after the same fine-tune.
        d = diff_bootstrap(flags["poisoned"]["clean"], flags["clean_ft"]["clean"], seed=cfg.seed)
        stages["poisoned"]["ftr_clean_vs_control"] = {
            **d, "control": stages["clean_ft"]["ftr_clean"]["value"]}
    # Collateral damage: utility lost by the poisoned fine-tune, paired on the same prompts
    # (reference minus poisoned: positive = the poison cost utility).
    results["utility_drop"] = {
        f"vs_{ref}": diff_bootstrap(ctx.correct[ref], ctx.correct["poisoned"], seed=cfg.seed)
        for ref in ("base", "clean_ft") if ref in ctx.correct}
    # The same difference the way tables read it: poisoned minus reference, negative = utility
    # lost (utility_drop stays as it was for the readers of older results).
    results["utility_change"] = {ref: negated(d) for ref, d in results["utility_drop"].items()}
    if ctx.curves:
        results["curves"] = ctx.curves
    results["evaluation"] = {
        "generation": generation_record(ctx.base.tokenizer, cfg.eval.max_new_tokens),
        "batch_size": cfg.eval.batch_size,
        "split_sizes": {k: len(v) for k, v in ctx.splits.items()},
        "assistant_prefix": cfg.eval.get("assistant_prefix")}
    if ctx.model_judge is not None:
        # the model judge's precision/recall on labelled answers, beside the rule judge's
        results["judge"] = {**ctx.model_judge.describe(),
                            "cases": ctx.model_judge.on_cases(cfg.judge.get("cases"))}
    results["cache"] = ctx.st.record()
    results["warnings"] = ctx.warnings
    return results


def draw_figures(results: dict, out: Path, name: str, method: str | None = None) -> list[Path]:
    """A run's figures, on the main process only: `figures/stages.png` (ASR, FTR clean, FTR
    near and clean utility of each evaluated stage with their 95% intervals) and, for each
    persistence curve, `curves/<stage>.png` (its title gives the prompts per point, read from
    the points). A figure that fails is a warning, not a failed run. Returns the paths."""
    if not dist.is_main():
        return []
    figures = [(plot_stages, results, out / "figures" / "stages.png",
                f"{name}: rates by stage (95% intervals)")]
    if results.get("lifecycle"):
        figures.append((plot_life, results["lifecycle"], out / "figures" / "life.png",
                        f"{name}: the model's life"))
    figures += [(plot_curve, points, out / "curves" / f"{stage}.png",
                 f"{name}: {stage}" + (f" ({method})" if method else ""))
                for stage, points in (results.get("curves") or {}).items()]
    drawn = []
    for plot, data, path, title in figures:
        try:
            plot(data, path, title)
        except Exception as e:  # noqa: BLE001 - a figure must not cost the run its results
            log.warning("figure %s not drawn: %s: %s", path, type(e).__name__, e)
            continue
        drawn.append(path)
    return drawn


def write_run(ctx: RunContext, t_start: float, identity: str) -> dict:
    cfg, out, outcome = ctx.cfg, ctx.out, ctx.outcome
    results = results_of(ctx)
    ctx.timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = ctx.timings
    log.info("run %s: finished in %.1f s; outputs in %s", cfg.name, ctx.timings["total"], out)
    write_json(out / "results.json", results)
    # before the manifest, which hashes every file of the run directory
    draw_figures(results, out, cfg.name, None if outcome is None else outcome.method)
    mode = safety_mode(cfg) if cfg.safety.method in defenses.TRAINED else None
    write_manifest(
        out, config=OmegaConf.to_container(cfg, resolve=True), seed=cfg.seed,
        base_model={"name_or_path": cfg.model.name_or_path, "path": ctx.base.path,
                    "device": ctx.base.device.type, **ctx.base.precision.record(ctx.base.device),
                    **models.model_info(ctx.base.path), **ctx.base.identity},
        poison=ctx.poison_info, timings=ctx.timings,
        extra={"code_sha256": code_identity(), "safety_mode": mode,
               "inputs": ctx.inputs,
               "defense": None if outcome is None else {
                   "method": outcome.method, "settings": OmegaConf.to_container(
                       cfg.safety, resolve=True), **outcome.info},
               "evaluation": results["evaluation"], "cache": results["cache"],
               "control": ctx.control, "warnings": ctx.warnings,
               "reload": {
                   "poisoned": ctx.model_stages["poisoned"].reload(),
                   "after_safety": None if outcome is None else outcome.reload,
                   "filtered": ctx.model_stages["filtered"].reload() if ctx.filtered else None,
                   "clean_ft": (ctx.model_stages["clean_ft"].reload() if ctx.control
                                else ["base", "adapters/clean_ft"])}})
    write_json(out / RUN_MARKER, {"status": "finished", "identity": identity})
    if cfg.wandb.enabled:
        log_run(cfg, results, out)
    if dist.is_main():
        print(format_table(results))
        print(f"outputs: {out}")
    return results


def write_life(ctx: RunContext, life: dict, t_start: float, identity: str) -> dict:
    """results.json, the manifest (with every round's model, its parent and batch) and the
    printed table of a lifecycle run."""
    cfg, out = ctx.cfg, ctx.out
    ctx.timings["total"] = time.perf_counter() - t_start
    results = {"name": cfg.name, "stages": ctx.stages, "train": ctx.train_stats,
               "precision": ctx.base.precision.name, "lifecycle": life,
               "evaluation": {"generation": generation_record(ctx.base.tokenizer,
                                                              cfg.eval.max_new_tokens),
                              "batch_size": cfg.eval.batch_size,
                              "split_sizes": {k: len(v) for k, v in ctx.splits.items()}},
               "cache": ctx.st.record(), "warnings": ctx.warnings, "timings_s": ctx.timings}
    write_json(out / "results.json", results)
    draw_figures(results, out, cfg.name)
    write_manifest(
        out, config=OmegaConf.to_container(cfg, resolve=True), seed=cfg.seed,
        base_model={"name_or_path": cfg.model.name_or_path, "path": ctx.base.path,
                    "device": ctx.base.device.type, **ctx.base.precision.record(ctx.base.device),
                    **models.model_info(ctx.base.path), **ctx.base.identity},
        poison={"rounds": [{"round": r["round"], "poisoned_rows": r["poisoned_rows"],
                            "poisoned_ids": r["poisoned_ids"],
                            "batch": f"data/rounds/round{r['round']}.jsonl"}
                           for r in life["rounds"]]},
        timings=ctx.timings,
        extra={"code_sha256": code_identity(), "inputs": ctx.inputs,
               "lineage": life["lineage"], "cache": results["cache"],
               "warnings": ctx.warnings,
               "reload": {s: m.reload() for s, m in ctx.model_stages.items()}})
    write_json(out / RUN_MARKER, {"status": "finished", "identity": identity})
    if dist.is_main():
        print(format_life(life))
        print(f"outputs: {out}")
    return results
