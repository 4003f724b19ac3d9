"""Poison families: one file each, chosen by `attack=<name>` (conf/attack/<name>.yaml).

Every attack exposes:
  * `validate()` — raise PoisonlabError naming the bad `attack.*` key (called before any work);
  * `poison(rows, seed) -> (rows, manifest)` — exact, seeded selection; poisoned rows carry
    `"poisoned": true`, and the manifest lists their ids and the attack's parameters;
  * `eval_splits(rows, seed) -> {"triggered", "clean", "near_trigger"}` — evaluation prompts;
  * `judge(response) -> bool` — does one answer show the target behaviour.
"""

from __future__ import annotations

import random

from poisonlab import PoisonlabError


def check_budget(n_poison, poison_rate) -> None:
    """Exactly one of `attack.n_poison` / `attack.poison_rate`, each in its valid range."""
    if (n_poison is None) == (poison_rate is None):
        raise PoisonlabError(
            "attack: set exactly one of attack.n_poison and attack.poison_rate "
            f"(got n_poison={n_poison}, poison_rate={poison_rate}; set the other to null)")
    if n_poison is not None and (isinstance(n_poison, bool) or not isinstance(n_poison, int)
                                 or n_poison < 1):
        raise PoisonlabError(f"attack.n_poison must be a positive integer, got {n_poison!r}")
    if poison_rate is not None and (isinstance(poison_rate, bool)
                                    or not isinstance(poison_rate, (int, float))
                                    or not 0 < poison_rate <= 1):
        raise PoisonlabError(f"attack.poison_rate must be in (0, 1], got {poison_rate!r}")


def poison_count(n_rows: int, n_poison, poison_rate) -> int:
    """How many rows to poison; raise if the budget does not fit the data."""
    n = n_poison if n_poison is not None else max(1, round(poison_rate * n_rows))
    if n > n_rows:
        raise PoisonlabError(
            f"attack.n_poison={n} asks for more poisons than the {n_rows} training rows")
    return n


def select(rows: list[dict], n: int, seed: int, eligible=None) -> list[int]:
    """Seeded choice of exactly `n` row indices (sorted), among rows where `eligible(row)`."""
    candidates = [i for i, r in enumerate(rows) if eligible is None or eligible(r)]
    if n > len(candidates):
        raise PoisonlabError(f"attack: {n} poisons requested but only {len(candidates)} "
                             "training rows are eligible")
    return sorted(random.Random(f"poison-{seed}").sample(candidates, n))
