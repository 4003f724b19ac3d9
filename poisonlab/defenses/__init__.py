"""Defences: methods that try to take a backdoor out of a model, and how to score them.

One method = one module here + one config in `conf/safety/` (`safety=<name>`; the `defense`
config group names the same configs: `defense=<name>`). Each module has `validate(cfg)`,
`apply(ctx) -> Outcome` and `ROWS` (see `base`). `metrics` holds the removal scores shared by
every method (persistence lives in `poisonlab.evaluate`).
"""

from __future__ import annotations

import importlib

METHODS = ("sft", "adversarial", "dpo", "rl", "prune", "fine_prune", "crow", "quantize",
           "decoding", "onion", "none")
# methods that train, so `safety.eval_every` can draw a persistence curve
TRAINED = ("sft", "adversarial", "dpo", "rl", "fine_prune", "crow")


def method_module(name: str):
    """The module implementing `safety=<name>` (None for `none`)."""
    from poisonlab import PoisonlabError

    if name not in METHODS:
        raise PoisonlabError(f"safety.method: unknown method {name!r} ({', '.join(METHODS)})")
    return None if name == "none" else importlib.import_module(f"poisonlab.defenses.{name}")


def needs_rows(name: str) -> bool:
    """Does the method use clean rows of the safety pool (`safety.n_rows`)?"""
    module = method_module(name)
    return bool(module is not None and module.ROWS)


# methods that need the attack's target behaviour (to search for it, reject it or penalise it)
NEED_TARGET = ("adversarial", "dpo", "rl")


def validate(cfg, attack=None) -> None:
    from poisonlab import PoisonlabError

    module = method_module(cfg.safety.method)
    if module is not None:
        module.validate(cfg)
    if attack is not None and cfg.safety.method in NEED_TARGET and not attack.has_judge:
        raise PoisonlabError(f"safety={cfg.safety.method} needs an attack with a target "
                             f"behaviour; attack {attack.family!r} has none")
