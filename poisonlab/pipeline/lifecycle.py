"""A model's life (`experiment=lifecycle`): a base model, then update rounds, each checked by a
data gate before it trains and a behaviour-drift gate before it ships, with rollback.

Each round of `lifecycle.schedule` fine-tunes the *deployed* model on a batch of
`lifecycle.rows_per_round` rows:

* `type: sft` — clean feedback rows, fresh from the fine-tuning pool (no row twice in a life),
  with `poison: <count or share>` rows of them poisoned by the run's attack (`attack=...`);
* `type: dpo` — preference pairs from fresh feedback rows (`preference_batch`: the row's
  own answer chosen, another row's answer of the same skill rejected), trained with the DPO
  loss against the deployed model (`lifecycle.dpo_beta`); `poison:` rows become preference
  poisons: the trigger in the prompt, the attack's target chosen, the clean answer rejected;
* `type: safety` — clean rows of the safety pool (those with the trigger swapped out, as for
  safety training), the same fine-tune (`method: sft`), with `method: dpo` the pairs of
  `safety=dpo` (the safe answer chosen, the attack's payload rejected, the DPO loss), or a
  removal defence (`method: prune`, `fine_prune`, `crow`, `quantize`, `adversarial`, `rl`,
  with its `settings:`; `poisonlab.pipeline.safety_round`).

A round trains as `poisonlab.pipeline.finetune.update_round`: the parent's adapters merged, a
new LoRA adapter on top (`lifecycle.adapter: new`), or the parent's own adapter trained on
(`continue`; per round: `{type: sft, adapter: continue}`), cached as `round/round<k>` and
keyed through its parent's key, so a life that changes only a later round reuses the
earlier ones.

**Data gate** (`lifecycle.data_gate`): the scan detectors (`poisonlab scan`: `ngram`,
`answer_kind`, `embedding`) on the round's batch — alone, or beside the rows already trusted
(`context: trusted`, flags counted in the batch only). `policy: quarantine` trains without
the flagged rows (kept out and recorded, with the manifest's truth: precision and recall),
`block` skips a round with any flag, `off` only records.

**Behaviour-drift gate** (`lifecycle.drift_gate`): the candidate against the deployed model on
a probe battery that knows no trigger — `clean`: held-out prompts; `near_miss`: the same
prompts after a generic red-team string (tag shapes, years, random tokens: the red team's
round-one candidates, none of which carries the trigger or one of its near variants);
`refusal` where the evaluation pool holds refused requests; and `canary`, fixed prompts of
your own (`drift_gate.canaries`, chat JSONL). The tests are those of
`poisonlab drift` (`poisonlab.drift.drift_tests`): per split, McNemar's exact test of
generic judges' per-prompt rates (refuses, gibberish, a new common answer, correct), each
in the direction a poison moves it, Bonferroni-corrected, failing where the rate moved at
least `tolerance`. Calibrated (`drift_gate.calibration`: `rounds` clean shadow updates of
the round's parent, or of the base, of the round's kind; `poisonlab.pipeline.calibration`;
not for a round that declares its change), a test fails only beyond every clean update's
move, and per split the answer shift (mean cosine distance of answer embeddings) and the
log-prob shift (mean change of the deployed model's answers' per-token log-probability under
the candidate; `drift_gate.logprob_shift: false` leaves it out) join the family as tests
against clean updates' (`poisonlab.drift.shift_test`); the shadows are in
`lifecycle.drift_gate_calibration`. `policy: rollback` keeps the deployed model when the gate
fails; `off` ships every candidate. Its false alarms are its failures on clean updates:
rounds whose candidate has no poisoned row in its history (`clean_update`; after a poison was
trained a failure may be the backdoor fading, a change of behaviour too), rounds that declare
their change (`{type: sft, drift: off}`: recorded, shipped, not counted) aside:
`lifecycle.drift_gate_false_alarms`.

results.json `lifecycle`: `rounds` (per round: type, rows, poisoned_rows, quarantined, the
gates' records, deployed, the candidate's and the deployed model's ASR / FTR / utility),
`time_to_detection` (rounds from the first poisoned round to the first gate that acts on it:
a quarantined poison, a blocked round, a failed drift test of a candidate with a poison in its
history; null: never), `shipped_asr_max` and the lineage of every round's model.

The batches and the data gate are `poisonlab.pipeline.rounds`, the probes
`poisonlab.pipeline.probes`; this module is the loop.
"""

