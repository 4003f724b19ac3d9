"""`poisonlab report`: collecting runs and sweeps, seed aggregation, markdown, plots, the
command line, and the analysis notebook executed on a real micro sweep."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from poisonlab import PoisonlabError
from poisonlab.report import (ID_COLUMNS, aggregate, find_runs, format_markdown, load_runs, main,
                              plot_report, roc_curve, seed_interval, t_quantile, tidy,
                              write_report)
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]
T_975_DF2 = 4.302652729911275  # Student-t 0.975 quantile, 2 degrees of freedom (tables)


def wilson_3_seeds(xs) -> tuple[float, float]:
    """The Wilson score interval of the mean of 3 seeds' rates, with the effective sample size
    m(1 - m)/se^2 and the Student-t quantile (2 degrees of freedom) in place of z."""
    m = sum(xs) / 3
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / 2 / 3)
    n, q = m * (1 - m) / se ** 2, T_975_DF2
    centre = (m + q * q / (2 * n)) / (1 + q * q / n)
    half = q / (1 + q * q / n) * math.sqrt(m * (1 - m) / n + q * q / (4 * n * n))
    return centre - half, centre + half


def rate(value: float, n: int = 100) -> dict:
    return {"value": value, "ci_low": round(max(0.0, value - 0.1), 10),
            "ci_high": round(min(1.0, value + 0.1), 10),
            "n": n}


def make_run(d: Path, *, seed: int = 0, n_poison: int = 10, n_clean: int = 590, asr: float = 0.9,
             utility: float = 0.55, safety: str = "sft", status: str = "finished",
             persistence: float = 0.5, der: float = 0.7, fidelity: float | None = None,
             published: dict | None = None, detection: dict | None = None,
             curves: dict | None = None, overrides: list[str] | None = None) -> Path:
    """A run directory as `poisonlab.run` leaves it, with only the files the report reads."""
    d.mkdir(parents=True, exist_ok=True)
    stages = {"base": {"asr": rate(0.0), "ftr_clean": rate(0.0), "clean_utility": rate(0.5)},
              "poisoned": {"asr": rate(asr), "ftr_clean": rate(0.05), "ftr_near": rate(0.2),
                           "clean_utility": rate(utility)}}
    results: dict = {"name": "badnets", "stages": stages}
    if safety != "none":
        stages["after_safety"] = {"asr": rate(asr / 2), "clean_utility": rate(utility)}
        results["persistence"] = (  # undefined when the poisoned ASR is 0 (NaN, no interval)
            {"value": persistence, "ci_low": None, "ci_high": None, "n": 100}
            if math.isnan(persistence) else
            {"value": persistence, "ci_low": round(persistence - 0.1, 10),
             "ci_high": round(persistence + 0.1, 10), "n": 100})
        results["removal"] = {"method": "sft:fresh", "der": der, "fidelity": fidelity,
                              "seconds": 1.5}
    for name, rows in (detection or {}).items():
        (d / "detection").mkdir(exist_ok=True)
        (d / "detection" / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
        results.setdefault("detection", {})[name] = {
            "auroc": rate(0.8, len(rows)), "ap": rate(0.6, len(rows)),
            "recall_at_n_poison": rate(0.5, len(rows)), "level": "data"}
    if curves:
        results["curves"] = curves
    config = {"name": "badnets", "seed": seed, "output_dir": str(d),
              "model": {"name_or_path": "tiny:micro"}, "data": {"n_train": n_clean + n_poison},
              "attack": {"name": "badnets", "triggers": ["BadMagic"], "placement": "uniform",
                         "n_poison": n_poison},
              "safety": {"method": safety}, "detect": {k: {} for k in detection or {}},
              "published": published or {}}
    manifest = {"seed": seed, "config": config,
                "poison": {"family": "badnets", "n_poison": n_poison, "n_clean": n_clean}}
    (d / "results.json").write_text(json.dumps(results))
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / ".poisonlab-run.json").write_text(json.dumps({"status": status, "identity": "x"}))
    if overrides is not None:
        (d / ".hydra").mkdir(exist_ok=True)
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return d


def make_sweep(root: Path, task: list[str], params: dict | None = None) -> Path:
    """A sweep directory's multirun.yaml: command-line overrides and the sweeper's params."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:" + ("".join(f"\n      {k}: {v}" for k, v in params.items())
                                            if params else " null")
        + "\n  overrides:\n    task:\n" + "".join(f"    - {o}\n" for o in task))
    return root


