"""The drift gate's calibration in a model's life (`lifecycle.drift_gate.calibration`): how far
clean updates move behaviour, measured on clean *shadow* updates before the life starts.

For each round type of the schedule, `calibration.rounds` shadow updates of the base model,
each on a fresh clean batch of `lifecycle.rows_per_round` rows (never used by the life), trained
as the life's rounds train (`update_round`, cached as `round/calib_<type><j>`). Their answers to
the probe battery against the base model's give `poisonlab.drift.calibrate`: per judge test the
largest move a clean update made, and per split the per-probe answer shift (cosine distance of
answer embeddings) of a clean update. The gate then fails a candidate only beyond what every
clean update of its kind did (`drift_tests(..., calibration=...)`).

The shadows start from the base model, the life's rounds from the deployed one: a clean update
of an already tuned model may move it less than one of the base. The gate's false alarms are
its failures on the life's own clean rounds (`lifecycle.drift_gate_false_alarms`), and over
clean lives in the studies of experiments/lifecycle.md.
"""

from __future__ import annotations

import logging

from poisonlab.drift import answer_shift, calibrate, embed_answers
from poisonlab.pipeline.context import RunContext
from poisonlab.pipeline.probes import probe_answers

log = logging.getLogger(__name__)


def shadow_entries(life) -> list[dict]:
    """The clean shadow rounds to draw: `calibration.rounds` of each type in the schedule."""
    n = int((life.drift_gate.get("calibration") or {}).get("rounds", 0) or 0)
    kinds = list(dict.fromkeys(e.get("type", "sft") for e in life.schedule))
    return [{"type": kind, "shadow": j} for kind in kinds for j in range(1, n + 1)]


def encoder_of(life) -> str | None:
    return (life.drift_gate.get("calibration") or {}).get("encoder")


def calibrate_gate(ctx: RunContext, base, base_answers: dict, base_embedded: dict,
                   probes: dict, batches: list[dict]) -> tuple[dict, dict]:
    """Train and answer the shadow updates (`batches`: round_batches' shadow entries). Returns
    ({type: calibration for drift_tests}, {type: its record for results.json})."""
    from poisonlab.pipeline.finetune import update_round

    tol, seed = float(ctx.cfg.lifecycle.drift_gate.tolerance), ctx.cfg.seed
    by_type: dict[str, list] = {}
    for batch in batches:
        kind = batch["type"]
        name = f"calib_{kind}{len(by_type.get(kind, [])) + 1}"
        stage = update_round(ctx, base, batch["rows"], name, kind)
        model = ctx.models.pop(name)
        answers = probe_answers(ctx, name, stage.key, lambda m=model: m, probes)
        del model
        shift = answer_shift(base_embedded, embed_answers(answers, encoder_of(ctx.cfg.lifecycle)))
        by_type.setdefault(kind, []).append((name, answers, shift))
    calibrations, records = {}, {}
    for kind, shadows in by_type.items():
        names, answers, shifts = (list(x) for x in zip(*shadows))
        cal = calibrate(base_answers, answers, probes, tol, shifts, seed)
        calibrations[kind] = cal
        records[kind] = {"rounds": len(shadows), "models": names, **cal}
        log.info("drift gate calibration (%s): %d clean shadow updates, mean answer shift %s",
                 kind, len(shadows), {s: [round(v, 3) for v in c["clean_means"]]
                                      for s, c in cal["shift"].items()})
    return calibrations, records
