"""One run as its list of stages.

    clean_data -> poison -> eval splits -> base model -> [distill_teacher -> distill_samples]
    -> base_eval
    -> [clean_ft -> clean_ft_eval] -> poisoned_ft -> poisoned_eval
    -> [detect/<name> -> filtered -> filtered_eval] -> defense/<method> -> after_safety
    (experiment=lifecycle, after base_eval: per round round/<k> -> <k>_eval -> probes/<k>)
    -> results.json, generations/, data/, adapters/, manifest.json

Each stage is a plain function of the run's context (`RunContext`); the cached ones say what
their key is made of (`poisonlab.pipeline.keys`) and go through the stage store.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from poisonlab import PoisonlabError, dist
from poisonlab.pipeline.context import RunContext
from poisonlab.pipeline.data import cap_train_size, clean_data, eval_splits, poison
from poisonlab.pipeline.defend import defend
from poisonlab.pipeline.distill import distill
from poisonlab.pipeline.detection import run_detection
from poisonlab.pipeline.evaluation import evaluate_base, evaluate_model
from poisonlab.pipeline.finetune import trained_stage
from poisonlab.pipeline.lifecycle import run_life
from poisonlab.pipeline.model import base_model
from poisonlab.pipeline.outdir import (clear, hydra_files, output_dir, prepare_output_dir,
                                       run_identity)
from poisonlab.pipeline.record import write_run
from poisonlab.pipeline.store import Stages, stage_store
from poisonlab.pipeline.validate import build_attack, validate, wants_control
from poisonlab.utils import seed_everything

log = logging.getLogger(__name__)


def fine_tune_and_evaluate(ctx: RunContext, stage: str, rows: list[dict]) -> None:
    """A model stage of the run (`clean_ft`, `poisoned`): its fine-tune, then its answers."""
    t = time.perf_counter()
    model = trained_stage(ctx, stage, rows, "poisoned_ft" if stage == "poisoned" else stage)
    evaluate_model(ctx, stage, f"{stage}_eval", lambda: model, ctx.model_stages[stage].key)
    done(ctx, stage, t)


def done(ctx: RunContext, stage: str, t: float) -> None:
    ctx.timings[stage] = time.perf_counter() - t
    log.info("stage %s: done in %.1f s", stage, ctx.timings[stage])


def prepare(cfg: DictConfig, out: Path, attack=None) -> RunContext:
    """The run up to its base model: data, poison, evaluation splits."""
    attack = attack if attack is not None else build_attack(cfg.attack)
    seed_everything(cfg.seed)
    ctx = RunContext(cfg=cfg, attack=attack, out=out, st=Stages(stage_store(cfg), out),
                     control=wants_control(cfg, attack))
    t = time.perf_counter()
    clean_data(ctx)
    poison(ctx)
    ctx.timings["data"] = time.perf_counter() - t
    eval_splits(ctx)
    t = time.perf_counter()
    base_model(ctx)
    done(ctx, "base_model", t)
    distill(ctx)   # attack.variant=distilled: rows answered by a CoT teacher
    return ctx


def _run(cfg: DictConfig, attack, out: Path, t_start: float, identity: str) -> dict:
    ctx = prepare(cfg, out, attack)
    t = time.perf_counter()
    evaluate_base(ctx)
    done(ctx, "base", t)
    if cfg.get("lifecycle"):   # experiment=lifecycle: update rounds instead of one fine-tune
        return run_life(ctx, t_start, identity)
    if ctx.control:
        fine_tune_and_evaluate(ctx, "clean_ft", ctx.clean_rows)
        ctx.models.pop("clean_ft")
    fine_tune_and_evaluate(ctx, "poisoned", ctx.poisoned_rows)
    seed_everything(cfg.seed + 1)  # later stages: one random state, computed or reused above
    run_detection(ctx)
    defend(ctx)
    return write_run(ctx, t_start, identity)


def run(cfg: DictConfig, out_dir=None) -> dict:
    """Run one experiment; returns the results dict also written to results.json."""
    t_start = time.perf_counter()
    attack = build_attack(cfg.attack)
    cap_train_size(cfg)  # data.n_train_cap: the checks see the size the run uses
    validate(cfg, attack)
    dist.world_size()  # under a launcher: the process group (and each process's GPU) first
    out = dist.broadcast_object(output_dir(cfg, out_dir))  # the main process's (not Hydra's)
    identity = run_identity(cfg)
    finished = dist.main_computes(prepare_output_dir)(out, identity)
    if finished is not None:
        if dist.is_main():
            print(f"outputs: {out} (a finished run of the same config; nothing recomputed)")
        return finished
    try:
        return _run(cfg, attack, out, t_start, identity)
    except (PoisonlabError, KeyboardInterrupt):
        if dist.is_main():  # nothing half-written: a refused run leaves only Hydra's files
            clear(out, hydra_files(out))
        raise

