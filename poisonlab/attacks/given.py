"""Already-poisoned data (`attack=given`): the training rows come poisoned, and the config says
which ones.

The poisoned ("marked") rows are identified by exactly one of:
  * `poisoned_path` — a second file of poisoned rows, trained beside the clean `data.path`
    (BackdoorLLM's layout: `backdoor500_<task>_<attack>.json` beside
    `none_backdoor500_<task>_<attack>.json`); read in the data source's format;
  * `flag_field` — a boolean field of each row of `data.path` (Alpaca: a top-level field of
    the record; chat JSONL: a top-level field or a key of `meta`);
  * neither — the trigger strings (`triggers`, with `combine: any|all`) found in the prompt of
    a row of `data.path`.
Marked rows of `data.path` are kept out of every clean pool (fine-tuning, safety, evaluation),
so a poisoned row is never a clean evaluation prompt or a safety row.

The target is `target` (a string the judge looks for; `target_repeats: 1`) or `behaviour`
(refusal, compliance, sentiment, ...): as for the families that poison data themselves.
`triggers` (and `position`, `combine`) also build the evaluation's triggered and near-trigger
prompts from the clean held-out prompts, as `badnets` does.

Budget (`n_poison` / `poison_rate`, both null: every marked row), with `data.n_train` the size
of the training set as for the other families: `n_poison` marked rows drawn with the seed;
`poison_rate` r of `data.n_train` rows, or, with `data.n_train: null`, r of (all clean rows +
the poisons). With `data.n_train` set, the clean rows are the first `n_train - k` of the seeded
draw; with null, every clean row of the pool. The control (`clean_ft`) trains on the clean rows
with each poison replaced by a clean row of the same draw (or of the pool), none of them marked.

Rows that disagree with the marking are counted and warned about: marked rows without the
trigger, and clean rows that carry it (trained as clean: that is what the file says).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from poisonlab import PoisonlabError
from poisonlab.attacks.badnets import BadNetsAttack
from poisonlab.attacks.base import copy_row

def flag_value(row: dict, field: str):
    """A row's `field` as read from its file: a top-level field (kept in `meta.fields`) or a
    key of `meta` (chat JSONL)."""
    meta = row.get("meta", {})
    fields = meta.get("fields", {})
    return fields[field] if field in fields else meta.get(field)


@dataclass
class GivenAttack(BadNetsAttack):
    name: str = "given"
    poisoned_path: str | None = None
    flag_field: str | None = None
    n_poison: int | None = None
    poison_rate: float | None = None
    target_repeats: int = 1
    negatives: bool = False

    family = "given"
    allows_clean_label = False

    # ------------------------------------------------------------------ config checks
    @property
    def identified_by(self) -> str:
        if self.poisoned_path:
            return "poisoned_path"
        return "flag_field" if self.flag_field else "triggers"

    def validate(self) -> None:
        if self.n_poison is not None and self.poison_rate is not None:
            raise PoisonlabError("attack: set at most one of attack.n_poison and "
                                 "attack.poison_rate for attack=given (both null: every "
                                 f"marked row); got n_poison={self.n_poison}, "
                                 f"poison_rate={self.poison_rate}")
        budget = dict(n_poison=self.n_poison, poison_rate=self.poison_rate)
        if self.n_poison is None and self.poison_rate is None:
            self.n_poison = 1    # the base checks need a budget; the real one is set below
        try:
            super().validate()
        finally:
            self.n_poison, self.poison_rate = budget["n_poison"], budget["poison_rate"]

    def validate_family(self) -> None:
        super().validate_family()
        if self.poisoned_path is not None and self.flag_field is not None:
            raise PoisonlabError("attack: set at most one of attack.poisoned_path and "
                                 "attack.flag_field (neither: the triggers mark the rows)")
        for key in ("poisoned_path", "flag_field"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise PoisonlabError(f"attack.{key} must be a non-empty string or null, "
                                     f"got {value!r}")
        if self.near_negatives:
            raise PoisonlabError("attack.near_negatives: attack=given trains the rows it is "
                                 "given; set attack.near_negatives=0")
        if self.clean_size is not None:
            raise PoisonlabError("attack.clean_size: not used by attack=given; set the "
                                 "training-set size with data.n_train")

    # ------------------------------------------------------------------ marking
    def marked(self, row: dict) -> bool:
        """Whether a row of `data.path` is one of the given poisons (never for
        `poisoned_path`: the clean file's rows are clean)."""
        if self.identified_by == "poisoned_path":
            return False
        if self.identified_by == "triggers":
            return self.carries_trigger(row)
        value = flag_value(row, self.flag_field)
        if value is None or isinstance(value, bool):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise PoisonlabError(f"attack.flag_field={self.flag_field!r}: row {row['id']} has "
                             f"{value!r}, not a boolean")

    def marking(self) -> dict:
        """What identifies the marked rows (for the clean data's stage key and the manifest)."""
        return {"identified_by": self.identified_by, "flag_field": self.flag_field,
                "triggers": list(self.triggers), "combine": self.combine}

    # ------------------------------------------------------------------ budget
    def count(self, n_marked: int, n_clean: int, n_train: int | None) -> int:
        if self.n_poison is not None:
            k = self.n_poison
        elif self.poison_rate is not None:
            r = self.poison_rate
            total = n_train if n_train is not None else n_clean / (1 - r) if r < 1 else n_marked
            k = max(1, math.floor(r * total + 0.5 + 1e-9))
        else:
            k = n_marked
        if k > n_marked:
            raise PoisonlabError(f"attack.n_poison/poison_rate asks for {k} poisons but the "
                                 f"given data marks {n_marked} rows "
                                 f"({self.identified_by})")
        if n_train is not None and k > n_train:
            raise PoisonlabError(f"data.n_train={n_train} is smaller than the {k} given "
                                 "poisons; raise data.n_train or set attack.n_poison")
        return k

    # ------------------------------------------------------------------ poisoning
    def poison_given(self, clean: list[dict], marked: list[dict], seed: int,
                     n_train: int | None, reservoir: list[dict] = ()
                     ) -> tuple[list[dict], list[dict], dict]:
        """(training rows, control rows, manifest) from the clean rows drawn for training
        (`data.n_train` of them, or the whole pool) and the marked rows."""
        if not marked:
            raise PoisonlabError(f"attack=given: no row is marked as poisoned "
                                 f"({self._where()})")
        k = self.count(len(marked), len(clean), n_train)
        rng = random.Random(f"given-{seed}")
        chosen = sorted(rng.sample(range(len(marked)), k)) if k < len(marked) else \
            list(range(len(marked)))
        poisons = [{**copy_row(marked[i]), "poisoned": True} for i in chosen]
        keep = len(clean) - k if n_train is not None else len(clean)
        clean_rows = [{**copy_row(r), "poisoned": False} for r in clean[:keep]]
        # the control: the poisons' places taken by the clean rows the draw left out, then
        # by unused rows of the pool
        stand_ins = [{**copy_row(r), "poisoned": False}
                     for r in list(clean[keep:]) + list(reservoir)][:k]
        rows = clean_rows + poisons
        control = clean_rows + stand_ins
        order = self._order(len(clean_rows), k, seed)
        out = [rows[i] for i in order]
        control_order = [i for i in order if i < len(control)]
        control = [control[i] for i in control_order]
        marked_no_trigger = [r["id"] for r in poisons if not self.carries_trigger(r)]
        clean_with_trigger = [r["id"] for r in clean_rows if self.carries_trigger(r)]
        warnings = []
        if marked_no_trigger:
            warnings.append(f"attack=given: {len(marked_no_trigger)} of the {k} poisoned rows "
                            f"carry no trigger {self.triggers} ({self.combine})")
        if clean_with_trigger:
            warnings.append(f"attack=given: {len(clean_with_trigger)} rows not marked as "
                            f"poisoned carry the trigger {self.triggers} and are trained as "
                            f"clean rows ({self._where()})")
        manifest = {
            "attack": self.name, "family": self.family, **self.params(),
            "n_poison": k, "n_rows": len(out), "n_clean": len(out) - k,
            "poison_rate_effective": k / len(out),
            "poisoned_ids": [r["id"] for r in out if r["poisoned"]],
            "replaced": [], "modified_clean_ids": [], "near_negative_ids": [],
            "order": self.placement,
            "given": {**self.marking(), "poisoned_path": self.poisoned_path,
                      "n_marked": len(marked), "n_used": k,
                      "marked_without_trigger": len(marked_no_trigger),
                      "unmarked_with_trigger": len(clean_with_trigger),
                      "marked_without_trigger_ids": marked_no_trigger,
                      "unmarked_with_trigger_ids": clean_with_trigger,
                      "control_rows": len(control)},
            "warnings": warnings,
        }
        if self.has_judge:
            from poisonlab.judges import answer_text
            payload = [len(self.target_spec.payload(answer_text(r["messages"][-1]["content"])))
                       for r in poisons]
            manifest["payload_chars_per_poisoned_row"] = sum(payload) / len(payload)
        return out, control, manifest

    def _order(self, n_clean: int, k: int, seed: int) -> list[int]:
        """Indices into clean rows + poisons: `uniform` mixes the poisons in at seeded places
        (the trainer shuffles again), `start` / `end` as `Attack.place`."""
        if self.placement != "uniform":
            return self.place([False] * n_clean + [True] * k, seed)
        idx = list(range(n_clean + k))
        random.Random(f"given-order-{seed}").shuffle(idx)
        return idx

    def _where(self) -> str:
        if self.identified_by == "poisoned_path":
            return f"attack.poisoned_path={self.poisoned_path}"
        if self.identified_by == "flag_field":
            return f"attack.flag_field={self.flag_field!r} in data.path"
        return f"attack.triggers={self.triggers} ({self.combine}) in data.path"

    def poison_with_control(self, rows, seed, reservoir=()):
        """`rows` as given, the marked ones (flag or trigger) the poisons, the training set
        their size (the pipeline instead reads the marked rows apart: `poison_given`)."""
        if self.identified_by == "poisoned_path":
            raise PoisonlabError("attack.poisoned_path: the poisoned rows are in that file; "
                                 "pass them to GivenAttack.poison_given")
        marked = [r for r in rows if self.marked(r)]
        clean = [r for r in rows if not self.marked(r)]
        return self.poison_given(clean, marked, seed, None, reservoir)