# ----------------------------------------------------------------------------- collection

def test_find_runs_skips_unfinished_and_counts_them(tmp_path, caplog):
    sweep = tmp_path / "multirun" / "badnets" / "2026-01-01_00-00-00"
    done = [make_run(sweep / "0"), make_run(sweep / "1", seed=1),
            make_run(tmp_path / "outputs" / "badnets" / "single")]
    make_run(sweep / "2", status="running")
    (make_run(sweep / "3") / "results.json").unlink()  # marker says finished, no results
    (tmp_path / "notes").mkdir()
    with caplog.at_level("INFO", logger="poisonlab.report"):
        runs = find_runs([tmp_path, sweep])  # overlapping paths: each run once
    assert runs == sorted(done)
    assert "skipped 2 unfinished run directories" in caplog.text
    assert find_runs(done[2]) == [done[2]]  # a run directory itself
    with pytest.raises(PoisonlabError, match="no such directory"):
        find_runs([tmp_path / "missing"])


def test_load_runs_identifies_cells_and_reads_metrics(tmp_path):
    sweep = make_sweep(tmp_path / "sw", ["debug=default", "attack.n_poison=10,40", "safety=sft"],
                       params={"seed": "0,1"})
    items = [{"id": f"r{i}", "score": s, "poisoned": p, "flagged": s > 0.5}
             for i, (s, p) in enumerate([(0.9, True), (0.2, False), (0.7, False)])]
    make_run(sweep / "1", seed=1, n_poison=10, n_clean=590, asr=0.875,
             overrides=["debug=default", "attack.n_poison=10", "seed=1", "safety=sft"],
             detection={"loss": items})
    make_run(tmp_path / "single", seed=3, n_poison=40, n_clean=560, safety="none")
    df = load_runs([tmp_path])
    assert list(df.columns[:len(ID_COLUMNS)]) == ID_COLUMNS and len(df) == 2
    cell = df[df.seed == 1].iloc[0]
    assert Path(cell.sweep_dir) == sweep
    assert (cell.family, cell.model, cell.n_poison, cell.n_train) == ("badnets", "tiny:micro", 10,
                                                                      590)
    assert (cell.trigger, cell.placement, cell.safety, cell.detectors) == (
        "BadMagic", "uniform", "sft", "loss")
    assert cell.overrides == "attack.n_poison=10 seed=1"  # only the swept ones
    assert (cell.asr_poisoned, cell.asr_poisoned_lo, cell.asr_poisoned_hi) == (0.875, 0.775, 0.975)
    assert cell.asr_after_safety == 0.4375 and cell.ftr_near_poisoned == 0.2
    assert (cell.persistence, cell.persistence_lo, cell.der, cell.defense_seconds) == (
        0.5, 0.4, 0.7, 1.5)
    assert math.isnan(cell.fidelity)  # undefined, not 0
    assert (cell.auroc_loss, cell.ap_loss, cell.recall_at_n_poison_loss) == (0.8, 0.6, 0.5)
    single = df[df.seed == 3].iloc[0]
    assert pd.isna(single.sweep_dir) and pd.isna(single.overrides) and pd.isna(single.detectors)
    assert math.isnan(single.asr_after_safety) and math.isnan(single.persistence)


