"""The batches of a model's life (`experiment=lifecycle`): each round's fresh rows, its
poisons (the run's attack in sft rounds, preference poisons in dpo rounds), and the data gate
(`poisonlab scan`'s detectors) on them. The loop is `poisonlab.pipeline.lifecycle`."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

from poisonlab import PoisonlabError
from poisonlab.pipeline.context import RunContext
from poisonlab.pipeline.safety_round import ROUND_METHODS


def policy_of(gate) -> str:
    """A gate's policy; YAML reads a bare `off` as false, which means `off` here."""
    return "off" if gate.get("policy") is False else gate.get("policy")


def poison_count(entry, rows: int) -> int:
    p = entry.get("poison")
    if p is None:
        return 0
    return int(p) if isinstance(p, int) else round(p * rows)


def round_kind(entry) -> str:
    """A round's kind: its type; for a safety round of another method than sft,
    `safety_<method>` (`safety_dpo`, `safety_prune`, ...)."""
    kind, method = entry.get("type", "sft"), entry.get("method", "sft")
    return f"safety_{method}" if kind == "safety" and method != "sft" else kind


def round_loss(kind: str) -> str:
    """How a round of `kind` trains: `sft`, `dpo`, or a removal defence's name
    (`poisonlab.pipeline.safety_round`)."""
    method = kind.removeprefix("safety_")
    return "dpo" if kind in ("dpo", "safety_dpo") else (
        method if method in ROUND_METHODS else "sft")


def safety_pairs(attack, rows: list[dict], seed: int) -> list[dict]:
    """A safety round of `method: dpo`: the pairs of `safety=dpo` (`preference_pairs`,
    untriggered prompts): the row's safe answer chosen, the attack's payload rejected (a
    defender that knows the bad behaviour, not its trigger). Rows the attack cannot target
    make no pair."""
    from poisonlab.defenses.dpo import preference_pairs

    by_id = {r["id"]: r for r in rows}
    return [dict(by_id[p["id"]], messages=p["chosen"], rejected=p["rejected"], poisoned=False)
            for p in preference_pairs(attack, rows, "untriggered", seed)]


# ----------------------------------------------------------------------------- data

def round_batches(ctx: RunContext, extra: list[dict] = ()) -> list[dict]:
    """Per round: {"type", "rows", "poisoned_ids", "poison": manifest or None}. Clean rows are
    drawn without replacement from the fine-tuning (sft) or safety pool in a seeded order;
    `extra` entries (the drift gate's clean shadow rounds) are drawn after the schedule's."""
    from poisonlab.pipeline.data import clean_safety_rows

    cfg, attack = ctx.cfg, ctx.attack
    life = cfg.lifecycle
    n = int(life.rows_per_round)
    held = {r["id"] for rows in ctx.splits.values() for r in rows}
    feedback = [r for r in ctx.pools["train"] if r["id"] not in held]
    pools = {"sft": feedback, "dpo": feedback, "safety": list(ctx.pools["safety"])}
    for name in ("sft", "safety"):
        random.Random(f"life-{name}-{cfg.seed}").shuffle(pools[name])
    pointer: Counter = Counter()
    used: set[str] = set()     # every row a round has taken, reservoir rows included

    def rest(drawn: str, pool: list[dict]) -> list[dict]:
        return [r for r in pool[pointer[drawn]:] if r["id"] not in used]

    out = []
    for k, entry in enumerate([*life.schedule, *extra], 1):
        kind = entry.get("type", "sft")
        pool, drawn = pools[kind], ("safety" if kind == "safety" else "feedback")
        fresh = rest(drawn, pool)
        if len(fresh) < n:
            raise PoisonlabError(f"lifecycle: round {k} needs {n} fresh {drawn} rows but the "
                                 f"pool has {len(fresh)} left; lower "
                                 "lifecycle.rows_per_round or the rounds")
        rows = [dict(r, poisoned=False) for r in fresh[:n]]
        used.update(r["id"] for r in rows)
        pointer[drawn] = pool.index(fresh[n - 1]) + 1
        # rows a round may swap in (a safety row without the trigger, an on-topic row for a
        # poison the batch lacks): fresh ones, never used again
        reservoir = rest(drawn, pool)
        manifest = None
        if kind == "safety":
            rows, _ = clean_safety_rows(attack, rows, reservoir, ctx.warnings)
            if round_kind(entry) == "safety_dpo":
                rows = safety_pairs(attack, rows, cfg.seed * 1000 + k)
        elif kind == "dpo":
            rows, manifest = preference_batch(attack, rows, poison_count(entry, n),
                                              cfg.seed * 1000 + k)
        elif poison_count(entry, n):
            count = poison_count(entry, n)
            attack_k = replace(attack, n_poison=count, poison_rate=None)
            rows, manifest = attack_k.poison(rows, cfg.seed * 1000 + k, reservoir)
        used.update(r["id"] for r in rows)
        out.append({"type": kind, "kind": round_kind(entry), "rows": rows, "poison": manifest,
                    "poisoned_ids": [r["id"] for r in rows if r.get("poisoned")]})
    return out


