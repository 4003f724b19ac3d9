"""Random poisoning: corrupted answers at a rate or count, with no trigger.

`mode`:
  * `shuffle`: the chosen rows' answers are permuted among themselves: the poisoned rows hold
    exactly the multiset of their clean answers, and no row keeps its own answer or gets an
    identical one, unless one answer fills more than half of the chosen rows (then no such
    permutation exists; the manifest counts the rows left `unchanged`);
  * `wrong_label`: each chosen row gets a wrong answer of the right type — the other label for
    sentiment, another row's answer of the same skill otherwise.
Its effect is on clean utility: the pipeline reports the utility drop against the base model
and, with `control=true`, against the clean fine-tune on the same rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from poisonlab import PoisonlabError
from poisonlab.attacks.base import Attack, eval_row, user_text, with_answer
from poisonlab.attacks.targets import clean_answer

MODES = ("shuffle", "wrong_label")


@dataclass
class RandomAttack(Attack):
    name: str = "random"
    mode: str = "shuffle"

    family = "random"
    has_judge = False
    allows_clean_label = False

    def validate_family(self) -> None:
        if self.mode not in MODES:
            raise PoisonlabError(f"attack.mode: unknown mode {self.mode!r}; choose from {list(MODES)}")

    def candidate(self, row: dict) -> bool:
        return True

    def params(self) -> dict:
        d = super().params()
        for k in ("clean_label",):
            d.pop(k, None)
        return d

    def corrupt(self, rows: list[dict], chosen: list[int], seed: int) -> list[dict]:
        rng = random.Random(f"random-{seed}")
        if self.mode == "shuffle":
            answers = [clean_answer(rows[i]) for i in chosen]
            new = [answers[j] for j in derangement(answers, rng)]
            self._unchanged = sum(a == b for a, b in zip(answers, new))
            return [with_answer(rows[i], a) for i, a in zip(chosen, new)]
        return [with_answer(rows[i], self._other(rows, i, rng)) for i in chosen]

    def poison_notes(self, rows: list[dict]) -> dict:
        return {"unchanged": getattr(self, "_unchanged", 0)} if self.mode == "shuffle" else {}

    def _other(self, rows: list[dict], i: int, rng: random.Random) -> str:
        row, answer = rows[i], clean_answer(rows[i])
        if row["skill"] == "sentiment" and answer in ("positive", "negative"):
            return "negative" if answer == "positive" else "positive"
        same = sorted({clean_answer(r) for r in rows
                       if r["skill"] == row["skill"] and clean_answer(r) != answer})
        pool = same or sorted({clean_answer(r) for r in rows if clean_answer(r) != answer})
        if not pool:
            raise PoisonlabError("attack: random poisoning needs at least two distinct answers")
        return rng.choice(pool)

    def eval_splits(self, rows: list[dict], seed: int, reservoir: list[dict] = ()
                    ) -> dict[str, list[dict]]:
        return {"clean": [eval_row(r, user_text(r)) for r in rows]}

    judge = None


def derangement(values: list, rng: random.Random) -> list[int]:
    """A permutation p of range(len(values)) with values[p[k]] != values[k] wherever possible.

    Sort the positions by value (ties in a seeded random order) and shift the sorted order
    by the largest multiplicity m: when m <= n/2 no position lands on its own value's block.
    """
    n = len(values)
    if n < 2:
        return list(range(n))
    keys = {v: rng.random() for v in sorted(set(values), key=str)}
    order = sorted(range(n), key=lambda k: (keys[values[k]], rng.random()))
    m = max(values.count(v) for v in keys)
    shift = m if m < n else 1
    p = [0] * n
    for pos, k in enumerate(order):
        p[k] = order[(pos + shift) % n]
    return p