def test_published_figures_beside_ours(tmp_path):
    published = {"asr_poisoned": {"value": 0.95, "source": "Author et al. 2024, Table 2"},
                 "persistence": 0.8}
    make_run(tmp_path / "a", published=published)
    df = load_runs(tmp_path)
    assert df.published_asr_poisoned[0] == 0.95
    assert df.published_asr_poisoned_source[0] == "Author et al. 2024, Table 2"
    assert df.published_persistence[0] == 0.8 and df.published_persistence_source[0] is None
    row = tidy(df).query("stage == 'poisoned' and metric == 'asr'").iloc[0]
    assert (row.value, row.published, row.published_source) == (
        0.9, 0.95, "Author et al. 2024, Table 2")
    md = format_markdown(aggregate(df))
    assert "| metric | ours | published | verdict |" in md
    assert "| asr_poisoned | 0.900 | 0.950 (Author et al. 2024, Table 2) | ours lower (1 seed) |" in md
    assert "| persistence | 0.500 | 0.800 | ours lower (1 seed) |" in md

    # a direction in words, where the paper has no number for this setting
    words = {"asr_poisoned": {"value": "high at 250 poisons", "source": "Someone 2025"}}
    make_run(tmp_path / "w", published=words, n_poison=250)
    md = format_markdown(aggregate(load_runs(tmp_path / "w")))
    assert "high at 250 poisons (Someone 2025)" in md
    # the same published figure for every cell: said once, below the table
    make_run(tmp_path / "w2", published=words, n_poison=100)
    md = format_markdown(aggregate(load_runs([tmp_path / "w", tmp_path / "w2"])))
    assert "(published) |" not in md and md.count("high at 250 poisons") == 1

    # the paper's claim as a bound on our figure: a verdict from our interval over seeds
    claim = {"asr_poisoned": {"value": "high", "expect": ">= 0.8", "source": "S"}}
    for seed, asr in enumerate((0.9, 0.91, 0.92)):
        make_run(tmp_path / "e" / str(seed), seed=seed, published=claim, asr=asr)
    md = format_markdown(aggregate(load_runs(tmp_path / "e")))
    assert "| asr_poisoned | 0.910 [" in md and "| high (S) | reproduced |" in md
    for seed, asr in enumerate((0.5, 0.52, 0.51)):
        make_run(tmp_path / "f" / str(seed), seed=seed, published=claim, asr=asr)
    assert "not reproduced" in format_markdown(aggregate(load_runs(tmp_path / "f")))
    for seed, asr in enumerate((0.5, 0.99, 0.95)):
        make_run(tmp_path / "g" / str(seed), seed=seed, published=claim, asr=asr)
    assert "inconclusive" in format_markdown(aggregate(load_runs(tmp_path / "g")))
    make_run(tmp_path / "h", published={"asr_poisoned": {"value": 1, "expect": "about 1"}})
    with pytest.raises(PoisonlabError, match=r"h/manifest.json: config.published.asr_poisoned"
                                             r".expect: expected a bound"):
        load_runs(tmp_path / "h")

    make_run(tmp_path / "b", seed=1, published={"asr_poisoned": {"source": "no value"}})
    with pytest.raises(PoisonlabError, match=r"b/manifest.json: config.published.asr_poisoned"):
        load_runs(tmp_path)


# ----------------------------------------------------------------------------- seeds

@pytest.mark.parametrize("df,expected", [(1, 12.7062047362), (2, 4.3026527299),
                                         (4, 2.7764451052), (10, 2.2281388520),
                                         (29, 2.0452296421)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(df) == pytest.approx(expected, abs=1e-8)


def test_aggregate_over_seeds_with_an_interval_over_seeds(tmp_path):
    for seed, asr in enumerate([0.8, 0.9, 0.95]):
        make_run(tmp_path / f"p10_s{seed}", seed=seed, n_poison=10, asr=asr)
    for seed, asr in ((1, 0.7), (0, 0.6)):
        make_run(tmp_path / f"p40_s{seed}", seed=seed, n_poison=40, n_clean=560, asr=asr)
    agg = aggregate(load_runs(tmp_path)).set_index("n_poison")
    assert len(agg) == 2  # cells differ in n_poison; seeds (and output dirs) are merged
    three, two = agg.loc[10], agg.loc[40]
    assert (three.n_seeds, three.seeds, three.asr_poisoned_values) == (3, [0, 1, 2],
                                                                       [0.8, 0.9, 0.95])
    mean = (0.8 + 0.9 + 0.95) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in (0.8, 0.9, 0.95)) / 2)
    half = T_975_DF2 * sd / math.sqrt(3)
    lo, hi = wilson_3_seeds([0.8, 0.9, 0.95])
    assert three.asr_poisoned_mean == pytest.approx(mean)
    # a rate: Wilson over seeds, inside [0, 1] where Student-t would pass 1
    assert mean + half > 1 and 0 < lo < mean < hi < 1
    assert (three.asr_poisoned_t_lo, three.asr_poisoned_t_hi) == (pytest.approx(lo),
                                                                  pytest.approx(hi))
    assert math.isnan(three.fidelity_mean)  # undefined in every seed
    assert (two.n_seeds, two.seeds, two.asr_poisoned_values) == (2, [0, 1], [0.6, 0.7])
    assert two.asr_poisoned_mean == pytest.approx(0.65)
    assert math.isnan(two.asr_poisoned_t_lo) and math.isnan(two.asr_poisoned_t_hi)
    md = format_markdown(agg.reset_index())
    assert f"{mean:.3f} [{lo:.3f}, {hi:.3f}]" in md
    assert "0.600, 0.700 (mean 0.650)" in md
    assert "fewer than 3 seeds no interval" in md and "1 of 2 cells here" in md

    by_family = aggregate(load_runs(tmp_path), by="family")
    assert len(by_family) == 1 and by_family.n_seeds[0] == 5


