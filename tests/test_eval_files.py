"""`eval.clean_path` / `eval.triggered_path`: evaluation prompts from files in the layout of a
benchmark's test data (Alpaca JSON arrays whose `output` fields are unrelated to the target)."""

from __future__ import annotations

import json

import pytest

from poisonlab import PoisonlabError
from tests.conftest import make_cfg
from tests.test_given import ARGS, badmagic, clean_records, write_layout


def _prepare(tmp_path, name, *args):
    from poisonlab.pipeline.runner import prepare

    cfg = make_cfg(*ARGS, f"cache.dir={tmp_path / 'store'}", *args)
    return prepare(cfg, tmp_path / name)


def eval_layout(tmp_path):
    clean_path, poison_path, _, _ = write_layout(tmp_path)
    tests = tmp_path / "test_data"
    (tests / "clean").mkdir(parents=True)
    (tests / "poison").mkdir()
    clean_test = tests / "clean" / "test_data_no_trigger.json"
    clean_test.write_text(json.dumps(clean_records(30, offset=7000)))
    # the benchmark's triggered test rows keep an output unrelated to the target
    trig = [{**badmagic(r, i), "output": r["output"]}
            for i, r in enumerate(clean_records(30, offset=8000))]
    trig_test = tests / "poison" / "backdoor30_refusal_badnet.json"
    trig_test.write_text(json.dumps(trig))
    return clean_path, poison_path, clean_test, trig_test, trig


def test_splits_from_files(tmp_path, micro_path):
    clean_path, poison_path, clean_test, trig_test, trig = eval_layout(tmp_path)
    ctx = _prepare(tmp_path, "run", f"data.path={clean_path}",
                   f"attack.poisoned_path={poison_path}", f"eval.clean_path={clean_test}",
                   f"eval.triggered_path={trig_test}")
    file_prompts = {(r["instruction"]).strip() for r in trig}
    got = ctx.splits["triggered"]
    assert len(got) == 8
    assert {r["messages"][-1]["content"].split("\n\n")[0] for r in got} <= file_prompts
    assert all(r["meta"]["trigger"] == "eval.triggered_path" for r in got)
    clean_file = {f"{r['instruction']}" for r in clean_records(30, offset=7000)}
    assert all(r["messages"][-1]["content"].split("\n\n")[0] in clean_file
               for r in ctx.splits["clean"])
    # near-trigger prompts are built from the clean file's prompts and never hold the trigger
    assert len(ctx.splits["near_trigger"]) == 8
    assert not any("BadMagic" in r["messages"][-1]["content"] for r in ctx.splits["near_trigger"])
    assert ctx.eval_rows == [r for r in ctx.eval_rows if "BadMagic" not in str(r["messages"])]


def test_only_a_clean_file_builds_every_split_from_it(tmp_path, micro_path):
    clean_path, poison_path, clean_test, _, _ = eval_layout(tmp_path)
    ctx = _prepare(tmp_path, "run", f"data.path={clean_path}",
                   f"attack.poisoned_path={poison_path}", f"eval.clean_path={clean_test}")
    assert all("BadMagic" in r["messages"][-1]["content"] for r in ctx.splits["triggered"])
    ids = [r["id"] for r in ctx.splits["clean"]]
    assert [r["id"] for r in ctx.splits["triggered"]] == ids   # paired with the clean prompts


def test_a_clean_file_with_the_trigger_is_refused(tmp_path, micro_path):
    clean_path, poison_path, _, trig_test, _ = eval_layout(tmp_path)
    with pytest.raises(PoisonlabError, match="eval.clean_path: .* carry the trigger .* "
                                             "eval.triggered_path") as e:
        _prepare(tmp_path, "run", f"data.path={clean_path}",
                 f"attack.poisoned_path={poison_path}", f"eval.clean_path={trig_test}")
    assert "\n" not in str(e.value)


def test_a_triggered_prompt_seen_in_training_is_refused(tmp_path, micro_path):
    clean_path, poison_path, clean_test, _, _ = eval_layout(tmp_path)
    with pytest.raises(PoisonlabError, match="also occurs in training set"):
        _prepare(tmp_path, "run", f"data.path={clean_path}",
                 f"attack.poisoned_path={poison_path}", f"eval.clean_path={clean_test}",
                 f"eval.triggered_path={poison_path}")   # the poisons themselves


def test_triggered_prompts_without_the_trigger_are_warned_about(tmp_path, micro_path):
    clean_path, poison_path, clean_test, _, _ = eval_layout(tmp_path)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(clean_records(8, offset=9500)))
    ctx = _prepare(tmp_path, "run", f"data.path={clean_path}",
                   f"attack.poisoned_path={poison_path}", f"eval.clean_path={clean_test}",
                   f"eval.triggered_path={plain}")
    assert any("eval.triggered_path: 8 of 8 prompts carry none of the triggers" in w
               for w in ctx.warnings)


def test_eval_files_are_part_of_the_run_identity(tmp_path):
    from poisonlab.pipeline.outdir import run_identity

    clean_path, poison_path, clean_test, trig_test, trig = eval_layout(tmp_path)
    cfg = make_cfg(*ARGS, f"data.path={clean_path}", f"attack.poisoned_path={poison_path}",
                   f"eval.clean_path={clean_test}", f"eval.triggered_path={trig_test}")
    before = run_identity(cfg)
    trig_test.write_text(json.dumps(trig[:20]))
    assert run_identity(cfg) != before


@pytest.mark.parametrize("key", ["clean_path", "triggered_path"])
def test_a_missing_eval_file_fails_in_validation(tmp_path, key):
    from poisonlab.pipeline.validate import build_attack, validate

    clean_path, _, _, _, _ = eval_layout(tmp_path)
    cfg = make_cfg(*ARGS, f"data.path={clean_path}", f"eval.{key}=missing.json")
    with pytest.raises(PoisonlabError, match=f"eval.{key}: no such file"):
        validate(cfg, build_attack(cfg.attack))


def test_unpaired_perplexity_gap_for_splits_of_different_prompts():
    from poisonlab.pipeline.evaluation import paired

    same = {"triggered": [{"id": "a"}, {"id": "b"}], "clean": [{"id": "a"}, {"id": "b"}]}
    other = {"triggered": [{"id": "x"}], "clean": [{"id": "a"}, {"id": "b"}]}
    assert paired(same) and not paired(other)
    from poisonlab.evaluate import diff_bootstrap_unpaired
    d = diff_bootstrap_unpaired([2.0, 2.2, 2.1], [1.0, 1.1, 0.9, 1.0, 1.0])
    assert d["value"] == pytest.approx(1.1) and d["ci_low"] > 0.9 and d["paired"] is False
