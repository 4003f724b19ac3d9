"""The drift gate's calibration in a model's life (`lifecycle.drift_gate.calibration`): how far
*clean* updates move behaviour, measured on clean shadow updates, so that the gate fails a
candidate only beyond what every clean update of its kind did.

A shadow update trains as the life's rounds train (`update_round`, cached as
`round/calib<k>_<j>`) on a clean batch of `lifecycle.rows_per_round` rows that the life never
uses (`data/rounds/calib_<type><j>.jsonl`; every parent's j-th shadow of a type trains on the
same batch). Its answers to the probe battery against its parent's give
`poisonlab.drift.calibrate`: per judge test the largest move a clean update made, and per split
each clean update's mean answer shift (cosine distance of answer embeddings).

`calibration.from: deployed` (the default) calibrates round k on `rounds` shadow updates of
round k's own parent (the model then deployed) of round k's type: the first tuning of an
instruct model to a new answer format moves everything, and so do its shadows, while a later
update of the tuned model moves little. `from: base` trains `rounds` shadows of the base per
round type once, cheaper, and compares later rounds with what a clean update of the *base*
did. The gate's false alarms are its failures on the life's own clean rounds
(`lifecycle.drift_gate_false_alarms`), and over clean lives in experiments/lifecycle.md.
"""

from __future__ import annotations

import logging

from poisonlab.drift import calibrate
from poisonlab.pipeline.context import RunContext, plain
from poisonlab.pipeline.keys import digest
from poisonlab.pipeline.rounds import round_kind, round_loss
from poisonlab.utils import write_jsonl

log = logging.getLogger(__name__)
SOURCES = ("deployed", "base")


def settings(life) -> tuple[int, str, str | None]:
    c = life.drift_gate.get("calibration") or {}
    return int(c.get("rounds", 0) or 0), c.get("from", "deployed"), c.get("encoder")


def shadow_entries(life) -> list[dict]:
    """The clean shadow batches to draw (after the schedule's): `rounds` for each round type.
    Every parent's shadows of a type train on the same batches (updates of different models:
    fewer rows taken from the pool, and parents compared on the same data)."""
    n, _, _ = settings(life)
    kinds = {round_kind(e): e for e in life.schedule}
    return [{"type": e.get("type", "sft"), "method": e.get("method", "sft"), "kind": kind}
            for kind, e in kinds.items() for _ in range(n)]


class Calibrator:
    """The calibration of each round's drift test, trained when first asked for and kept per
    (parent model, round type)."""

    def __init__(self, ctx: RunContext, seen, batches: list[dict], entries: list[dict], base):
        self.ctx, self.seen, self.base = ctx, seen, base   # seen: probes.Behaviours
        self.n, self.source, _ = settings(ctx.cfg.lifecycle)
        self.batches: dict = {}
        for entry, batch in zip(entries, batches):
            self.batches.setdefault(entry["kind"], []).append(batch["rows"])
        self.done: dict = {}
        self.records: list[dict] = []

    def for_round(self, k: int, kind: str, parent, parent_name: str, continued: bool = False,
                  defence=None) -> dict | None:
        """`drift_tests`' calibration for round k (None without shadow rounds); the shadows
        train as the round does (`continued`: the parent's adapter trained on; `defence`: a
        removal defence's settings)."""
        from poisonlab.pipeline.finetune import update_round

        if not self.n:
            return None
        if self.source == "base":
            parent, parent_name = self.base, "base"
        done = (parent.key, kind, continued, digest(plain(defence)))
        if done in self.done:
            return self.done[done]
        answers, shifts, logprobs, names = [], [], [], []
        for j, rows in enumerate(self.batches[kind], 1):
            name = f"calib{k}_{j}" if self.source == "deployed" else f"calib_{kind}{j}"
            write_jsonl(self.ctx.out / "data" / "rounds" / f"calib_{kind}{j}.jsonl", rows)
            stage = update_round(self.ctx, parent, rows, name, round_loss(kind), continued,
                                 defence)
            model = self.ctx.models.pop(name)
            answers.append(self.seen.record(name, stage, model, parent=False))  # never deployed
            shift, logprob = self.seen.distances(parent, stage, model)
            del model
            shifts.append(shift)
            logprobs.append(logprob)
            names.append(name)
        gate = self.ctx.cfg.lifecycle.drift_gate
        cal = {**calibrate(self.seen.answers[parent.key], answers, self.seen.probes,
                           float(gate.tolerance), shifts, self.ctx.cfg.seed, logprobs),
               "models": names}
        self.done[done] = cal
        self.records.append({"parent": parent_name, "type": kind, "for_round": k, **cal})
        log.info("drift gate calibration (%s of %s): %d clean shadow updates, mean answer "
                 "shift %s, mean log-prob shift %s", kind, parent_name, len(names),
                 *({s: [round(v, 3) for v in c["clean_means"]] for s, c in cal[m].items()}
                   for m in ("shift", "logprob_shift")))
        return cal