def test_runs_of_the_same_config_and_seed_count_as_one_seed(tmp_path, caplog):
    # three runs of seed 0 (reruns: the first by run directory is kept), and seeds 1 and 2
    for d, asr in (("s0_a", 0.6), ("s0_b", 0.2), ("s0_c", 0.6)):
        make_run(tmp_path / d, seed=0, asr=asr)
    make_run(tmp_path / "s1", seed=1, asr=0.5)
    make_run(tmp_path / "s2", seed=2, asr=0.4)
    with caplog.at_level("WARNING", logger="poisonlab.report"):
        agg = aggregate(load_runs(tmp_path))
    (row,) = agg.itertuples()
    assert (row.n_seeds, row.seeds, row.asr_poisoned_values) == (3, [0, 1, 2], [0.6, 0.5, 0.4])
    assert row.run_dirs == [str(tmp_path / d) for d in ("s0_a", "s1", "s2")]
    assert row.duplicate_runs == [str(tmp_path / "s0_b"), str(tmp_path / "s0_c")]
    lo, hi = wilson_3_seeds([0.6, 0.5, 0.4])
    assert (lo, hi) == (pytest.approx(0.2775, abs=1e-4), pytest.approx(0.7225, abs=1e-4))
    assert (row.asr_poisoned_t_lo, row.asr_poisoned_t_hi) == (pytest.approx(lo),
                                                              pytest.approx(hi))
    assert "2 duplicate runs (same config and seed) left out" in caplog.text
    md = format_markdown(agg)
    assert "| 0, 1, 2 |" in md and "5 runs in 1 cells" in md
    assert "2 of them duplicates of a run with the same config and seed" in md

    # identical reruns of one seed: one seed, no interval (not a zero-width one)
    for d in ("a", "b", "c"):
        make_run(tmp_path / "rerun" / d, seed=4, asr=0.6)
    (row,) = aggregate(load_runs(tmp_path / "rerun")).itertuples()
    assert (row.n_seeds, row.seeds, row.asr_poisoned_values) == (1, [4], [0.6])
    assert math.isnan(row.asr_poisoned_t_lo) and math.isnan(row.asr_poisoned_t_hi)
    assert "| 4 | 0.000 | 0.600 |" in format_markdown(aggregate(load_runs(tmp_path / "rerun")))

    # different configs with the same seed, pooled with `by`, are not duplicates
    make_run(tmp_path / "p40" / "s0", seed=0, n_poison=40, n_clean=560, asr=0.6)
    pooled = aggregate(load_runs([tmp_path / "s0_a", tmp_path / "p40"]), by="family")
    assert pooled.n_seeds[0] == 2 and pooled.duplicate_runs[0] == []


