"""scripts/study_table.py: any results.json figure of a sweep, by cell, over seeds."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(d: Path, overrides: list[str], results: dict) -> None:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "results.json").write_text(json.dumps(results))
    (d / "manifest.json").write_text(json.dumps({"poison": {"n_poison": 7}}))


def test_cells_group_seeds_and_take_rate_values(tmp_path):
    for seed, hits in enumerate((10, 12, 14)):
        _run(tmp_path / f"a{seed}", ["attack.near_negatives=5", f"seed={seed}"],
             {"removal": {"eliciting_before": hits}, "stages": {"poisoned": {
                 "asr": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}}}})
    _run(tmp_path / "b0", ["attack.near_negatives=0", "seed=0"],
         {"removal": {"eliciting_before": 3}, "stages": {}})
    out = subprocess.run([sys.executable, "scripts/study_table.py", str(tmp_path),
                          "removal.eliciting_before", "stages.poisoned.asr",
                          "manifest:poison.n_poison"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    lines = out.splitlines()
    assert lines[0] == ("| cell | seeds | removal.eliciting_before | stages.poisoned.asr | "
                        "manifest:poison.n_poison |")
    # mean 12, s = 2, t(0.975, 2) = 4.303: 12 ± 4.97
    assert "| attack.near_negatives=5 | 3 | 12 [7.03, 17] | 0.9 [0.9, 0.9] | 7 [7, 7] |" in lines
    assert "| attack.near_negatives=0 | 1 | 3 | - | 7 |" in lines


def test_no_runs_is_an_error(tmp_path):
    res = subprocess.run([sys.executable, "scripts/study_table.py", str(tmp_path), "x"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and "no results.json" in res.stderr