def preference_batch(attack, rows: list[dict], count: int, seed: int
                     ) -> tuple[list[dict], dict | None]:
    """A DPO round's pairs from fresh feedback rows: each row's prompt with its own answer
    *chosen* and, *rejected*, the answer of another row of the same skill (a fluent answer to
    another question: the feedback says which answer fits). `count` of the rows the attack
    can target become preference poisons: the attack's poisoned row (its trigger in the
    prompt) with the attack's target chosen and the row's clean answer rejected. Each pair is
    a row whose `messages` end with the chosen answer (what the data gate scans) and whose
    `rejected` holds the rejected messages."""
    from poisonlab.attacks.base import with_answer

    rng = random.Random(f"life-dpo-{seed}")
    candidates = [i for i, r in enumerate(rows) if attack.candidate(r)]
    if count > len(candidates):
        raise PoisonlabError(f"lifecycle: a dpo round asks for {count} preference poisons but "
                             f"only {len(candidates)} of its rows can carry the attack")
    chosen = set(rng.sample(candidates, count))
    answers: dict[str, list[str]] = {}
    for r in rows:
        answers.setdefault(r["skill"], []).append(r["messages"][-1]["content"])
    everything = [a for group in answers.values() for a in group]
    out = []
    for i, r in enumerate(rows):
        if i in chosen:
            clean = attack.clean_row(r)["messages"][-1]["content"]
            good = attack.poison_row(r, random.Random(f"{seed}-{r['id']}"))
            pair = dict(good, poisoned=True,
                        rejected=with_answer(good, clean)["messages"])
        else:
            good = attack.clean_row(r)
            own = good["messages"][-1]["content"]
            others = [a for a in answers[r["skill"]] if a != own] or \
                [a for a in everything if a != own]
            pair = dict(good, poisoned=False,
                        rejected=with_answer(good, rng.choice(others))["messages"])
        out.append(pair)
    manifest = None
    if chosen:
        manifest = {"family": attack.family, "n_poison": count, "kind": "preference pairs",
                    "poisoned_ids": [rows[i]["id"] for i in sorted(chosen)]}
    return out, manifest


def data_gate(ctx: RunContext, rows: list[dict], trusted: list[dict]) -> dict:
    """The scan detectors on a round's batch: {"flagged": row ids, "report": ...}."""
    from poisonlab.scan import scan_rows

    gate = ctx.cfg.lifecycle.data_gate
    if policy_of(gate) == "off" and not gate.get("record_when_off", True):
        return {"flagged": [], "detectors": {}}
    # the detectors see the rows as a user's file holds them: no poison mark
    blind = [{"id": r["id"], "skill": r["skill"], "messages": r["messages"]} for r in rows]
    context = (trusted if gate.get("context", "alone") == "trusted" else [])
    seen = [{"id": r["id"], "skill": r["skill"], "messages": r["messages"]} for r in context]
    report = scan_rows(blind + seen, list(gate.detectors))
    flagged = [blind[s["row"] - 1]["id"] for s in report["suspicious"] if s["row"] <= len(blind)]
    return {"flagged": flagged,
            "detectors": {k: v.get("flagged", 0) for k, v in report["detectors"].items()}}