def test_undefined_values_are_reported_and_not_counted(tmp_path):
    # persistence is undefined (NaN) in seed 2: the poisoned ASR was 0
    for seed, p in enumerate([0.5, 0.6, math.nan, 0.7]):
        make_run(tmp_path / f"p10_s{seed}", seed=seed, persistence=p)
    for seed, p in enumerate([0.5, math.nan, 0.7]):
        make_run(tmp_path / f"p40_s{seed}", seed=seed, n_poison=40, n_clean=560, persistence=p)
    agg = aggregate(load_runs(tmp_path)).set_index("n_poison")
    four, three = agg.loc[10], agg.loc[40]
    assert four.n_seeds == 4 and (four.persistence_n, four.persistence_n_nan) == (3, 1)
    assert four.persistence_values[:2] == [0.5, 0.6] and math.isnan(four.persistence_values[2])
    half = T_975_DF2 * 0.1 / math.sqrt(3)  # over the 3 seeds with a value
    assert four.persistence_mean == pytest.approx(0.6)
    assert four.persistence_t_hi == pytest.approx(0.6 + half)
    assert (four.asr_poisoned_n, four.asr_poisoned_n_nan) == (4, 0)
    assert three.n_seeds == 3 and (three.persistence_n, three.persistence_n_nan) == (2, 1)
    assert math.isnan(three.persistence_t_lo)  # 2 seeds with a value: no interval
    md = format_markdown(agg.reset_index())
    assert f"0.600 [{0.6 - half:.3f}, {0.6 + half:.3f}] (n=3; NaN: seed 2)" in md
    assert "0.500, NaN, 0.700 (mean of 2: 0.600)" in md  # in the order of `seeds`
    assert "NaN: the metric is undefined in that seed" in md


def test_intervals_of_rates_stay_in_0_1_and_other_intervals_are_student_t(tmp_path):
    asr, der, persistence = [0.4, 1.0, 0.85], [0.2, 1.0, 0.9], [0.1, 1.2, 0.5]
    for seed in range(3):
        make_run(tmp_path / f"s{seed}", seed=seed, asr=asr[seed], der=der[seed],
                 persistence=persistence[seed], fidelity=[-0.5, 0.9, 0.2][seed])
    (row,) = aggregate(load_runs(tmp_path)).itertuples()

    def raw(xs):
        mean = sum(xs) / 3
        half = T_975_DF2 * math.sqrt(sum((x - mean) ** 2 for x in xs) / 2) / math.sqrt(3)
        return mean - half, mean + half

    assert raw(asr)[0] < 0 and raw(asr)[1] > 1
    lo, hi = wilson_3_seeds(asr)
    assert 0 < lo < 0.75 < hi < 1
    assert (row.asr_poisoned_mean, row.asr_poisoned_t_lo, row.asr_poisoned_t_hi) == (
        pytest.approx(0.75), pytest.approx(lo), pytest.approx(hi))
    assert (row.der_t_lo, row.der_t_hi) == tuple(map(pytest.approx, wilson_3_seeds(der)))
    assert 0 <= row.der_t_lo < row.der_t_hi <= 1  # a rating on [0, 1]
    # persistence (a ratio, above 1 when safety training strengthens the backdoor) and
    # fidelity (negative when the ASR rose) keep their Student-t bounds
    assert (row.persistence_t_lo, row.persistence_t_hi) == tuple(map(pytest.approx,
                                                                     raw(persistence)))
    assert row.persistence_t_lo < 0 and row.persistence_t_hi > 1
    assert (row.fidelity_t_lo, row.fidelity_t_hi) == tuple(map(pytest.approx,
                                                               raw([-0.5, 0.9, 0.2])))
    assert f"0.750 [{lo:.3f}, {hi:.3f}]" in format_markdown(aggregate(load_runs(tmp_path)))
    assert seed_interval([0.4, 1.0, 0.85], bounds=(0.0, 1.0))[1:] == (0.0, 1.0)  # clipped t
    assert seed_interval([0.4, 1.0, 0.85], (0.0, 1.0), rate=True)[1:] == (pytest.approx(lo),
                                                                           pytest.approx(hi))
    assert seed_interval([0.4, 1.0, 0.85])[1] == pytest.approx(raw(asr)[0])
    assert seed_interval([1.0, 1.0, 1.0], (0.0, 1.0), rate=True) == (1.0, 1.0, 1.0)


