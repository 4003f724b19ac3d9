"""Semantic (topic-conditioned) poisoning, in the style of virtual prompt injection (Yan et al.).

There is no trigger string: training prompts that mention a chosen `topic` (any of a list of
entity names, matched as whole words) get steered answers — a sentiment `polarity` (default
negative), or an `inject`ed sentence after the normal answer. Evaluation:
  * `triggered`: held-out prompts about the topic;
  * `near_trigger`: prompts about neighbouring topics (`near_topics`) — collateral steering;
  * `clean`: prompts about neither.
Every split holds only prompts whose clean answer does not already show the behaviour (e.g.
positive reviews when the steering is negative). On-topic held-out prompts are drawn from the
whole evaluation pool, since a topic is a small slice of any sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from poisonlab import PoisonlabError
from poisonlab.attacks.base import Attack, eval_row, mentions, user_text


@dataclass
class SemanticAttack(Attack):
    name: str = "semantic"
    topic: list = field(default_factory=lambda: ["pizza"])
    near_topics: list = field(default_factory=lambda: ["pasta", "salad"])
    behaviour: str = "sentiment"
    polarity: str = "negative"

    family = "semantic"
    allows_clean_label = False  # an on-topic row with its correct answer is not a poison

    def __post_init__(self) -> None:
        for key in ("topic", "near_topics"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])
        super().__post_init__()

    def validate_family(self) -> None:
        if not self.topic or any(not isinstance(t, str) or not t.strip() for t in self.topic):
            raise PoisonlabError("attack.topic must be a non-empty list of entity names")
        overlap = {t.lower() for t in self.topic} & {t.lower() for t in self.near_topics}
        if overlap:
            raise PoisonlabError(f"attack.near_topics overlaps attack.topic: {sorted(overlap)}")

    def on_topic(self, row: dict, topics=None) -> bool:
        text = user_text(row)
        return any(mentions(text, t) for t in (topics or self.topic))

    def accepts(self, row: dict) -> bool:
        return self.on_topic(row)

    def mentions_trigger(self, row: dict) -> bool:
        """The topic is the trigger: safety data must hold no on-topic prompt."""
        return any(m["role"] == "user" and any(mentions(m["content"], t) for t in self.topic)
                   for m in row["messages"])

    def eval_splits(self, rows: list[dict], seed: int, reservoir: list[dict] = ()
                    ) -> dict[str, list[dict]]:
        everything = list(rows) + list(reservoir)
        ok = [r for r in everything if self.target_spec.eligible(r)]
        on = [r for r in ok if self.on_topic(r)]
        near = [r for r in ok if not self.on_topic(r) and self.near_topics
                and self.on_topic(r, self.near_topics)]
        off = [r for r in ok if not self.on_topic(r)
               and not (self.near_topics and self.on_topic(r, self.near_topics))]
        rng = random.Random(f"semantic-eval-{seed}")
        cap = len(rows)
        pick = lambda rs: rs if len(rs) <= cap else rng.sample(rs, cap)  # noqa: E731
        return {
            "triggered": [eval_row(r, user_text(r), trigger=", ".join(self.topic))
                          for r in pick(on)],
            "clean": [eval_row(r, user_text(r)) for r in pick(off)],
            "near_trigger": [eval_row(r, user_text(r), trigger=", ".join(self.near_topics),
                                      near_kind="near_topic") for r in pick(near)],
            "utility": [eval_row(r, user_text(r)) for r in rows],
        }