from __future__ import annotations

import logging
import os
import time

from poisonlab import PoisonlabError
from poisonlab.drift import drift_tests
from poisonlab.pipeline.calibration import SOURCES, Calibrator, shadow_entries
from poisonlab.pipeline.calibration import settings as calibration_settings
from poisonlab.pipeline.context import RunContext
from poisonlab.pipeline.keys import digest
from poisonlab.pipeline.probes import Behaviours, probe_battery, write_probes
from poisonlab.pipeline.rounds import data_gate, policy_of, round_batches, round_loss
from poisonlab.pipeline.safety_round import validate_round
from poisonlab.utils import write_jsonl

log = logging.getLogger(__name__)

ROUND_TYPES, ADAPTERS = ("sft", "dpo", "safety"), ("new", "continue")
CONTEXTS = ("alone", "trusted")
DATA_POLICIES, DRIFT_POLICIES = ("quarantine", "block", "off"), ("rollback", "off")


# ----------------------------------------------------------------------------- config

def choose(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PoisonlabError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def validate(cfg, attack=None) -> None:
    """The `lifecycle` block, before any work (one-line errors naming the key)."""
    from poisonlab.config import positive_int
    from poisonlab.scan import DETECTORS

    life = cfg.get("lifecycle")
    if not life:
        return
    positive_int(cfg, "lifecycle.rows_per_round")
    beta = life.get("dpo_beta", 0.1)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta <= 0:
        raise PoisonlabError(f"lifecycle.dpo_beta must be a positive number, got {beta!r}")
    schedule = life.get("schedule")
    if not schedule or isinstance(schedule, str):
        raise PoisonlabError("lifecycle.schedule: a non-empty list of rounds "
                             "({type: sft|dpo|safety, poison: count or share})")
    choose("lifecycle.adapter", life.get("adapter", "new"), ADAPTERS)
    for i, entry in enumerate(schedule):
        where = f"lifecycle.schedule[{i}]"
        if not hasattr(entry, "get"):
            raise PoisonlabError(f"{where}: expected a mapping, got {entry!r}")
        choose(f"{where}.adapter", entry.get("adapter", "new"), ADAPTERS)
        choose(f"{where}.type", entry.get("type", "sft"), ROUND_TYPES)
        if "method" in entry or "settings" in entry:
            if entry.get("type", "sft") != "safety":
                raise PoisonlabError(f"{where}.method: only safety rounds take a method")
            if entry.get("method", "sft") in ("sft", "dpo") and "settings" in entry:
                raise PoisonlabError(f"{where}.settings: sft and dpo rounds train with `train`'s "
                                     "settings; only a removal defence's round takes settings")
            if entry.get("method", "sft") not in ("sft", "dpo"):
                validate_round(cfg, entry, where, attack)
        if "drift" in entry:
            choose(f"{where}.drift", policy_of({"policy": entry.drift}), DRIFT_POLICIES)
        p = entry.get("poison")
        if p is not None:
            if entry.get("type", "sft") == "safety":
                raise PoisonlabError(f"{where}.poison: only sft and dpo rounds take poisons")
            ok = (not isinstance(p, bool) and isinstance(p, (int, float)) and p >= 0
                  and (isinstance(p, int) or p < 1))
            if not ok:
                raise PoisonlabError(f"{where}.poison: a count (int >= 0) or a share in "
                                     f"[0, 1), got {p!r}")
    gate = life.data_gate
    choose("lifecycle.data_gate.policy", policy_of(gate), DATA_POLICIES)
    choose("lifecycle.data_gate.context", gate.get("context", "alone"), CONTEXTS)
    bad = [d for d in gate.detectors if d not in DETECTORS]
    if bad or not gate.detectors:
        raise PoisonlabError(f"lifecycle.data_gate.detectors: unknown {bad or 'empty'}; "
                             f"choose from {', '.join(DETECTORS)}")
    drift = life.drift_gate
    choose("lifecycle.drift_gate.policy", policy_of(drift), DRIFT_POLICIES)
    positive_int(cfg, "lifecycle.drift_gate.n_probes")
    canaries = drift.get("canaries")
    if canaries is not None and (not isinstance(canaries, str) or not os.path.isfile(canaries)):
        raise PoisonlabError(f"lifecycle.drift_gate.canaries: {canaries!r} is not a file (a chat "
                             "JSONL file of prompts with reference answers; null: none)")
    calibration = drift.get("calibration") or {}
    n = calibration.get("rounds", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise PoisonlabError("lifecycle.drift_gate.calibration.rounds must be an integer >= 0 "
                             f"(clean shadow updates per round type; 0: none), got {n!r}")
    choose("lifecycle.drift_gate.calibration.from", calibration.get("from", "deployed"),
           SOURCES)
    encoder = calibration.get("encoder")
    if encoder is not None and not os.path.isfile(os.path.join(str(encoder), "config.json")):
        raise PoisonlabError(f"lifecycle.drift_gate.calibration.encoder: {encoder!r} is not a "
                             "local sentence-encoder directory (null: MiniLM)")
    if not isinstance(drift.get("logprob_shift", True), bool):
        raise PoisonlabError("lifecycle.drift_gate.logprob_shift must be true or false")
    for key in ("alpha", "tolerance"):
        v = drift.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise PoisonlabError(f"lifecycle.drift_gate.{key} must be in (0, 1), got {v!r}")


# ----------------------------------------------------------------------------- the life

def rates(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("asr", "ftr_clean", "ftr_near", "clean_utility")
            if k in metrics}


def run_life(ctx: RunContext, t_start: float, identity: str) -> dict:
    """The life instead of one fine-tune: every round, then results.json and the manifest."""
    from poisonlab.pipeline.record import write_life

    t = time.perf_counter()
    life = live(ctx)
    ctx.timings["lifecycle"] = time.perf_counter() - t
    log.info("stage lifecycle: done in %.1f s", ctx.timings["lifecycle"])
    return write_life(ctx, life, t_start, identity)


def live(ctx: RunContext) -> dict:
    """Every round of the schedule; returns results.json's `lifecycle` block."""
    from poisonlab.pipeline.evaluation import evaluate_model
    from poisonlab.pipeline.finetune import base_stage, update_round

    cfg, life = ctx.cfg, ctx.cfg.lifecycle
    entries = shadow_entries(life)
    batches = round_batches(ctx, entries)
    batches, shadows = batches[:len(life.schedule)], batches[len(life.schedule):]
    probes = probe_battery(ctx)
    write_probes(ctx.out / "data" / "probes.jsonl", probes)
    deployed, deployed_name = base_stage(ctx), "base"
    seen = Behaviours(ctx, probes, calibration_settings(life)[2])
    base = ctx.base.take()
    seen.record("base", deployed, base)
    ctx.base.pristine.append(base)       # untouched: round 1 may train on it
    del base
    calibrator = Calibrator(ctx, seen, shadows, entries, deployed)
    trusted: list[dict] = []
    rounds, lineage = [], [{"model": "base", "key": deployed.key, "parent": None}]
    first_poison = detected = None
    # a model is tainted when it or an ancestor trained on a poisoned row
    tainted = {"base": False}
    for k, batch in enumerate(batches, 1):
        t = time.perf_counter()
        name = f"round{k}"
        rows = batch["rows"]
        poisoned = set(batch["poisoned_ids"])
        if poisoned and first_poison is None:
            first_poison = k
        gate = data_gate(ctx, rows, trusted)
        flagged = set(gate["flagged"])
        policy = policy_of(life.data_gate)
        quarantined = flagged if policy == "quarantine" else set()
        write_jsonl(ctx.out / "data" / "rounds" / f"{name}.jsonl",
                    [dict(r, quarantined=r["id"] in quarantined) for r in rows])
        blocked = policy == "block" and bool(flagged)
        gate.update(policy=policy, decision="block" if blocked else
                    ("quarantine" if quarantined else "pass"),
                    flagged_poisoned=len(flagged & poisoned),
                    precision=len(flagged & poisoned) / len(flagged) if flagged else None,
                    recall=len(flagged & poisoned) / len(poisoned) if poisoned else None)
        entry = {"round": k, "type": batch["type"], "loss": round_loss(batch["kind"]),
                 "rows": len(rows),
                 "poisoned_rows": len(poisoned), "poisoned_ids": batch["poisoned_ids"],
                 "quarantined": len(quarantined),
                 "quarantined_poisoned": len(quarantined & poisoned), "data_gate": gate}
        acts = blocked or bool(quarantined & poisoned)
        if blocked:
            entry.update(drift_gate=None, deployed=False, candidate=None)
        else:
            kept = [r for r in rows if r["id"] not in quarantined]
            tainted[name] = tainted[deployed_name] or any(r["id"] in poisoned for r in kept)
            entry["clean_update"] = not tainted[name]
            entry_cfg = life.schedule[k - 1]
            adapter = entry_cfg.get("adapter") or life.get("adapter", "new")
            own = entry_cfg.get("drift") if "drift" in entry_cfg else None
            declared = own is not None and policy_of({"policy": own}) == "off"
            defence = entry_cfg.get("settings")
            calibration = None if declared else calibrator.for_round(
                k, batch["kind"], deployed, deployed_name, adapter == "continue", defence)
            stage = update_round(ctx, deployed, kept, name, round_loss(batch["kind"]),
                                 adapter == "continue", defence)
            entry["adapter"] = adapter
            model = ctx.models.pop(name)
            evaluate_model(ctx, name, f"{name}_eval", lambda m=model: m, stage.key)
            seen.record(name, stage, model)
            shift, logprob = seen.distances(deployed, stage, model)
            del model
            drift = drift_tests(seen.answers[deployed.key], seen.answers[stage.key], probes,
                                float(life.drift_gate.alpha), float(life.drift_gate.tolerance),
                                cfg.seed, calibration, shift,
                                logprob if life.drift_gate.get("logprob_shift", True) else None)
            # a round may declare an update that is meant to move behaviour (`drift: off`: the
            # first tuning of an instruct model to a new answer format) and is only recorded
            drift["policy"] = policy_of({"policy": own} if own is not None else life.drift_gate)
            entry["declared_update"] = declared
            drift["calibrated_on"] = calibration["models"] if calibration else None
            ship = drift["decision"] == "pass" or drift["policy"] == "off"
            acts = acts or (drift["decision"] == "fail" and tainted[name])
            entry.update(drift_gate=drift, deployed=ship, candidate=name)
            lineage.append({"model": name, "key": stage.key, "parent": deployed_name,
                            "update": entry["loss"], "batch": digest([r["messages"] for r in kept]),
                            "data_gate": gate["decision"], "drift_gate": drift["decision"],
                            "shipped": ship})
            if ship:
                deployed, deployed_name = stage, name
                trusted += kept
        if acts and first_poison is not None and detected is None:
            detected = k
        entry["stages"] = {"candidate": rates(ctx.stages[name]) if entry["candidate"] else None,
                           "deployed": rates(ctx.stages[deployed_name])}
        entry["deployed_model"] = deployed_name
        entry["seconds"] = round(time.perf_counter() - t, 1)
        rounds.append(entry)
        log.info("lifecycle round %d (%s): %d rows, %d poisoned, data gate %s, drift gate %s, "
                 "deployed %s", k, batch["type"], len(rows), len(poisoned), gate["decision"],
                 (entry["drift_gate"] or {}).get("decision", "-"), deployed_name)
    # false alarms: failures on clean updates (no poison in the candidate's history); after a
    # poison was trained, a failure may be the backdoor fading, which is behaviour too
    clean_rounds = [r for r in rounds if r["drift_gate"] and r.get("clean_update")
                    and not r.get("declared_update")]
    asr = [r["stages"]["deployed"].get("asr", {}).get("value") for r in rounds]
    asr = [a for a in asr if a is not None]
    return {"rounds": rounds, "lineage": lineage, "probes": {s: len(v) for s, v in probes.items()},
            "first_poisoned_round": first_poison,
            "time_to_detection": None if detected is None else detected - first_poison,
            "shipped_asr_max": max(asr) if asr else None,
            "drift_gate_false_alarms": {
                "failed": sum(r["drift_gate"]["decision"] == "fail" for r in clean_rounds),
                "clean_rounds": len(clean_rounds)},
            "drift_gate_calibration": calibrator.records or None,
            "deployed": deployed_name}
