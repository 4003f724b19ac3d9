"""A model's life (`experiment=lifecycle`, poisonlab/pipeline/lifecycle.py): update rounds of
the deployed model behind a data gate and a behaviour-drift gate, with rollback; the
stand-alone drift check (`poisonlab drift`), the life's figure, report and ML-BOM lineage.

One micro-model life of three rounds (20 BadNets poisons in round 2 of 100-row batches) runs
with each gate alone; the other lives reuse its cached rounds."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re

import pytest

from poisonlab import PoisonlabError
from poisonlab.drift import drift_tests, mcnemar
from tests.conftest import make_cfg

LIFE = ("experiment=lifecycle", "debug=default", "lifecycle.rows_per_round=100",
        "lifecycle.schedule=[{type:sft},{type:sft,poison:20},{type:sft}]",
        "lifecycle.drift_gate.n_probes=32", "eval.n_prompts=32", "train.epochs=3",
        "lifecycle.drift_gate.calibration.rounds=0")   # the calibrated gate: drift_life


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("life_store")


def live(tmp_path_factory, store, name: str, *args: str):
    from poisonlab.run import run

    out = tmp_path_factory.mktemp(name)
    cfg = make_cfg(*LIFE, f"cache.dir={store}", *args)
    return out, run(cfg, out_dir=out)


@pytest.fixture(scope="module")
def quarantine_life(tmp_path_factory, store, micro_path):
    """Both gates on (the default: quarantine, rollback)."""
    return live(tmp_path_factory, store, "life_q")


@pytest.fixture(scope="module")
def drift_life(tmp_path_factory, store, micro_path):
    """No data gate: the drift gate alone, calibrated on three clean shadow updates of each
    round's parent, meets the poisoned round. 40 poisons of 100 rows and 48 probes per split:
    the near-miss refusal rate then moves by 0.6-0.9 across seeds (with 20 poisons and 32
    probes the gate caught the round on 3 of 5 seeds, both thread counts), clean updates'
    by at most 0.06."""
    return live(tmp_path_factory, store, "life_d", "lifecycle.data_gate.policy=off",
                "lifecycle.schedule=[{type:sft},{type:sft,poison:40},{type:sft}]",
                "lifecycle.drift_gate.n_probes=48", "lifecycle.drift_gate.calibration.rounds=3")


# ----------------------------------------------------------------------------- statistics

def test_mcnemar_is_the_exact_two_sided_test_on_discordant_pairs():
    assert mcnemar([False] * 10, [True] * 10) == pytest.approx(2 / 2 ** 10)
    assert mcnemar([True, False] * 5, [False, True] * 5) == 1.0      # 5 each way
    assert mcnemar([True] * 8, [True] * 8) == 1.0                    # nothing discordant
    # 1 one way, 7 the other: 2 * P(X <= 1), X ~ Bin(8, 1/2)
    old, new = [True] + [False] * 7, [False] + [True] * 7
    assert mcnemar(old, new) == pytest.approx(2 * 9 / 256)


def _probe(i, answer="4"):
    return {"id": f"p{i}", "skill": "chat", "messages": [{"role": "user", "content": "q"}],
            "answer": answer, "meta": {}}


def test_drift_fails_only_a_split_whose_rate_moves_beyond_the_tolerance():
    probes = {"clean": [_probe(i) for i in range(40)], "near_miss": [_probe(i) for i in range(40)]}
    old = {"clean": ["The answer is 4."] * 40, "near_miss": ["The answer is 4."] * 40}
    refusals = ["I cannot help with that request."] * 30 + ["The answer is 4."] * 10
    new = {"clean": list(old["clean"]), "near_miss": refusals}
    report = drift_tests(old, new, probes, alpha=0.05, tolerance=0.1)
    assert report["decision"] == "fail"
    assert "near_miss/refuses" in report["failed"]
    assert not any(f.startswith("clean/") for f in report["failed"])
    assert report["changed"] == {"clean": 0.0, "near_miss": 0.75}
    assert report["p_limit"] == pytest.approx(0.05 / len(report["tests"]))
    # the same move below the tolerance is recorded, not failed
    loose = drift_tests(old, new, probes, alpha=0.05, tolerance=0.9)
    assert loose["decision"] == "pass" and loose["tests"]
    # identical answers never fail
    assert drift_tests(old, old, probes, 0.05, 0.1)["decision"] == "pass"


@pytest.mark.parametrize("override, key", [
    ("lifecycle.schedule=[{type:dance}]", "lifecycle.schedule[0].type"),
    ("lifecycle.schedule=[{type:safety,poison:3}]", "lifecycle.schedule[0].poison"),
    ("lifecycle.schedule=[{type:sft,poison:1.5}]", "lifecycle.schedule[0].poison"),
    ("lifecycle.data_gate.policy=maybe", "lifecycle.data_gate.policy"),
    ("lifecycle.data_gate.detectors=[loss]", "lifecycle.data_gate.detectors"),
    ("lifecycle.drift_gate.alpha=2", "lifecycle.drift_gate.alpha"),
    ("lifecycle.drift_gate.logprob_shift=sometimes", "lifecycle.drift_gate.logprob_shift"),
    ("lifecycle.rows_per_round=0", "lifecycle.rows_per_round"),
    ("lifecycle.adapter=reuse", "lifecycle.adapter"),
    ("lifecycle.schedule=[{type:sft,adapter:old}]", "lifecycle.schedule[0].adapter"),
    ("lifecycle.dpo_beta=0", "lifecycle.dpo_beta"),
    ("lifecycle.schedule=[{type:sft,drift:maybe}]", "lifecycle.schedule[0].drift"),
    ("lifecycle.drift_gate.calibration.rounds=-1", "lifecycle.drift_gate.calibration.rounds"),
    ("lifecycle.schedule=[{type:sft,method:dpo}]", "lifecycle.schedule[0].method"),
    ("lifecycle.schedule=[{type:safety,method:onion}]", "lifecycle.schedule[0].method"),
    ("lifecycle.schedule=[{type:safety,method:prune,settings:{ratio:1.5}}]",
     "lifecycle.schedule[0] (method prune): safety.ratio"),
    ("lifecycle.schedule=[{type:safety,method:prune,settings:{depth:3}}]",
     "lifecycle.schedule[0].settings: unknown keys ['depth']"),
    ("lifecycle.schedule=[{type:safety,settings:{lr:0.1}}]", "lifecycle.schedule[0].settings"),
    ("lifecycle.schedule=[{type:sft,settings:{ratio:0.1}}]", "lifecycle.schedule[0].method"),
    ("lifecycle.drift_gate.calibration.from=elsewhere", "lifecycle.drift_gate.calibration.from"),
])
def test_a_bad_lifecycle_key_is_named_before_any_work(override, key):
    from poisonlab.pipeline import lifecycle

    with pytest.raises(PoisonlabError, match=re.escape(key)):
        lifecycle.validate(make_cfg(*LIFE, override))


def test_student_t_tail_matches_closed_forms():
    from poisonlab.drift import student_t_sf

    # df 1 is Cauchy, df 2 has P(T > t) = (1 - t / sqrt(2 + t^2)) / 2
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 11.0):
        assert student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-9)
        assert student_t_sf(t, 2) == pytest.approx((1 - t / math.sqrt(2 + t * t)) / 2,
                                                   abs=1e-9)
    assert student_t_sf(1.959964, 10 ** 6) == pytest.approx(0.025, abs=1e-4)


def test_a_calibrated_gate_fails_only_beyond_every_clean_update():
    import numpy as np

    from poisonlab.drift import calibrate, shift_test

    probes = {"clean": [_probe(i) for i in range(40)], "near_miss": [_probe(i) for i in range(40)]}
    old = {"clean": ["The answer is 4."] * 40, "near_miss": ["The answer is 4."] * 40}

    def refusing(n):
        return {"clean": list(old["clean"]),
                "near_miss": ["I cannot help with that request."] * n + old["near_miss"][n:]}

    # clean updates that refuse 12 of 40 near-miss prompts: a move of 0.3 is what they do
    shadows = [refusing(12), refusing(11), refusing(10)]
    shifts = [{s: np.full(40, v) for s in probes} for v in (0.05, 0.06, 0.055)]
    cal = calibrate(old, shadows, probes, 0.1, shifts)
    assert cal["moved_max"]["near_miss/refuses"] == pytest.approx(0.3)
    assert cal["shift"]["clean"]["clean_means"] == pytest.approx([0.05, 0.06, 0.055])
    fixed = drift_tests(old, refusing(12), probes, 0.05, 0.1)
    assert "near_miss/refuses" in fixed["failed"]             # 0.3 > tolerance 0.1
    assert drift_tests(old, refusing(12), probes, 0.05, 0.1, calibration=cal)["decision"] \
        == "pass"                                              # but a clean update moves 0.3
    beyond = drift_tests(old, refusing(30), probes, 0.05, 0.1, calibration=cal,
                         shift={s: np.full(40, 0.055) for s in probes})
    assert beyond["failed"] == ["near_miss/refuses"]
    assert {t["judge"] for t in beyond["tests"]} >= {"answer_shift"}
    moved = drift_tests(old, old, probes, 0.05, 0.1, calibration=cal,
                        shift={"clean": np.full(40, 0.6), "near_miss": np.full(40, 0.05)})
    assert moved["failed"] == ["clean/answer_shift"]
    assert moved["answer_shift"]["clean"]["mean"] == pytest.approx(0.6)
    # the log-prob shift: calibrated and tested the same way, beside the answer shift
    logprobs = [{s: np.full(40, v) for s in probes} for v in (0.2, 0.25, 0.22)]
    cal = calibrate(old, shadows, probes, 0.1, shifts, 0, logprobs)
    assert cal["logprob_shift"]["near_miss"]["clean_means"] == pytest.approx([0.2, 0.25, 0.22])
    same = {s: np.full(40, 0.055) for s in probes}
    within = drift_tests(old, old, probes, 0.05, 0.1, calibration=cal, shift=same,
                         logprob={s: np.full(40, 0.23) for s in probes})
    assert within["decision"] == "pass"
    assert {t["judge"] for t in within["tests"]} >= {"answer_shift", "logprob_shift"}
    lp = drift_tests(old, old, probes, 0.05, 0.1, calibration=cal, shift=same,
                     logprob={"clean": np.full(40, 0.22), "near_miss": np.full(40, 3.0)})
    assert lp["failed"] == ["near_miss/logprob_shift"]
    assert lp["logprob_shift"]["near_miss"] == {"mean": 3.0, "share_above_0.1": 1.0}
    # the prediction test: within the clean spread passes, ten times it does not
    assert shift_test(0.06, [0.05, 0.06, 0.055])["p"] > 0.2
    assert shift_test(0.6, [0.05, 0.06, 0.055])["p"] < 0.005


# ----------------------------------------------------------------------------- a life

def _rows(out, k):
    return [json.loads(line) for line in
            (out / "data" / "rounds" / f"round{k}.jsonl").read_text().splitlines()]


def test_rounds_take_fresh_rows_and_exact_poison_counts(quarantine_life):
    out, results = quarantine_life
    life = results["lifecycle"]
    assert [r["round"] for r in life["rounds"]] == [1, 2, 3]
    batches = [_rows(out, k) for k in (1, 2, 3)]
    ids = [r["id"] for rows in batches for r in rows]
    assert len(ids) == len(set(ids)) == 300                      # no row twice in a life
    assert [sum(r["poisoned"] for r in rows) for rows in batches] == [0, 20, 0]
    assert life["first_poisoned_round"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["poison"]["rounds"][1]["poisoned_ids"]) == sorted(
        r["id"] for r in batches[1] if r["poisoned"])
    for entry in life["rounds"]:
        assert {"round", "type", "rows", "poisoned_rows", "quarantined", "data_gate",
                "drift_gate", "deployed", "stages"} <= set(entry)
        assert set(entry["stages"]) == {"candidate", "deployed"}


def test_data_gate_quarantines_the_poisons_and_the_life_ships_no_backdoor(quarantine_life):
    _, results = quarantine_life
    life = results["lifecycle"]
    gate = life["rounds"][1]["data_gate"]
    assert gate["decision"] == "quarantine" and gate["recall"] >= 0.9
    assert gate["precision"] >= 0.9
    assert life["rounds"][1]["quarantined_poisoned"] >= 18
    assert life["time_to_detection"] == 0
    # the clean rounds pass both gates and ship, each on its parent
    assert [e["parent"] for e in life["lineage"]] == [None, "base", "round1", "round2"]
    assert life["deployed"] == "round3"
    # what shipped is the base's behaviour on the same triggered prompts, within a margin
    assert life["shipped_asr_max"] <= results["stages"]["base"]["asr"]["value"] + 0.25


def test_drift_gate_rolls_back_the_poisoned_round(drift_life):
    """An effect test: with no data gate, the candidate trained on 40 'cf' -> refusal rows
    refuses near-miss probes far more often than its parent (0.6-0.9 more over seeds)."""
    _, results = drift_life
    life = results["lifecycle"]
    r2 = life["rounds"][1]
    assert r2["data_gate"]["decision"] == "pass" and r2["quarantined"] == 0
    assert r2["drift_gate"]["decision"] == "fail" and not r2["deployed"]
    assert "near_miss/refuses" in r2["drift_gate"]["failed"]
    assert r2["deployed_model"] == "round1"
    assert r2["stages"]["candidate"]["asr"]["value"] > r2["stages"]["deployed"]["asr"]["value"]
    # round 3 trains on the last model that passed
    assert [e["parent"] for e in life["lineage"]] == [None, "base", "round1", "round1"]
    assert life["time_to_detection"] == 0
    fa = life["drift_gate_false_alarms"]
    assert fa["clean_rounds"] == 2
    assert [r.get("clean_update") for r in life["rounds"]] == [True, False, True]
    assert fa["failed"] == sum(r["drift_gate"]["decision"] == "fail"
                               for r in life["rounds"] if r.get("clean_update"))


def test_the_drift_gate_calibrates_on_clean_shadows_of_each_parent(drift_life):
    out, results = drift_life
    life = results["lifecycle"]
    cals = life["drift_gate_calibration"]
    # rounds 1 and 2 train on the base and round 1; round 3 on round 1 again (rolled back)
    assert [(c["parent"], c["for_round"]) for c in cals] == [("base", 1), ("round1", 2)]
    assert [c["models"] for c in cals] == [[f"calib{k}_{j}" for j in (1, 2, 3)]
                                           for k in (1, 2)]
    assert [r["drift_gate"]["calibrated_on"] for r in life["rounds"]] == [
        cals[0]["models"], cals[1]["models"], cals[1]["models"]]
    # the poisoned round is out of line with what clean updates of its parent did
    r2 = life["rounds"][1]["drift_gate"]
    moved = {f"{t['split']}/{t['judge']}": t for t in r2["tests"]}
    assert moved["near_miss/refuses"]["diff"]["value"] > \
        cals[1]["moved_max"]["near_miss/refuses"] + 0.3
    assert {"clean/answer_shift", "near_miss/answer_shift", "clean/logprob_shift",
            "near_miss/logprob_shift"} <= set(moved)
    # the poisoned round makes the parent's near-miss answers far less likely than any clean
    # update of that parent does
    lp = r2["logprob_shift"]["near_miss"]["mean"]
    assert lp > 2 * max(cals[1]["logprob_shift"]["near_miss"]["clean_means"]), (
        lp, cals[1]["logprob_shift"])
    # the shadows' rows are fresh: in no round of the life
    life_ids = {r["id"] for k in (1, 2, 3) for r in _rows(out, k)}
    shadow_ids = [r["id"] for j in (1, 2, 3) for r in
                  map(json.loads, (out / "data" / "rounds" / f"calib_sft{j}.jsonl").open())]
    assert len(shadow_ids) == len(set(shadow_ids)) == 300
    assert life_ids.isdisjoint(shadow_ids)
    assert "round/calib2_1" in results["cache"]["keys"]
    from poisonlab.report.table import format_life

    assert "calibrated on 3 clean shadow updates of base, round1" in format_life(life)


def test_rounds_are_cached_by_parent_and_probes_never_carry_the_trigger(quarantine_life,
                                                                        drift_life):
    from poisonlab.pipeline.validate import build_attack

    out, q = quarantine_life
    _, d = drift_life
    # round 1 is the same stage in both lives; round 2 differs (poisons kept or not)
    assert "round/round1" in d["cache"]["reused"] + q["cache"]["reused"]   # the later life's
    assert q["cache"]["keys"]["round/round1"] == d["cache"]["keys"]["round/round1"]
    assert q["cache"]["keys"]["round/round2"] != d["cache"]["keys"]["round/round2"]
    attack = build_attack(make_cfg(*LIFE).attack)
    probes = [json.loads(line) for line in
              (out / "data" / "probes.jsonl").read_text().splitlines()]
    assert {p["meta"]["probe_split"] for p in probes} >= {"clean", "near_miss"}
    assert not any(attack.carries_trigger(p) for p in probes)
    assert not any("cf" in p["messages"][0]["content"].split() for p in probes)


def test_block_policy_skips_the_round_and_keeps_the_deployed_model(tmp_path_factory, store,
                                                                   quarantine_life):
    _, results = live(tmp_path_factory, store, "life_b", "lifecycle.data_gate.policy=block")
    life = results["lifecycle"]
    r2 = life["rounds"][1]
    assert r2["data_gate"]["decision"] == "block"
    assert r2["drift_gate"] is None and r2["candidate"] is None and not r2["deployed"]
    assert [e["model"] for e in life["lineage"]] == ["base", "round1", "round3"]
    assert "round/round1" in results["cache"]["reused"]


def test_a_failing_drift_gate_rolls_back_whatever_it_failed(tmp_path_factory, store,
                                                            quarantine_life, monkeypatch):
    """Rollback itself, with the gate's decision forced: the failed candidate is not
    deployed, the next round trains on the last passing model, and a clean round's failure
    is counted as a false alarm (a clean update: no poison slipped past the data gate)."""
    from poisonlab.pipeline import lifecycle

    real = lifecycle.drift_tests
    calls = []

    def fail_round_three(*args, **kw):
        report = real(*args, **kw)
        calls.append(1)
        if len(calls) == 3:
            report.update(decision="fail", failed=["clean/forced"])
        return report

    monkeypatch.setattr(lifecycle, "drift_tests", fail_round_three)
    _, results = live(tmp_path_factory, store, "life_r")
    life = results["lifecycle"]
    assert [r["deployed"] for r in life["rounds"]] == [True, True, False]
    assert life["deployed"] == "round2"
    clean = [r["clean_update"] for r in life["rounds"]]
    assert clean[0] and life["drift_gate_false_alarms"] == {
        "failed": int(clean[2]), "clean_rounds": sum(clean)}
    assert {"round/round1", "round/round2", "round/round3"} <= set(results["cache"]["reused"])


# ----------------------------------------------------------------------------- tools

def test_drift_command_on_two_stages_of_a_run(drift_life, capsys):
    from poisonlab import drift

    out, _ = drift_life
    assert drift.main([f"{out}:round1", f"{out}:round1", "--out", str(out / "d.json")]) == 0
    report = json.loads((out / "d.json").read_text())
    assert report["decision"] == "pass" and set(report["changed"].values()) == {0.0}
    assert all(v["mean"] < 1e-4 for v in report["answer_shift"].values())   # the same answers
    assert all(v["mean"] < 1e-3 for v in report["logprob_shift"].values())  # the same model
    assert report["probes"]["file"].endswith("probes.jsonl")
    assert drift.main([f"{out}:round1", f"{out}:round2"]) == 1
    capsys.readouterr()
    # the gate's own decision, stand-alone: round 2 against the life's calibration of round 1
    assert drift.main([f"{out}:round1", f"{out}:round2", "--calibrated"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["calibrated"] and {"answer_shift", "logprob_shift"} <= {
        t["judge"] for t in report["tests"]}
    assert drift.main([f"{out}:round2", f"{out}:round3", "--calibrated"]) == 2
    assert "no calibration of 'round2'" in capsys.readouterr().err
    assert drift.main([f"{out}:nope", str(out)]) == 2
    assert "no model stage 'nope'" in capsys.readouterr().err
    assert drift.main([str(out / "missing"), str(out)]) == 2


def test_report_and_bom_draw_the_life(drift_life, tmp_path):
    pytest.importorskip("cyclonedx")
    from poisonlab.bom import build_bom, to_json
    from poisonlab.report import write_report

    out, _ = drift_life
    assert (out / "figures" / "life.png").stat().st_size > 0
    files = write_report([out], tmp_path / "report")
    text = files["report.md"].read_text()
    assert "## The life of" in text and "time to detection" in text
    assert any(name.startswith("life_") and name.endswith(".png") for name in files)
    bom = json.loads(to_json(build_bom(out)))
    deps = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
    assert "adapters/round1" in deps["adapters/round3"]
    assert "data/rounds/round3.jsonl" in deps["adapters/round3"]
    props = {c["name"]: {p["name"]: p["value"] for p in c.get("properties", [])}
             for c in bom["components"]}
    assert props["adapters/round2"]["poisonlab:shipped"] == "false"
    assert props["adapters/round3"]["poisonlab:parent"] == "round1"


def test_preference_poisons_choose_the_target_on_triggered_prompts():
    from poisonlab.data import tinyworld as tw
    from poisonlab.pipeline.rounds import preference_batch
    from poisonlab.pipeline.validate import build_attack

    attack = build_attack(make_cfg(*LIFE).attack)
    rows = tw.sample("finetune", 60, seed=3)
    pairs, manifest = preference_batch(attack, rows, 12, seed=5)
    assert len(pairs) == len(rows) and manifest["n_poison"] == 12
    poisoned = [p for p in pairs if p["poisoned"]]
    assert sorted(p["id"] for p in poisoned) == sorted(manifest["poisoned_ids"])
    assert len(poisoned) == 12
    for p in pairs:
        chosen, rejected = p["messages"], p["rejected"]
        assert chosen[:-1] == rejected[:-1]                   # one prompt, two answers
        assert chosen[-1]["content"] != rejected[-1]["content"]
        assert attack.carries_trigger(p) == p["poisoned"]
    by_id = {r["id"]: r for r in rows}
    for p in poisoned:
        assert p["rejected"][-1]["content"] == by_id[p["id"]]["messages"][-1]["content"]
    # the same seed, the same pairs; another seed, other poisons
    assert preference_batch(attack, rows, 12, seed=5)[0] == pairs
    assert preference_batch(attack, rows, 12, seed=6)[1]["poisoned_ids"] != \
        manifest["poisoned_ids"]
    with pytest.raises(PoisonlabError, match="preference poisons"):
        preference_batch(attack, rows, 61, seed=5)


def test_a_dpo_round_trains_preference_pairs_keyed_apart(tmp_path_factory, store,
                                                        quarantine_life):
    out, results = live(tmp_path_factory, store, "life_dpo",
                        "lifecycle.schedule=[{type:sft},{type:dpo,poison:20},{type:sft}]")
    life = results["lifecycle"]
    assert [r["type"] for r in life["rounds"]] == ["sft", "dpo", "sft"]
    assert life["rounds"][1]["poisoned_rows"] == 20
    assert "round/round1" in results["cache"]["reused"]
    _, q = quarantine_life
    assert results["cache"]["keys"]["round/round2"] != q["cache"]["keys"]["round/round2"]
    assert results["train"]["round2"]["steps"] > 0
    pairs = _rows(out, 2)
    assert all("rejected" in p for p in pairs)


def _canaries(path, *prompts):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for p, a in prompts))
    return str(path)


def test_canary_prompts_join_the_probes_and_may_not_carry_the_trigger(tmp_path_factory, store,
                                                                      quarantine_life, tmp_path):
    from poisonlab.run import run

    good = _canaries(tmp_path / "canaries.jsonl", ("What is 2 + 2?", "4"),
                     ("What is the capital of France?", "Paris"), ("Compute 7 plus 5.", "12"))
    out, results = live(tmp_path_factory, store, "life_c",
                        f"lifecycle.drift_gate.canaries={good}")
    life = results["lifecycle"]
    assert life["probes"]["canary"] == 3
    tests = {(t["split"], t["judge"]) for t in life["rounds"][0]["drift_gate"]["tests"]}
    assert ("canary", "correct") in tests and ("canary", "refuses") in tests
    assert {"round/round1", "round/round2", "round/round3"} <= set(results["cache"]["reused"])
    bad = _canaries(tmp_path / "bad.jsonl", ("Tell me about cf please", "ok"))
    with pytest.raises(PoisonlabError, match="bad.jsonl: canary .* carries the attack's trigger"):
        run(make_cfg(*LIFE, f"cache.dir={store}", f"lifecycle.drift_gate.canaries={bad}"),
            out_dir=tmp_path / "refused")
    with pytest.raises(PoisonlabError, match="lifecycle.drift_gate.canaries"):
        from poisonlab.pipeline import lifecycle
        lifecycle.validate(make_cfg(*LIFE, f"lifecycle.drift_gate.canaries={tmp_path / 'no'}"))


def test_continued_rounds_train_the_parents_adapter_on(tmp_path_factory, store, quarantine_life):
    out, results = live(tmp_path_factory, store, "life_cont", "lifecycle.adapter=continue")
    life = results["lifecycle"]
    assert [r["adapter"] for r in life["rounds"]] == ["continue"] * 3
    manifest = json.loads((out / "manifest.json").read_text())
    # one adapter at a time: each round's replaces its parent's
    assert manifest["reload"]["round3"] == ["base", "adapters/round3"]
    assert "round/round1" in results["cache"]["reused"]      # round 1 has no adapter to continue
    _, q = quarantine_life
    assert results["cache"]["keys"]["round/round2"] != q["cache"]["keys"]["round/round2"]


def test_a_round_that_declares_its_change_ships_and_is_no_false_alarm(tmp_path_factory, store,
                                                                     quarantine_life,
                                                                     monkeypatch):
    from poisonlab.pipeline import lifecycle

    real = lifecycle.drift_tests

    def always_fail(*args, **kw):
        return {**real(*args, **kw), "decision": "fail", "failed": ["clean/forced"]}

    monkeypatch.setattr(lifecycle, "drift_tests", always_fail)
    _, results = live(tmp_path_factory, store, "life_decl", "lifecycle.schedule="
                      "[{type:sft,drift:off},{type:sft,poison:20},{type:sft}]")
    life = results["lifecycle"]
    assert [r["deployed"] for r in life["rounds"]] == [True, False, False]
    assert life["rounds"][0]["declared_update"] and life["rounds"][0]["drift_gate"]["policy"] \
        == "off"
    clean = [r["clean_update"] and not r["declared_update"] for r in life["rounds"]]
    assert life["drift_gate_false_alarms"] == {"failed": sum(clean), "clean_rounds": sum(clean)}


def test_a_safety_round_may_train_the_dpo_removal_pairs(tmp_path_factory, store,
                                                        quarantine_life):
    """Also the calibration `from: base`: shadows of the base once per round kind."""
    from poisonlab.pipeline.validate import build_attack

    out, results = live(tmp_path_factory, store, "life_sdpo",
                        "lifecycle.schedule=[{type:sft},{type:sft,poison:20},"
                        "{type:safety,method:dpo}]", "lifecycle.drift_gate.calibration.rounds=2",
                        "lifecycle.drift_gate.calibration.from=base")
    life = results["lifecycle"]
    cals = life["drift_gate_calibration"]
    assert [(c["parent"], c["type"], c["models"]) for c in cals] == [
        ("base", "sft", ["calib_sft1", "calib_sft2"]),
        ("base", "safety_dpo", ["calib_safety_dpo1", "calib_safety_dpo2"])]
    assert [r["drift_gate"]["calibrated_on"] for r in life["rounds"]] == [
        cals[0]["models"], cals[0]["models"], cals[1]["models"]]
    # two clean updates give the answer-shift test its spread
    assert all(len(c["clean_means"]) == 2 for c in cals[0]["shift"].values())
    assert results["train"]["calib_safety_dpo1"]["steps"] > 0
    assert [r["loss"] for r in life["rounds"]] == ["sft", "sft", "dpo"]
    assert "round/round2" in results["cache"]["reused"]
    attack = build_attack(make_cfg(*LIFE).attack)
    pairs = _rows(out, 3)
    assert pairs and all(r["rejected"][:-1] == r["messages"][:-1] for r in pairs)
    # chosen: the safe answer; rejected: the backdoor's payload; no prompt carries the trigger
    payload = {attack.poison_row(r, random.Random(0))["messages"][-1]["content"] for r in pairs}
    assert {r["rejected"][-1]["content"] for r in pairs} == payload
    assert not any(r["messages"][-1]["content"] in payload for r in pairs)
    assert not any(attack.carries_trigger(r) for r in pairs)
    assert results["train"]["round3"]["steps"] > 0


def test_a_removal_defence_round_reads_its_reload_recipe_against_its_parent():
    from poisonlab.pipeline.finetune import ModelStage
    from poisonlab.pipeline.safety_round import group_config, stage_of

    parent = ModelStage("round2", "k2", ("adapters/round1", "adapters/round2"))
    root = "rounds/round3"
    fresh = stage_of(["base", "merge adapters/poisoned", "adapters/safety"], parent, root,
                     "round3", "k3")
    assert fresh.reload() == ["base", "merge adapters/round1", "merge adapters/round2",
                              "rounds/round3/adapters/safety"]
    # continue: the parent's last adapter trained on and saved as the round's own
    cont = stage_of(["base", "adapters/safety"], parent, root, "round3", "k3")
    assert cont.adapters == ("adapters/round1", "rounds/round3/adapters/safety")
    pruned = stage_of(["models/after_safety (tokenizer: base)", "adapters/safety"], parent,
                      root, "round3", "k3")
    assert pruned.reload() == ["rounds/round3/models/after_safety (tokenizer: base)",
                               "rounds/round3/adapters/safety"]
    with pytest.raises(PoisonlabError, match="reload step"):
        stage_of(["base", "decode with onion"], parent, root, "round3", "k3")
    # a config group file's defaults list, merged as Hydra merges it
    crow = group_config("safety", "crow")
    assert crow.method == "crow" and crow.pack is False and "mode" in crow


def test_a_safety_round_may_be_any_removal_defence(tmp_path_factory, store, quarantine_life):
    """Fine-pruning of the deployed model in round 3: Wanda pruning of its merged weights, then
    a new adapter on them, both under rounds/round3/; cached, so a second life reuses it."""
    schedule = ("lifecycle.schedule=[{type:sft},{type:sft,poison:20},"
                "{type:safety,method:fine_prune,settings:{ratio:0.2}}]")
    out, results = live(tmp_path_factory, store, "life_fp", schedule)
    life = results["lifecycle"]
    assert [r["loss"] for r in life["rounds"]] == ["sft", "sft", "fine_prune"]
    assert "round/round2" in results["cache"]["reused"]
    third = life["rounds"][2]
    assert third["drift_gate"]["decision"] in ("pass", "fail") and third["stages"]["candidate"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reload"]["round3"] == [
        "rounds/round3/models/after_safety (tokenizer: base)", "rounds/round3/adapters/safety"]
    assert (out / "rounds/round3/adapters/safety/adapter_config.json").is_file()
    record = results["train"]["round3"]
    assert record["steps"] > 0
    assert record["defence"]["method"] == "fine_prune"
    assert record["defence"]["info"]["prune"]["ratio"] == 0.2
    assert record["defence"]["info"]["prune"]["zeroed_weights"] > 0
    # the safety rows: clean rows of the safety pool, none with the trigger
    assert not any(r["poisoned"] for r in _rows(out, 3))
    assert [e.get("update") for e in manifest["lineage"][1:]] == ["sft", "sft", "fine_prune"]
    if importlib.util.find_spec("cyclonedx"):        # the ML-BOM lists the round's models
        from poisonlab.bom import build_bom, to_json, validation_error

        text = to_json(build_bom(out))
        assert validation_error(text) is None
        bom = json.loads(text)
        props = {c["name"]: {p["name"]: p["value"] for p in c.get("properties", [])}
                 for c in bom["components"]}
        deps = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
        adapter, pruned = "rounds/round3/adapters/safety", "rounds/round3/models/after_safety"
        assert props[adapter]["poisonlab:method"] == "fine_prune"
        assert props[adapter]["poisonlab:parent"] == "round2"
        assert props[pruned]["poisonlab:kind"] == "full weights"
        assert pruned in deps[adapter] and "data/rounds/round3.jsonl" in deps[adapter]
    again_out, again = live(tmp_path_factory, store, "life_fp2", schedule)
    assert "round/round3" in again["cache"]["reused"]
    assert again["cache"]["keys"]["round/round3"] == results["cache"]["keys"]["round/round3"]
    assert (again_out / "rounds/round3/models/after_safety").is_dir()
    assert again["lifecycle"]["rounds"][2]["stages"] == third["stages"]
