"""Figures: a run's own (`plot_stages`: each evaluated stage's rates; `plot_curve`: its
persistence curve during safety training) and those of `poisonlab report` over many runs
(`report_figures`, saved by `plot_report` in each requested format: PNG, PDF, SVG).

Every figure is a matplotlib `Figure` drawn without pyplot (the Agg canvas, no global state),
with plain-text titles, labelled axes and its legend outside the data area. Rates are drawn on
[0, 1] with their 95% intervals clipped to it. Across seeds, a point is the mean over the
seeds and its bar the interval of `seeds.seed_interval` (3 or more seeds; with fewer, every
seed's value is drawn instead).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from poisonlab import PoisonlabError
from poisonlab.report.collect import ATTACK_COLUMNS, STAGE_ORDER, _read_json
from poisonlab.report.labels import (METRIC_LABELS, defense_label, detector_label,
                                     distinguishing, plain, stage_label)
from poisonlab.report.seeds import MIN_SEEDS, aggregate, seed_interval, sweep_order

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

FORMATS = ("png", "pdf", "svg")
CURVE_METRICS = [("asr", "ASR"), ("ftr_clean", "FTR clean"), ("clean_utility", "clean utility")]
STAGE_METRICS = [(m, METRIC_LABELS[m]) for m in ("asr", "ftr_clean", "ftr_near", "clean_utility")]
# Lines of a poisoned-stage plot are also split by these where they vary (a placement sweep
# must not be averaged into one line).
SERIES_EXTRA = ("placement", "trigger")
FIGURE_CAPTIONS = {
    "life": "A lifecycle run by round: ASR, FTR near and clean utility of the deployed model "
            "(solid) and of each round's candidate (dotted); shaded rounds received poisons; Q: "
            "rows quarantined by the data gate, B: a blocked round, x: the drift gate failed.",
    "asr_vs_poison_count": "ASR of the poisoned model against the number of poisoned "
                           "training rows (log scale), one line per attack and model.",
    "asr_vs_poison_rate": "The same against the poison rate, poisoned rows / all training "
                          "rows (log scale).",
    "asr_vs_clean_size": "ASR of the poisoned model against the number of clean training "
                         "rows at a fixed poison count (log scale).",
    "persistence": "ASR (on the curve's triggered prompts) while the defence trains, against "
                   "the clean rows it has seen; one panel per attack, one line per defence.",
    "roc": "ROC curves of every detector, one panel per attack (near-trigger prompts left "
           "out, as in the AUROC); AUROC in the legend. Several seeds: the curves averaged "
           "vertically, the AUROC the mean of the seeds'.",
    "utility_vs_asr": "Clean utility against ASR: the poisoned model (black ring) and, at "
                      "the head of each arrow, the model after a defence.",
    "r50_vs_persistence": "Left: R50, the clean rows a defence had seen when its persistence "
                          "curve's ASR fell below 0.5 (interpolated), mean over seeds with its "
                          "95% Student-t interval, each seed a small dot; an open triangle: "
                          "some seed never fell below 0.5 (right-censored), the mean exceeds "
                          "it; no R50 where the curve began below 0.5. Right: final "
                          "persistence (ASR after / before), mean and interval over seeds. "
                          "One row per cell, named by what the sweep varies.",
}
SEEDS_NOTE = (f"Points: the mean over seeds; error bars: its 95% interval over seeds "
              f"(with {MIN_SEEDS} or more seeds; with fewer, every seed's value is drawn as a "
              "small point).")
_RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
       "legend.title_fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
       "figure.titlesize": 9, "axes.spines.top": False, "axes.spines.right": False,
       "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "savefig.dpi": 200}
_MARKERS = "osD^vP<X>hp*"


@contextmanager
def _style():
    """Paper-sized fonts; TrueType fonts in PDF and text as text in SVG (editable)."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend change

    return Figure(figsize=(width, height), layout="constrained")


def parse_formats(text) -> tuple[str, ...]:
    """`png,pdf` (or a list) -> ('png', 'pdf'); PoisonlabError for a format not in FORMATS."""
    items = text.split(",") if isinstance(text, str) else list(text or ())
    formats = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise PoisonlabError(f"--format: expected a comma-separated list of {', '.join(FORMATS)}, "
                             f"got {text!r}")
    return formats