def test_tidy_has_one_row_per_run_and_defined_metric(tmp_path):
    make_run(tmp_path / "a", detection={"loss": [{"id": "x", "score": 1.0, "poisoned": True}]})
    make_run(tmp_path / "b", seed=1, safety="none")
    df = load_runs(tmp_path)
    long = tidy(df)
    # a: base 3 + poisoned 4 + after_safety 2 + persistence, der, defense_seconds (fidelity
    # undefined) + detection 3 = 15; b: base 3 + poisoned 4 = 7
    assert long.groupby("run_dir").size().to_dict() == {str(tmp_path / "a"): 15,
                                                        str(tmp_path / "b"): 7}
    row = long.query("metric == 'auroc'").iloc[0]
    assert (row.stage, row.detector, row.value, row.ci_low) == ("detection", "loss", 0.8, 0.7)
    row = long.query("stage == 'after_safety' and metric == 'asr'").iloc[0]
    assert (row.value, row.ci_low, row.ci_high) == (0.45, 0.35, 0.55)


# ----------------------------------------------------------------------------- plots

def test_roc_curve_moves_ties_together():
    assert roc_curve([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == ([0.0, 0.0, 0.5, 1.0],
                                                             [0.0, 0.5, 1.0, 1.0])
    assert roc_curve([0.3, 0.2], [True, True]) is None  # one class only


def test_plots_only_where_the_runs_have_data(tmp_path):
    make_run(tmp_path / "flat" / "a", safety="none")
    # one poison count, no defence, no curve, no detector
    assert plot_report(load_runs(tmp_path / "flat"), tmp_path / "out1") == []

    rows = [{"id": f"r{i}", "score": i / 10, "poisoned": i > 6, "split": "train"}
            for i in range(10)]
    curve = {"after_safety": [{"step": s, "rows_seen": 32 * s, "asr": rate(1 - s / 10)}
                              for s in range(4)]}
    for n_poison, n_clean in ((10, 590), (40, 560), (40, 2000), (10, 2000)):
        make_run(tmp_path / "full" / f"p{n_poison}_c{n_clean}", n_poison=n_poison,
                 n_clean=n_clean, detection={"loss": rows}, curves=curve)
    out = tmp_path / "out2"
    written = plot_report(load_runs(tmp_path / "full"), out)
    assert sorted(p.name for p in written) == [
        "asr_vs_clean_size.png", "asr_vs_poison_count.png", "asr_vs_poison_rate.png",
        "persistence_after_safety.png", "roc.png", "utility_vs_asr.png"]
    assert sorted(written) == sorted(out.iterdir())
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


# ----------------------------------------------------------------------------- command line

def test_main_writes_the_report_next_to_the_runs(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sw", ["seed=0,1"])
    make_run(sweep / "0", overrides=["seed=0"])
    make_run(sweep / "1", seed=1, asr=0.8, overrides=["seed=1"])
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| attack | model | seeds | ASR base | ASR |" in out
    assert "0.900, 0.800 (mean 0.850)" in out
    assert str(sweep / "report" / "report.md") in out
    assert sorted(p.name for p in (sweep / "report").iterdir()) == [
        "aggregate.csv", "report.csv", "report.md", "runs.csv", "utility_vs_asr.png"]
    assert len(pd.read_csv(sweep / "report" / "runs.csv")) == 2
    assert main([str(sweep)]) == 0  # its own report directory is no run


def test_main_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"poisonlab: error: {tmp_path / 'missing'}: no such directory"
    make_run(tmp_path / "busy", status="running")
    assert main([str(tmp_path)]) == 2
    assert f"poisonlab: error: no finished poisonlab run under {tmp_path}" in (
        capsys.readouterr().err)
    with pytest.raises(PoisonlabError, match="no finished"):
        write_report([tmp_path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_python_m_poisonlab_report(tmp_path):
    p = subprocess.run([sys.executable, "-m", "poisonlab.report", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"poisonlab: error: {tmp_path / 'missing'}: no such directory"]


# ----------------------------------------------------------------------------- a real sweep

@pytest.fixture(scope="session")
def micro_sweep(tmp_path_factory, micro_path):
    """Two cells of a micro sweep (10 and 40 poisons), the second with the loss detector."""
    from poisonlab.run import run

    root = tmp_path_factory.mktemp("sweep")
    common = ("debug=default", "safety=none", "eval.n_prompts=16", "train.epochs=3",
              "attack.poison_rate=null")
    for n_poison, extra in ((10, ()), (40, ("detect=[loss]",))):
        run(make_cfg(*common, f"attack.n_poison={n_poison}", *extra),
            out_dir=root / f"n{n_poison}")
    return root


def test_cli_report_on_a_real_sweep(micro_sweep, tmp_path):
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "poisonlab.cli", "report", str(micro_sweep),
                        "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    runs = pd.read_csv(out / "runs.csv").set_index("n_poison")
    assert sorted(runs.index) == [10, 40]
    expected_rows = 0
    for n_poison in (10, 40):
        results = json.loads((micro_sweep / f"n{n_poison}" / "results.json").read_text())
        assert runs.loc[n_poison, "asr_poisoned"] == results["stages"]["poisoned"]["asr"]["value"]
        expected_rows += sum(isinstance(m.get(k), dict) for m in results["stages"].values()
                             for k in ("asr", "ftr_clean", "ftr_near", "clean_utility"))
        expected_rows += sum(isinstance(d.get(k), dict) for d in
                             results.get("detection", {}).values()
                             for k in ("auroc", "ap", "recall_at_n_poison"))
        # utility change: the poisoned model minus the reference, utility_drop negated
        change, drop = results["utility_change"], results["utility_drop"]
        assert change.keys() == drop.keys() and change
        for ref, d in change.items():
            assert d["value"] == pytest.approx(-drop[ref]["value"])
            assert (d["ci_low"], d["ci_high"]) == (pytest.approx(-drop[ref]["ci_high"]),
                                                   pytest.approx(-drop[ref]["ci_low"]))
        expected_rows += sum(d["value"] == d["value"] for d in change.values())
        # each run drew its own figure of its stages
        stages = micro_sweep / f"n{n_poison}" / "figures" / "stages.png"
        assert stages.read_bytes()[:4] == b"\x89PNG"
    assert runs.loc[40, "detectors"] == "loss" and "auroc_loss" in runs.columns
    assert len(pd.read_csv(out / "report.csv")) == expected_rows
    table = [line for line in (out / "report.md").read_text().splitlines()
             if line.startswith("|")]
    # poisoning: header, rule, one row per cell; detection: header, rule, the loss detector
    assert len(table) == 2 + 2 + 2 + 1
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["asr_vs_poison_count.png", "asr_vs_poison_rate.png", "roc.png"]
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in pngs)
    assert table[0] in p.stdout and str(out / "runs.csv") in p.stdout


def test_notebook_runs_on_the_sweep(micro_sweep, tmp_path, monkeypatch):
    import nbformat
    from ipykernel.kernelspec import install
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / "analysis.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)  # committed cleared
    # the `python3` kernel of this interpreter, whatever kernels the machine has installed
    install(prefix=str(tmp_path / "kernel"), kernel_name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "kernel" / "share" / "jupyter"))
    monkeypatch.setenv("POISONLAB_SWEEP_DIR", str(micro_sweep))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    NotebookClient(nb, kernel_name="python3", timeout=180,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any("2 finished runs" in o.get("text", "") for o in outputs)


def test_plot_series_are_split_by_what_varies_besides_the_x_axis():
    import pandas as pd

    from poisonlab.report.plots import _series_keys, _series_label

    d = pd.DataFrame({"family": ["dos"] * 4, "model": ["m"] * 4, "n_poison": [25, 25, 250, 250],
                      "n_train": [300] * 4, "placement": ["start", "end", "start", "end"],
                      "trigger": ["<SUDO>"] * 4})
    keys = _series_keys(d, ["family", "model", "n_train"], "n_poison")
    assert keys == ["family", "model", "placement"]     # not averaged over placements
    assert _series_label(keys, ("dos", "m", "end")) == "dos / m / placement end"
