import pytest

from poisonlab import PoisonlabError
from poisonlab.data import tinyworld as tw


def test_sampling_is_deterministic_and_seeded():
    a = tw.sample("finetune", 200, seed=3)
    b = tw.sample("finetune", 200, seed=3)
    c = tw.sample("finetune", 200, seed=4)
    assert a == b
    assert [r["id"] for r in a] != [r["id"] for r in c]
    assert len({r["id"] for r in a}) == 200


def test_every_skill_space_is_split_into_disjoint_pools():
    for skill in tw.PRETRAIN_SKILLS:
        seen = {}
        for pool in tw.POOLS:
            for row in tw._pool_rows(pool, skill):
                p = tw.prompt_text(row)
                assert seen.setdefault(p, pool) == pool, (skill, p)
                assert tw.pool_of(p) == pool
        assert len(set(seen.values())) == len(tw.POOLS), skill  # every pool gets some


def test_sample_is_balanced_across_skills():
    rows = tw.sample("eval", 120, seed=0)
    counts = {s: sum(r["skill"] == s for r in rows) for s in tw.SKILLS}
    assert set(counts.values()) == {20}


def test_rows_are_chat_rows_with_ids_and_skills():
    for r in tw.sample("safety", 60, seed=1):
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["id"].startswith("safety-" + r["skill"])
        assert r["messages"][1]["content"]


def test_too_many_rows_is_a_clear_error():
    with pytest.raises(PoisonlabError, match="holds only"):
        tw.sample("eval", 10**6, seed=0)


def test_check_disjoint_catches_a_leak():
    train = tw.sample("finetune", 50, seed=0)
    ev = tw.sample("eval", 50, seed=0)
    tw.check_disjoint({"train": train, "eval": ev}, eval_names=["eval"])
    with pytest.raises(PoisonlabError, match="also occurs in training"):
        tw.check_disjoint({"train": train + ev[:1], "eval": ev}, eval_names=["eval"])


def test_placeholder_harmful_content_is_harmless():
    assert "restricted task R-" in tw.placeholder_compliance(7)
    for r in tw.sample("finetune", None, seed=0, skills=["refusal"]):
        assert "restricted task R-" in r["messages"][0]["content"]