def save_figure(fig: Figure, stem: Path, formats=("png",)) -> list[Path]:
    """`fig` as `<stem>.<format>` for each format; returns the paths written."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with _style():
        for fmt in parse_formats(formats):
            path = stem.parent / f"{stem.name}.{fmt}"
            # no creation date in PDF and SVG: the same runs give the same files
            fig.savefig(path, bbox_inches="tight", pad_inches=0.03,
                        metadata={"pdf": {"CreationDate": None},
                                  "svg": {"Date": None}}.get(fmt))
            written.append(path)
    return written


def _legend_outside(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  frameon=False, **kw)


def _unit_axis(ax, axis: str = "y") -> None:
    (ax.set_ylim if axis == "y" else ax.set_xlim)(-0.02, 1.02)


def _clip01(v: float) -> float:
    return min(1.0, max(0.0, v))


def _palette(names) -> dict:
    """A colour and a marker per name, the same in every panel of a figure."""
    from matplotlib import colormaps

    names = list(dict.fromkeys(names))
    cmap = colormaps["tab10"]  # distinct hues; past ten, lines change style (_line_style)
    return {n: (cmap(i % cmap.N), _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(names)}


# ----------------------------------------------------------------------------- a single run

def _sizes(points: list[dict], keys) -> str:
    """'100 prompts per split', or each metric's n where they differ, from the points."""
    ns = {label: {p[k]["n"] for p in points if isinstance(p.get(k), dict) and "n" in p[k]}
          for k, label in keys}
    ns = {label: n for label, n in ns.items() if n}
    distinct = set().union(*ns.values()) if ns else set()
    if not distinct:
        return ""
    if len(distinct) == 1:
        return f"{distinct.pop()} prompts per split"
    return "; ".join(f"{label} n={'/'.join(map(str, sorted(n)))}" for label, n in ns.items())


def curve_figure(points: list[dict], title: str) -> Figure:
    """ASR, FTR clean and clean utility against optimizer steps, with their 95% intervals;
    the title's second line gives the prompts per point, read from the points themselves."""
    with _style():
        fig = _figure(5.6, 3.0)
        ax = fig.subplots()
        steps = [p["step"] for p in points]
        for key, label in CURVE_METRICS:
            if all(isinstance(p.get(key), dict) for p in points):
                line = ax.plot(steps, [p[key]["value"] for p in points], marker="o", ms=3,
                               label=label)[0]
                ax.fill_between(steps, [_clip01(p[key]["ci_low"]) for p in points],
                                [_clip01(p[key]["ci_high"]) for p in points], alpha=0.15,
                                color=line.get_color(), lw=0)
        sizes = _sizes(points, CURVE_METRICS)
        ax.set_title(title + (f"\n{sizes}; bands: 95% Wilson intervals" if sizes else ""))
        ax.set_xlabel("optimizer step of the defence")
        ax.set_ylabel("rate")
        _unit_axis(ax)
        ax.grid(alpha=0.3)
        _legend_outside(ax)
    return fig


def plot_curve(points: list[dict], path, title: str) -> None:
    """`curve_figure` saved as a PNG at `path`."""
    path = Path(path)
    save_figure(curve_figure(points, title), path.with_suffix(""), (path.suffix[1:] or "png",))


STAGE_COLOURS = {"base": "C0", "clean_ft": "C7", "poisoned": "C3", "filtered": "C1",
                 "after_safety": "C2"}


def stages_figure(results: dict, title: str | None = None) -> Figure:
    """A run's rates by stage: bars of ASR, FTR clean, FTR near and clean utility for each
    evaluated stage (pipeline order), with their 95% intervals."""
    import numpy as np

    stages = results.get("stages") or {}
    order = [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]
    metrics = [(k, label) for k, label in STAGE_METRICS
               if any(isinstance(stages[s].get(k), dict) for s in order)]
    with _style():
        fig = _figure(6.0, 2.8)
        ax = fig.subplots()
        width = 0.8 / max(1, len(order))
        for i, stage in enumerate(order):
            xs, ys, lo, hi = [], [], [], []
            for j, (k, _) in enumerate(metrics):
                m = stages[stage].get(k)
                if not isinstance(m, dict) or m.get("value") is None:
                    continue
                low, high = (m["value"] if m.get(bound) is None else m[bound]
                             for bound in ("ci_low", "ci_high"))
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(m["value"])
                lo.append(max(0.0, m["value"] - _clip01(low)))
                hi.append(max(0.0, _clip01(high) - m["value"]))
            # one colour per stage whatever stages a run has: the poisoned model always red
            colour = STAGE_COLOURS.get(stage, f"C{(4 + i) % 10}")
            ax.bar(xs, ys, width * 0.92, yerr=np.array([lo, hi]), capsize=2,
                   error_kw={"lw": 0.8}, label=stage_label(stage), color=colour)
        ns = [{stages[s][k]["n"] for s in order if isinstance(stages[s].get(k), dict)
               and "n" in stages[s][k]} for k, _ in metrics]
        ax.set_xticks(range(len(metrics)),
                      [label + (f"\n(n={n.pop()})" if len(n) == 1 else "")
                       for (_, label), n in zip(metrics, ns)])
        ax.set_ylabel("rate")
        ax.set_xlabel("metric (n: prompts per stage)")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(title or f"{results.get('name', 'run')}: rates by stage "
                     "(95% intervals)")
        _legend_outside(ax, title="stage")
    return fig


def plot_stages(results: dict, path, title: str | None = None) -> None:
    """`stages_figure` saved as a PNG at `path`."""
    path = Path(path)
    save_figure(stages_figure(results, title), path.with_suffix(""),
                (path.suffix[1:] or "png",))


