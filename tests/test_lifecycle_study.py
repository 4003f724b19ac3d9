"""scripts/lifecycle_study.py: which lives a study runs, with which overrides, and its table.

The lives themselves are tested in tests/test_lifecycle.py; here `life` is replaced by a
recorder that returns a life record of the shape `run` writes, so the arms' plumbing and the
gates table are checked without training.
"""

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lifecycle_study.py"


def _round(k: int, poisoned: int, decision: str) -> dict:
    stages = {"asr": {"value": 0.5 if poisoned else 0.0}, "ftr_clean": {"value": 0.25},
              "clean_utility": {"value": 0.75}}
    return {"round": k, "type": "sft", "poisoned_rows": poisoned, "seconds": 1.0,
            "data_gate": {"recall": 1.0 if poisoned else None, "flagged": []},
            "drift_gate": {"decision": decision,
                           "failed": ["refusal/refuses"] if decision == "fail" else []},
            "stages": {"candidate": stages, "deployed": stages}}


@pytest.fixture
def study():
    ns = runpy.run_path(str(SCRIPT))
    calls = []

    def life(out, name, seed, model, *overrides):
        calls.append((name, seed, [*model, *overrides]))
        poisoned = 0 if name.startswith("gates_clean") else 20
        return {"rounds": [_round(1, 0, "pass"), _round(2, poisoned, "fail")],
                "shipped_asr_max": 0.0,
                "drift_gate_false_alarms": {"failed": 0, "clean_rounds": 2}}

    # run_path returns a copy of the script's globals: patch the dict its functions read
    ns["main"].__globals__["life"] = life
    return ns, calls


def test_families_and_set_reach_every_life(study, tmp_path, capsys):
    ns, calls = study
    schedule = "lifecycle.schedule=[{type:sft},{type:sft,poison:20}]"
    assert ns["main"](["--studies", "gates", "--model", "smollm2", "--seeds", "0,1",
                       "--families", "dos", "--set", schedule, "--out", str(tmp_path)]) == 0
    names = {name for name, _, _ in calls}
    assert {n.split("_")[1] for n in names} == {"dos", "clean"}      # no other family
    assert len(calls) == 2 * 4 * 2                                     # families x arms x seeds
    for name, seed, args in calls:
        # --model's overrides, then --set's, then the arm's own (which win over --set)
        assert args[:len(ns["MODELS"]["smollm2"])] == ns["MODELS"]["smollm2"]
        assert args.index(schedule) < args.index("experiment=lifecycle_gates")
    out = capsys.readouterr().out
    assert f"### gates (smollm2, {schedule}, seeds 0,1;" in out
    dos = next(line for line in out.splitlines() if line.startswith("| dos |"))
    assert "| 2/2 / 2/2 / 2/2 |" in dos and "refusal/refuses" in dos


def test_unknown_family_is_refused(study, tmp_path):
    ns, calls = study
    with pytest.raises(SystemExit) as err:
        ns["main"](["--studies", "gates", "--families", "badnets,trojan", "--out", str(tmp_path)])
    assert err.value.code == 2 and not calls


def test_preference_reports_ftr_and_utility_after_dpo(study, tmp_path, capsys):
    ns, calls = study
    assert ns["main"](["--studies", "preference", "--seeds", "0", "--out", str(tmp_path)]) == 0
    assert [name for name, _, _ in calls] == [f"preference{i}" for i in range(4)]
    lines = capsys.readouterr().out.splitlines()
    assert "| poison | ASR after SFT (round 1) | ASR after DPO (round 2) | FTR clean after DPO | " \
        "clean utility after DPO |" in lines
    assert "| none | 0.00 (0.00) | 0.50 (0.50) | 0.25 (0.25) | 0.75 (0.75) |" in lines
