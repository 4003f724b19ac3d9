"""Random poisoning: corrupted answers at a rate or count, with no trigger.

`mode`:
  * `shuffle`: the chosen rows' answers are permuted among themselves (each row gets another
    row's answer, never its own or an identical one);
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
        answers = [clean_answer(rows[i]) for i in chosen]
        out = []
        if self.mode == "shuffle":
            donors = list(range(len(chosen)))
            rng.shuffle(donors)
            for k, i in enumerate(chosen):
                # the first donor (in seeded order) with a different answer
                j = next((d for d in donors[k:] + donors[:k] if answers[d] != answers[k]), None)
                new = answers[j] if j is not None else self._other(rows, i, rng)
                out.append(with_answer(rows[i], new))
            return out
        for i in chosen:
            out.append(with_answer(rows[i], self._other(rows, i, rng)))
        return out

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