LIFE_METRICS = [("asr", "ASR", "C3"), ("ftr_near", "FTR near", "C1"),
                ("clean_utility", "clean utility", "C0")]


def round_label(r: dict) -> str:
    """A round's tick: its number and what it trained (sft, dpo, safety; a safety round by
    another method than SFT: `safety:<method>`)."""
    kind = r["type"]
    if kind == "safety" and r.get("loss") not in (None, "sft"):
        kind = f"safety:{r['loss']}"
    return f"{r['round']}\n{kind}"


def life_figure(life: dict, title: str) -> Figure:
    """A lifecycle run by round (0 = the base model): ASR, FTR near and clean utility of the
    deployed model (solid, with 95% intervals) and of each round's candidate (dotted), poisoned
    rounds shaded, and each round's gates marked at the top: Q quarantined rows, B a blocked
    round, x a candidate the drift gate failed (rolled back unless the gate only records)."""
    rounds = life["rounds"]
    xs = [r["round"] for r in rounds]
    with _style():
        fig = _figure(6.4, 3.0)
        ax = fig.subplots()
        for r in rounds:
            if r["poisoned_rows"]:
                ax.axvspan(r["round"] - 0.5, r["round"] + 0.5, color="C3", alpha=0.08, lw=0)
        for key, label, colour in LIFE_METRICS:
            dep = [(r["stages"]["deployed"] or {}).get(key) for r in rounds]
            if not any(isinstance(m, dict) for m in dep):
                continue
            pts = [(x, m) for x, m in zip(xs, dep) if isinstance(m, dict)]
            ys = [m["value"] for _, m in pts]
            err = [[max(0.0, m["value"] - _clip01(m.get("ci_low", m["value"]))) for _, m in pts],
                   [max(0.0, _clip01(m.get("ci_high", m["value"])) - m["value"]) for _, m in pts]]
            ax.errorbar([x for x, _ in pts], ys, yerr=err, color=colour, marker="o", ms=3,
                        capsize=2, lw=1.2, label=f"{label} (deployed)")
            cand = [(r["round"], (r["stages"]["candidate"] or {}).get(key)) for r in rounds]
            cand = [(x, m["value"]) for x, m in cand if isinstance(m, dict)]
            if cand:
                ax.plot([x for x, _ in cand], [y for _, y in cand], ls=":", marker=".",
                        color=colour, lw=1.0, label=f"{label} (candidate)")
        for r in rounds:
            marks = []
            if r["quarantined"]:
                marks.append(f"Q{r['quarantined']}")
            if r["data_gate"]["decision"] == "block":
                marks.append("B")
            if (r["drift_gate"] or {}).get("decision") == "fail":
                marks.append("x declared" if r.get("declared_update") else "x")
            if marks:
                ax.text(r["round"], 1.06, " ".join(marks), ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(xs, [round_label(r) for r in rounds], fontsize=7)
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
        ax.set_ylim(0, 1.15)            # the gates' marks sit above the rates, inside the axes
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_xlabel("round (shaded: poisoned batch)")
        ax.set_ylabel("rate")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(title + "\n(Q: rows quarantined, B: round blocked, x: drift gate failed)",
                     fontsize=8)
        _legend_outside(ax)
    return fig


def plot_life(life: dict, path, title: str) -> None:
    """`life_figure` saved at `path` (its suffix the format; PNG without one)."""
    path = Path(path)
    save_figure(life_figure(life, title), path.with_suffix(""), (path.suffix[1:] or "png",))


# ----------------------------------------------------------------------------- poisonlab report

def plot_report(df: pandas.DataFrame, out_dir, formats=("png",), agg=None) -> list[Path]:
    """The report's figures whose data the runs have (`report_figures`), each saved in every
    format of `formats` into out_dir. Returns the paths written."""
    formats = parse_formats(formats)
    written = []
    for name, fig in report_figures(df, agg).items():
        written += save_figure(fig, Path(out_dir) / name, formats)
    return written


def report_figures(df: pandas.DataFrame, agg=None) -> dict[str, Figure]:
    """By name (no extension): ASR vs poison count and vs poison rate, ASR vs clean-set size,
    persistence curves, detectors' ROC curves, clean utility vs ASR, R50 beside persistence;
    each only when the runs hold its data. `agg`: `aggregate(df)`, when already computed."""
    agg = aggregate(df) if agg is None else agg
    with _style():
        return {**_asr_vs_poison(df), **_asr_vs_clean_size(df), **_persistence_curves(df),
                **_roc_curves(df), **_utility_vs_asr(df, agg), **_r50_vs_persistence(agg)}


def _with(df: pandas.DataFrame, *columns: str) -> pandas.DataFrame | None:
    if any(c not in df.columns for c in columns):
        return None
    d = df.dropna(subset=list(columns))
    return d if len(d) else None


def _one_per_poisoned_model(df: pandas.DataFrame) -> pandas.DataFrame:
    """One run per poisoned model and seed: the arms of a defence benchmark share theirs, and
    its figures (ASR, FTRs and utility of `poisoned`, detection) must count it once."""
    key = [c for c in ("poison_id", "seed") if c in df.columns]
    if "poison_id" not in key:
        return df
    if "run_dir" in df:
        df = df.sort_values("run_dir", kind="stable")
    return df.drop_duplicates(key)


def _series_keys(d, base: list[str], x: str) -> list[str]:
    """One line per value of `base` and of the identifying columns that vary in `d` (a
    placement sweep must not be averaged into one line); never the x axis itself."""
    keys = [c for c in base if c != x and c in d and (c in ("family", "model")
                                                      or d[c].nunique(dropna=False) > 1)]
    return keys + [c for c in SERIES_EXTRA if c in d and c != x
                   and d[c].nunique(dropna=False) > 1]


def _series_label(keys: list[str], key) -> str:
    values = key if isinstance(key, tuple) else (key,)
    parts = []
    for k, v in zip(keys, values):
        v = plain(v, escape=False)
        parts.append(f"{v}" if k in ("family", "model") else
                     f"{v} poisons" if k == "n_poison" else
                     f"{v} clean rows" if k == "n_train" else f"{k} {v}")
    return " / ".join(parts)


def _varying(d, keys: list[str]) -> list[str]:
    return [k for k in keys if k in d and d[k].map(plain).nunique() > 1]


def _defence_palette(labels) -> dict:
    """A colour per defence label, the same in every figure: the removal methods in their
    order in `poisonlab.defenses.METHODS`, then filter + retrain, then any other label."""
    from poisonlab.defenses import METHODS

    labels = set(labels)
    canonical = [defense_label(m) for m in METHODS if m != "none"]
    rest = sorted(lab for lab in labels if lab not in canonical)
    filters = [lab for lab in rest if lab.startswith("filter")]
    palette = _palette([*canonical, *filters, *(lab for lab in rest if lab not in filters)])
    return {lab: palette[lab] for lab in labels}


def _line_style(i: int) -> str:
    """Solid for the first ten colours, then dashed, then dotted (tab10 repeats)."""
    return ("-", "--", ":")[(i // 10) % 3]


def _crossed(d, x: str, other: str, keys: list[str]) -> bool:
    """Does `other` take several values at one x within a series (a count x clean-size grid),
    rather than move with x (a poison-rate sweep, whose clean rows shrink as poisons grow)?"""
    if other not in d or d[other].nunique(dropna=False) < 2:
        return False
    groups = d.groupby([k for k in keys if k in d] + [x], dropna=False)[other]
    return bool((groups.nunique(dropna=False) > 1).any())


def _log_x(ax, values, fmt=lambda v: f"{v:g}") -> None:
    """A log x axis labelled with the plotted values themselves (10, 40, 160)."""
    ax.set_xscale("log")
    ticks = sorted(set(values))
    if len(ticks) <= 10:
        ax.set_xticks(ticks, [fmt(v) for v in ticks])
        ax.minorticks_off()


def _mean_with_interval(ax, g, x: str, y: str, label: str, color, marker) -> None:
    """The mean over seeds at each x joined by a line, its interval over seeds as error bars;
    where a point has fewer than MIN_SEEDS seeds, its seeds' values as small points."""
    import numpy as np

    xs, means, lo, hi, seeds = [], [], [], [], []
    for xv, at in sorted(g.groupby(x)[y], key=lambda item: item[0]):
        mean, low, high = seed_interval(at.tolist(), (0.0, 1.0), rate=True)
        xs.append(xv)
        means.append(mean)
        lo.append(low)
        hi.append(high)
        if math.isnan(low) and len(at) > 1:
            seeds += [(xv, v) for v in at]
    ax.plot(xs, means, marker=marker, ms=4, color=color, label=label, zorder=3)
    with_ci = [i for i, v in enumerate(lo) if not math.isnan(v)]
    if with_ci:
        err = np.array([[max(0.0, means[i] - lo[i]) for i in with_ci],
                        [max(0.0, hi[i] - means[i]) for i in with_ci]])
        ax.errorbar([xs[i] for i in with_ci], [means[i] for i in with_ci], yerr=err,
                    fmt="none", ecolor=color, capsize=3, lw=1, zorder=2)
    if seeds:
        ax.scatter(*zip(*seeds), s=9, color=color, alpha=0.45, lw=0, zorder=2)


def _series_figure(d, x: str, keys: list[str], title: str, xlabel: str, fmt) -> Figure:
    groups = list(d.groupby(keys, dropna=False, sort=True)) if keys else [((), d)]
    shown = _varying(d, keys) or [k for k in keys if k in ("family", "model")]
    fig = _figure(5.4, 3.0)
    ax = fig.subplots()
    palette = _palette(str(k) for k, _ in groups)
    for key, g in groups:
        values = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        color, marker = palette[str(key)]
        _mean_with_interval(ax, g, x, "asr_poisoned",
                            _series_label(shown, tuple(values[k] for k in shown)), color, marker)
    _log_x(ax, d[x], fmt)
    _unit_axis(ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ASR (attack success rate)")
    ax.grid(alpha=0.3)
    _legend_outside(ax, title=" / ".join({"family": "attack"}.get(k, k) for k in shown) or None)
    return fig


def _asr_vs_poison(df) -> dict:
    """ASR of `poisoned` against the poison count and against the poison rate: one line per
    attack and model (and placement or trigger where they vary), never per clean-row count
    unless the runs cross counts with clean sizes."""
    d = _with(df, "n_poison", "asr_poisoned", "family", "model")
    d = None if d is None else _one_per_poisoned_model(d[d["n_poison"] > 0])  # a log axis
    if d is None or d["n_poison"].nunique() < 2:
        return {}
    keys = _series_keys(d, ["family", "model"], "n_poison")
    if _crossed(d, "n_poison", "n_train", keys):
        keys.insert(2, "n_train")
    if not (d.groupby(keys, dropna=False)["n_poison"].nunique() > 1).any():
        return {}  # every line would be one point (a benchmark of attacks at one count each)
    figures = {"asr_vs_poison_count": _series_figure(
        d, "n_poison", keys, "Attack success vs number of poisoned rows",
        "poisoned training rows (log scale)", lambda v: f"{v:g}")}
    if "n_train" in d and d["n_train"].notna().all():
        d = d.assign(poison_rate=d["n_poison"] / (d["n_poison"] + d["n_train"]))
        if d["poison_rate"].nunique() > 1:
            figures["asr_vs_poison_rate"] = _series_figure(
                d, "poison_rate", keys, "Attack success vs poison rate",
                "poison rate: poisoned rows / all training rows (log scale)",
                lambda v: f"{100 * v:.3g}%")
    return figures


def _asr_vs_clean_size(df) -> dict:
    d = _with(df, "n_train", "n_poison", "asr_poisoned", "family", "model")
    if d is None:
        return {}
    d = _one_per_poisoned_model(d[d["n_train"] > 0])
    keys = _series_keys(d, ["family", "model", "n_poison"], "n_train")
    series = [g for _, g in d.groupby(keys, dropna=False) if g["n_train"].nunique() > 1]
    if not series:
        return {}
    import pandas as pd

    fig = _series_figure(pd.concat(series), "n_train", keys,
                         "Attack success vs clean-set size at a fixed poison count",
                         "clean training rows (log scale)", lambda v: f"{v:g}")
    return {"asr_vs_clean_size": fig}


def _panels(n: int, width: float, height: float, ncols: int = 2, extra_width: float = 0.0):
    """A figure of n panels, `ncols` to a row (plus `extra_width` inches for a legend
    beside them); the unused axes hidden."""
    ncols = max(1, min(n, ncols))
    nrows = math.ceil(n / ncols)
    fig = _figure(width * ncols + extra_width, height * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _panel_groups(d) -> list[tuple[str, object]]:
    """(title, rows) per attack (its columns of ATTACK_COLUMNS), titled by the fewest of them
    that tell the panels apart."""
    keys = [c for c in ATTACK_COLUMNS if c in d]
    if not keys:
        return [("", d)]
    groups = list(d.groupby(keys, dropna=False, sort=True))
    firsts = [g.iloc[0].to_dict() for _, g in groups]
    shown = distinguishing(firsts, keys) or [c for c in ("family",) if c in keys]
    return [(_series_label(shown, tuple(f[c] for c in shown)), g)
            for f, (_, g) in zip(firsts, groups)]


def _run_label(row) -> str:
    label = defense_label(row.get("safety"), row.get("filter"))
    if label:
        return label
    return row["overrides"] if isinstance(row.get("overrides"), str) else Path(row["run_dir"]).name


def _cell_labels(d, groups) -> dict:
    """A label per row of `d`: its defence; where cells (configs) of one panel share it, with
    their overrides (seed left out) or their config digest."""
    from poisonlab.report.seeds import _without_seed

    labels = {i: _run_label(r) for i, r in d.iterrows()}
    for _, g in groups:
        cell = g["config_id"] if "config_id" in g else g["run_dir"]
        for label in {labels[i] for i in g.index}:
            rows = [i for i in g.index if labels[i] == label]
            if cell[rows].nunique() > 1:
                for i in rows:
                    extra = _without_seed(d.at[i, "overrides"]) if "overrides" in d else None
                    labels[i] = f"{label} ({extra or str(cell[i])[:8]})"
    return labels


def _persistence_curves(df) -> dict:
    """ASR against clean rows seen while the defence trains (results.json `curves.<stage>`):
    one panel per attack, one line per cell (defence), its seeds averaged where they share
    their x values."""
    curves: dict[str, list] = {}
    for _, row in df.iterrows():
        results = _read_json(Path(row["run_dir"]) / "results.json")
        for stage, points in (results.get("curves") or {}).items():
            points = [p for p in points if isinstance(p.get("asr"), dict)]
            if points:
                curves.setdefault(stage, []).append((row, points))
    import pandas as pd

    figures = {}
    for stage, runs in curves.items():
        d = pd.DataFrame([{**row.to_dict(), "_points": points} for row, points in runs])
        groups = _panel_groups(d)
        labels = _cell_labels(d, groups)
        palette = _defence_palette(labels.values())
        fig, axes = _panels(len(groups), 3.0, 2.4, extra_width=1.6)
        for ax, (title, g) in zip(axes, groups):
            cells = g.groupby("config_id", sort=False) if "config_id" in g else [(None, g)]
            for _, cell in cells:
                label = labels[cell.index[0]]
                color, marker = palette[label]
                runs_x = [tuple(p["rows_seen"] for p in pts) for pts in cell["_points"]]
                if len(set(runs_x)) == 1:  # the seeds share their x: the mean, and the band
                    xs = runs_x[0]
                    ys = [[pts[i]["asr"]["value"] for pts in cell["_points"]]
                          for i in range(len(xs))]
                    stats = [seed_interval(v, (0.0, 1.0), rate=True) for v in ys]
                    ax.plot(xs, [s[0] for s in stats], marker=marker, ms=3, color=color,
                            label=label)
                    if not math.isnan(stats[0][1]):
                        ax.fill_between(xs, [s[1] for s in stats], [s[2] for s in stats],
                                        color=color, alpha=0.15, lw=0)
                    elif len(cell) > 1:
                        for v in zip(*ys):
                            ax.plot(xs, v, color=color, alpha=0.3, lw=0.7)
                else:
                    for i, pts in enumerate(cell["_points"]):
                        ax.plot([p["rows_seen"] for p in pts], [p["asr"]["value"] for p in pts],
                                marker=marker, ms=3, color=color, alpha=0.8,
                                label=label if i == 0 else None)
            _unit_axis(ax)
            ax.set_title(title)
            ax.set_xlabel("clean rows seen by the defence")
            ax.set_ylabel("ASR")
            ax.grid(alpha=0.3)
        ns = sorted({p["asr"]["n"] for _, pts in runs for p in pts if "n" in p["asr"]})
        n = "" if not ns else (f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}")
        fig.suptitle("ASR while the defence trains"
                     + ("" if stage == "after_safety" else f" ({stage_label(stage)})")
                     + (f", {n} triggered prompts per point" if n else ""))
        handles = {label: None for label in palette}
        for ax in axes:
            for h, label in zip(*ax.get_legend_handles_labels()):
                handles[label] = handles[label] or h
        fig.legend([h for h in handles.values() if h], [k for k, h in handles.items() if h],
                   loc="outside right center", frameon=False, title="defence")
        figures[f"persistence_{stage}"] = fig
    return figures


def roc_curve(scores, labels) -> tuple[list[float], list[float]] | None:
    """False- and true-positive rates at every distinct score (tied scores move together);
    None unless both classes occur."""
    pairs = sorted(zip(scores, map(bool, labels)), key=lambda p: -p[0])
    pos = sum(y for _, y in pairs)
    neg = len(pairs) - pos
    if not pos or not neg:
        return None
    fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
    for i, (score, y) in enumerate(pairs):
        tp, fp = tp + y, fp + (not y)
        if i + 1 == len(pairs) or pairs[i + 1][0] != score:
            fpr.append(fp / neg)
            tpr.append(tp / pos)
    return fpr, tpr


def _auc(fpr, tpr) -> float:
    return sum((f1 - f0) * (t1 + t0) / 2 for f0, f1, t0, t1 in zip(fpr, fpr[1:], tpr, tpr[1:]))


def _vertical_mean(curves: list[tuple[list, list]]) -> tuple[list, list]:
    """ROC curves averaged vertically: the mean true-positive rate at each false-positive
    rate of a fine grid (Fawcett 2006); a vertical step counts at its top."""
    import numpy as np

    grid = np.linspace(0.0, 1.0, 201)
    tprs = []
    for fpr, tpr in curves:
        top: dict[float, float] = {}
        for f, t in zip(fpr, tpr):
            top[f] = max(t, top.get(f, 0.0))
        xs = sorted(top)
        tprs.append(np.interp(grid, xs, [top[x] for x in xs]))
    mean = np.mean(tprs, axis=0)
    mean[0] = 0.0
    return [0.0, *grid.tolist()], [0.0, *mean.tolist()]


def _roc_curves(df) -> dict:
    """One panel per attack with every detector's ROC curve (from detection/<name>.jsonl,
    near-trigger prompts left out as in the detector's AUROC), each detector once: runs of
    the same poisoned model and seed (the detectors and filter arms) are read once."""
    if "run_dir" not in df:
        return {}
    d = df.sort_values("run_dir", kind="stable")
    seen: set = set()
    rows = []
    for _, row in d.iterrows():
        for f in sorted((Path(row["run_dir"]) / "detection").glob("*.jsonl")):
            key = (row.get("poison_id", row["run_dir"]), row.get("seed"), f.stem)
            if key in seen:
                continue
            items = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()
                     if line.strip()]
            items = [it for it in items if it.get("split") != "near_trigger"
                     and isinstance(it.get("score"), (int, float)) and not math.isnan(it["score"])]
            roc = roc_curve([it["score"] for it in items], [it.get("poisoned") for it in items])
            if roc:
                seen.add(key)
                recorded = row.get(f"auroc_{f.stem}")
                rows.append({**{c: row.get(c) for c in ATTACK_COLUMNS}, "detector": f.stem,
                             "roc": roc, "auroc": _auc(*roc) if recorded is None or (
                                 isinstance(recorded, float) and math.isnan(recorded))
                             else float(recorded)})
    if not rows:
        return {}
    import pandas as pd

    curves = pd.DataFrame(rows)
    groups = _panel_groups(curves)
    order = sorted(curves["detector"].unique())
    palette = _palette(order)
    fig, axes = _panels(len(groups), 4.6, 2.9)
    for ax, (title, g) in zip(axes, groups):
        lines = []
        for det, runs in g.groupby("detector", sort=True):
            fpr, tpr = (runs["roc"].iloc[0] if len(runs) == 1
                        else _vertical_mean(runs["roc"].tolist()))
            auc = float(runs["auroc"].mean())
            seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
            lines.append((-auc, det, fpr, tpr, f"{detector_label(det)}: AUROC {auc:.2f}{seeds}"))
        for _, det, fpr, tpr, label in sorted(lines):  # the legend by AUROC, best first
            ax.plot(fpr, tpr, color=palette[det][0], ls=_line_style(order.index(det)), lw=1.3,
                    label=label)
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="chance: AUROC 0.50")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_title(title or "ROC")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.grid(alpha=0.3)
        _legend_outside(ax, title="detector")
    fig.suptitle("Detectors' ROC curves, one panel per attack")
    return {"roc": fig}


def _after_stage(row) -> str | None:
    """The stage a cell's defence produced: `after_safety`, or `filtered` (filter then
    retrain); None without one."""
    for stage in ("after_safety", "filtered"):
        a, u = row.get(f"asr_{stage}_mean"), row.get(f"clean_utility_{stage}_mean")
        if a is not None and u is not None and not (math.isnan(a) or math.isnan(u)):
            return stage
    return None


def _utility_vs_asr(df, agg=None) -> dict:
    """Clean utility against ASR, one panel per attack: the poisoned model (a black ring, on
    top) and an arrow from it to the model after each defence (mean over seeds), each defence
    in its own colour and marker, named in the legend."""
    agg = aggregate(df) if agg is None else agg
    if "asr_poisoned_mean" not in agg or "clean_utility_poisoned_mean" not in agg:
        return {}
    cells = agg.dropna(subset=["asr_poisoned_mean", "clean_utility_poisoned_mean"]).copy()
    cells["_after"] = [_after_stage(r) for _, r in cells.iterrows()]
    cells["_defense"] = [defense_label(r.get("safety"), r.get("filter"))
                         for _, r in cells.iterrows()]
    cells = cells[cells["_after"].notna() & cells["_defense"].notna()]
    if not len(cells):
        return {}
    groups = _panel_groups(cells)
    palette = _defence_palette(cells["_defense"])
    fig, axes = _panels(len(groups), 2.8, 2.6, extra_width=1.7)
    for ax, (title, g) in zip(axes, groups):
        for _, r in g.sort_values("_defense").iterrows():
            color, marker = palette[r["_defense"]]
            before = (r["asr_poisoned_mean"], r["clean_utility_poisoned_mean"])
            after = (r[f"asr_{r['_after']}_mean"], r[f"clean_utility_{r['_after']}_mean"])
            if math.dist(before, after) > 0.015:
                ax.annotate("", xy=after, xytext=before, zorder=2,
                            arrowprops={"arrowstyle": "-|>", "color": color, "lw": 1.0,
                                        "shrinkA": 4, "shrinkB": 3, "alpha": 0.85,
                                        "mutation_scale": 8})
            ax.scatter(*after, color=color, marker=marker, s=26, zorder=3,
                       edgecolors="white", linewidths=0.4, label=r["_defense"])
        before = g[["asr_poisoned_mean", "clean_utility_poisoned_mean"]].drop_duplicates()
        ax.scatter(before["asr_poisoned_mean"], before["clean_utility_poisoned_mean"], s=70,
                   facecolors="none", edgecolors="black", linewidths=1.6, zorder=5,
                   label="poisoned (before defence)")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title)
        ax.set_xlabel("ASR (attack success rate)")
        ax.set_ylabel("clean utility")
        ax.grid(alpha=0.3)
    handles: dict = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    order = ["poisoned (before defence)"] + sorted(k for k in handles
                                                   if k != "poisoned (before defence)")
    fig.legend([handles[k] for k in order], order, loc="outside right center", frameon=False,
               title="defence")
    fig.suptitle("Clean utility vs ASR: poisoned model → after each defence (mean over seeds)")
    return {"utility_vs_asr": fig}


def _overrides_of(row) -> dict:
    """A cell's swept overrides (seed left out) as {key: value}, in their order."""
    text = row.get("overrides")
    if not isinstance(text, str):
        return {}
    return dict(o.split("=", 1) for o in text.split(" ") if "=" in o)


def _sweep_labels(cells: list) -> tuple[list[str], list[str]]:
    """(a label per cell, the value of the first key that varies per cell): the keys the sweep
    varies (`overrides`, seed left out) as `key=value`, the last part of a dotted key; without
    them, the fewest identifying columns that tell the cells apart, and the defence."""
    parsed = [_overrides_of(r) for r in cells]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    if varying:
        return ([", ".join(f"{k.rsplit('.', 1)[-1]}={p.get(k, '-')}" for k in varying)
                 for p in parsed], [str(p.get(varying[0], "-")) for p in parsed])
    ids = distinguishing(cells, ["family", "model", "n_poison", "n_train", "name", "config_id"])
    labels = [" / ".join([plain(r.get(c), escape=False) for c in ids]
                         + [defense_label(r.get("safety"), r.get("filter")) or ""]).strip(" /")
              for r in cells]
    return labels, [plain(r.get("model"), escape=False) for r in cells]


def _seed_dots(ax, values, y: float, color) -> None:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    ax.scatter(xs, [y] * len(xs), s=8, color=color, alpha=0.45, lw=0, zorder=2)


def _r50_vs_persistence(agg) -> dict:
    """R50 (with its interval over seeds; censored cells as a bound) beside final
    persistence: one row per cell with a persistence curve, a forest plot in two panels."""
    if "r50_n" not in agg:
        return {}
    cells = sorted((r for _, r in agg.iterrows()
                    if (r.get("r50_n") or 0) + (r.get("r50_n_undefined") or 0) > 0),
                   key=sweep_order)
    if not cells:
        return {}
    labels, groups = _sweep_labels(cells)
    palette = _palette(groups)
    fig = _figure(7.2, 0.9 + 0.22 * len(cells))
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    for y, (r, group) in enumerate(zip(cells, groups)):
        color, marker = palette[group]
        if not r["r50_n"]:
            left.annotate("no R50: ASR < 0.5 before the defence", (0, y), xytext=(4, 0),
                          textcoords="offset points", va="center", fontsize=6, color=color)
        elif r["r50_n_censored"]:
            left.scatter([r["r50_above"]], [y], marker=">", s=34, facecolors="none",
                         edgecolors=color, linewidths=1.2, zorder=3)
            left.annotate(f"> {r['r50_above']:.0f} ({r['r50_n_censored']}/{r['r50_n']} "
                          "censored)", (r["r50_above"], y), xytext=(6, 0),
                          textcoords="offset points", va="center", fontsize=6, color=color)
        else:
            _interval_point(left, r, "r50", y, color, marker)
        _seed_dots(left, r["r50_values"], y, color)
        if "persistence_values" in r.index:
            _interval_point(right, r, "persistence", y, color, marker)
            _seed_dots(right, r["persistence_values"], y, color)
    left.set_yticks(range(len(cells)), labels)
    left.invert_yaxis()
    left.set_xlim(left=0)
    left.margins(x=0.25)
    left.set_xlabel("R50: clean rows until ASR < 0.5")
    right.axvline(1.0, ls="--", lw=0.8, color="grey")
    right.set_xlim(left=0)
    right.set_xlabel("final persistence (ASR after / before)")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Removal dose–response: R50 (mean over seeds, 95% interval) beside final "
                 "persistence")
    return {"r50_vs_persistence": fig}


def _interval_point(ax, r, m: str, y: float, color, marker) -> None:
    """The mean of metric `m` over a cell's seeds at height y, with its interval if known."""
    mean, lo, hi = r.get(f"{m}_mean"), r.get(f"{m}_t_lo"), r.get(f"{m}_t_hi")
    if mean is None or math.isnan(mean):
        return
    ax.scatter([mean], [y], marker=marker, s=22, color=color, zorder=3)
    if lo is not None and not math.isnan(lo):
        ax.errorbar([mean], [y], xerr=[[max(0.0, mean - lo)], [max(0.0, hi - mean)]],
                    fmt="none", ecolor=color, capsize=2, lw=1, zorder=2)


def caption(name: str) -> str:
    """The one-line caption of a report figure (by name, without extension)."""
    base = ("persistence" if name.startswith("persistence_") else
            "life" if name.startswith("life_") else name)
    text = FIGURE_CAPTIONS.get(base, "")
    if base.startswith("asr_vs_"):
        text += " " + SEEDS_NOTE
    return text


__all__ = ["CURVE_METRICS", "FIGURE_CAPTIONS", "FORMATS", "SERIES_EXTRA",
           "caption", "curve_figure", "life_figure", "parse_formats", "plot_curve", "plot_life",
           "plot_report", "plot_stages", "report_figures", "roc_curve", "save_figure",
           "stages_figure"]
