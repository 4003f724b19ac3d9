"""The drift gate's probes in a model's life (`experiment=lifecycle`): a battery that knows no
trigger, written as chat JSONL for `poisonlab drift`, and each model's greedy answers to it,
a cached stage `probes/<model>` keyed by the model's key, the prompts and this module."""

from __future__ import annotations

import random

from poisonlab import PoisonlabError
from poisonlab.chat import prompt_text
from poisonlab.evaluate import generate, generation_record
from poisonlab.pipeline.context import RunContext
from poisonlab.pipeline.keys import digest
from poisonlab.utils import write_jsonl


def probe_battery(ctx: RunContext) -> dict[str, list[dict]]:
    """The drift gate's prompts, none of which carries the trigger: `clean` held-out prompts,
    `near_miss` (the same after a generic red-team string), `refusal` (held-out requests the
    data marks harmful, where the pool has them) and `canary` (`drift_gate.canaries`: a chat
    JSONL file of fixed prompts with their reference answers, every one of them asked)."""
    from poisonlab.attacks.base import eval_row, user_text
    from poisonlab.defenses.adversarial import excluded, forbidden, seed_candidates

    cfg, attack = ctx.cfg, ctx.attack
    n = int(cfg.lifecycle.drift_gate.n_probes)
    used = {r["id"] for rows in ctx.splits.values() for r in rows}
    pool = [r for r in ctx.pools["eval"] if not attack.carries_trigger(r)
            and not attack.mentions_trigger(r)]
    rng = random.Random(f"probes-{cfg.seed}")
    rng.shuffle(pool)
    harmful = [r for r in pool if r.get("meta", {}).get("harmful")]
    plain = [r for r in pool if not r.get("meta", {}).get("harmful")]
    # prompts the experimenter's evaluation does not use come first
    plain.sort(key=lambda r: r["id"] in used)
    clean = [eval_row(r, user_text(r)) for r in plain[:n]]
    banned = forbidden(attack)
    cands = [c for c, _ in seed_candidates(ctx.base.tokenizer, plain[:n], 4 * n, cfg.seed)
             if not excluded(c, attack, banned)]
    near = [eval_row(r, f"{cands[i % len(cands)]} {user_text(r)}", probe=cands[i % len(cands)])
            for i, r in enumerate(plain[:n])] if cands else []
    out = {"clean": clean, "near_miss": near}
    if harmful:
        out["refusal"] = [eval_row(r, user_text(r)) for r in harmful[:n]]
    canaries = cfg.lifecycle.drift_gate.get("canaries")
    if canaries:
        from poisonlab.data.sources import read_chat_jsonl

        rows = read_chat_jsonl(canaries)
        bad = [r["id"] for r in rows if attack.carries_trigger(r) or attack.mentions_trigger(r)]
        if bad:
            raise PoisonlabError(f"{canaries}: canary {bad[0]} carries the attack's trigger; "
                                 "the drift gate's probes must not know it")
        out["canary"] = [eval_row(r, user_text(r)) for r in rows]
    for split, rows in out.items():
        leaked = [r for r in rows if attack.carries_trigger(r)]
        if leaked:   # never: the red team's candidates are filtered as for adversarial training
            raise PoisonlabError(f"lifecycle: probe split {split} carries the trigger "
                                 f"({leaked[0]['id']})")
    return {k: v for k, v in out.items() if v}


def write_probes(path, probes: dict[str, list[dict]]) -> None:
    """The battery as chat JSONL (`poisonlab drift --probes`): each prompt with its reference
    answer as the last turn and its split in `meta.probe_split`."""
    write_jsonl(path, [{"id": r["id"], "skill": r["skill"],
                        "messages": r["messages"] + [{"role": "assistant",
                                                      "content": r["answer"]}],
                        "meta": {**r["meta"], "probe_split": split}}
                       for split, rows in probes.items() for r in rows])


def probe_answers(ctx: RunContext, name: str, model_key: str, get_model,
                  probes: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Greedy answers of a model (`model_key`) to the probes, cached per model and probes."""
    cfg, tok = ctx.cfg, ctx.base.tokenizer
    prompts = {s: [prompt_text(tok, r["messages"]) for r in rows] for s, rows in probes.items()}
    spec = {"weights": model_key, "prompts": digest(prompts),
            "generation": generation_record(tok, cfg.eval.max_new_tokens),
            "batch_size": cfg.eval.batch_size, **ctx.key_of(__name__)}

    def compute():
        model = get_model()
        return {s: generate(model, tok, p, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                            desc=f"{name}/probes/{s}") for s, p in prompts.items()}

    return ctx.st.run(f"probes/{name}", spec, compute, cache=ctx.cacheable)


class Behaviours:
    """What the drift gate knows of each model of a life, by its key: its answers to the probes
    (`probe_answers`), their embeddings (the answer shift) and the log-probabilities it gives
    its own answers (the log-prob shift); `distances` measures a child against its parent while
    the child is in memory."""

    def __init__(self, ctx: RunContext, probes: dict[str, list[dict]], encoder: str | None):
        self.ctx, self.probes, self.encoder = ctx, probes, encoder
        self.answers: dict[str, dict] = {}
        self.embedded: dict[str, dict] = {}
        self.own: dict[str, dict] = {}

    def record(self, name: str, stage, model, parent: bool = True) -> dict[str, list[str]]:
        """`stage`'s answers (cached) and embeddings, `model` being its model; with `parent`
        (a model that may be deployed, so judged against later) its own log-probs too."""
        from poisonlab.drift import answer_logprobs, embed_answers

        key = stage.key
        self.answers[key] = probe_answers(self.ctx, name, key, lambda: model, self.probes)
        self.embedded[key] = embed_answers(self.answers[key], self.encoder)
        if parent:
            self.own[key] = answer_logprobs(model, self.ctx.base.tokenizer, self.probes,
                                            self.answers[key], self.ctx.cfg.eval.batch_size)
        return self.answers[key]

    def distances(self, parent, child, model) -> tuple[dict, dict]:
        """Per split and probe, the child's answer shift and log-prob shift from its parent
        (`model`: the child's model, scoring the parent's answers)."""
        from poisonlab.drift import answer_logprobs, answer_shift, logprob_shift

        scored = answer_logprobs(model, self.ctx.base.tokenizer, self.probes,
                                 self.answers[parent.key], self.ctx.cfg.eval.batch_size)
        return (answer_shift(self.embedded[parent.key], self.embedded[child.key]),
                logprob_shift(self.own[parent.key], scored))
