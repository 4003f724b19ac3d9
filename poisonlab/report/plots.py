"""Plots (PNG): a run's curve during safety training (`plot_curve`, drawn by every run with
`safety.eval_every`), and the plots of `poisonlab report` over many runs (`plot_report`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from poisonlab.report.collect import _read_json
from poisonlab.report.markdown import _plain

if TYPE_CHECKING:
    import pandas

CURVE_METRICS = [("asr", "ASR"), ("ftr_clean", "FTR clean"), ("clean_utility", "clean utility")]


def plot_curve(points: list[dict], path, title: str) -> None:
    """ASR, FTR_clean and utility against optimizer steps, with their 95% intervals (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    steps = [p["step"] for p in points]
    for key, label in CURVE_METRICS:
        if all(key in p for p in points):
            ax.plot(steps, [p[key]["value"] for p in points], marker="o", ms=3, label=label)
            ax.fill_between(steps, [p[key]["ci_low"] for p in points],
                            [p[key]["ci_high"] for p in points], alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- poisonlab report

def plot_report(df: pandas.DataFrame, out_dir) -> list[Path]:
    """The PNG plots whose data the runs have: ASR vs poison count, ASR vs clean-set size,
    persistence curves, detection ROC curves, utility vs ASR. Returns the paths written."""
    out = Path(out_dir)
    figures = {**_asr_vs_poison(df), **_asr_vs_clean_size(df), **_persistence_curves(df),
               **_roc_curves(df), **_utility_vs_asr(df)}
    written = []
    for name, fig in figures.items():
        out.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out / name)
        written.append(out / name)
    return written


def _axes(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend change

    fig = Figure(figsize=(6, 3.8), dpi=120)
    ax = fig.subplots()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _legend(ax, n: int) -> None:
    if 0 < n <= 12:
        ax.legend(fontsize=7)


def _with(df: pandas.DataFrame, *columns: str) -> pandas.DataFrame | None:
    if any(c not in df.columns for c in columns):
        return None
    d = df.dropna(subset=list(columns))
    return d if len(d) else None


def _seeds_and_means(ax, d: pandas.DataFrame, x: str, y: str, label: str) -> None:
    means = d.groupby(x)[y].mean().sort_index()
    line = ax.plot(means.index, means.values, marker="o", label=f"{label} (mean)")[0]
    ax.scatter(d[x], d[y], s=14, alpha=0.45, color=line.get_color())


def _log_x(ax, values) -> None:
    """A log x axis labelled with the plotted counts themselves (10, 40, 160)."""
    ax.set_xscale("log")
    ticks = sorted(set(values))
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.minorticks_off()


def _asr_vs_poison(df) -> dict:
    d = _with(df, "n_poison", "asr_poisoned", "family", "model")
    d = None if d is None else d[d["n_poison"] > 0]  # a log axis
    if d is None or d["n_poison"].nunique() < 2:
        return {}
    fig, ax = _axes("ASR of `poisoned` vs poison count (points: seeds; line: mean)",
                    "poisoned rows (log)", "ASR")
    keys = _series_keys(d, ["family", "model", "n_train"], "n_poison")
    groups = d.groupby(keys, dropna=False)
    for key, g in groups:
        _seeds_and_means(ax, g, "n_poison", "asr_poisoned", _series_label(keys, key))
    _log_x(ax, d["n_poison"])
    ax.set_ylim(-0.02, 1.02)
    _legend(ax, groups.ngroups)
    return {"asr_vs_poison.png": fig}


def _asr_vs_clean_size(df) -> dict:
    d = _with(df, "n_train", "n_poison", "asr_poisoned", "family", "model")
    if d is None:
        return {}
    d = d[d["n_train"] > 0]
    keys = _series_keys(d, ["family", "model", "n_poison"], "n_train")
    series = [(k, g) for k, g in d.groupby(keys, dropna=False) if g["n_train"].nunique() > 1]
    if not series:
        return {}
    fig, ax = _axes("ASR of `poisoned` vs clean-set size at a fixed poison count",
                    "clean training rows (log)", "ASR")
    for key, g in series:
        _seeds_and_means(ax, g, "n_train", "asr_poisoned", _series_label(keys, key))
    _log_x(ax, [v for _, g in series for v in g["n_train"]])
    ax.set_ylim(-0.02, 1.02)
    _legend(ax, len(series))
    return {"asr_vs_clean_size.png": fig}


SERIES_EXTRA = ("placement", "trigger", "safety", "detectors")


def _series_keys(d, base: list[str], x: str) -> list[str]:
    """One line per value of `base` and of the identifying columns that vary in `d` (a
    placement sweep must not be averaged into one line); never the x axis itself."""
    keys = [c for c in base if c != x and c in d and (c in ("family", "model")
                                                      or d[c].nunique(dropna=False) > 1)]
    return keys + [c for c in SERIES_EXTRA if c in d and d[c].nunique(dropna=False) > 1]


def _series_label(keys: list[str], key) -> str:
    values = key if isinstance(key, tuple) else (key,)
    parts = []
    for k, v in zip(keys, values):
        v = _plain(int(v) if isinstance(v, float) and v.is_integer() else v)
        parts.append(f"{v}" if k in ("family", "model") else
                     f"{v} poisons" if k == "n_poison" else
                     f"{v} clean" if k == "n_train" else f"{k} {v}")
    return " / ".join(parts)


def _label(row) -> str:
    return row["overrides"] if isinstance(row.get("overrides"), str) else Path(row["run_dir"]).name


def _persistence_curves(df) -> dict:
    """ASR against clean rows seen, per run, from results.json `curves.<stage>`."""
    curves: dict[str, list] = {}
    for _, row in df.iterrows():
        results = _read_json(Path(row["run_dir"]) / "results.json")
        for stage, points in (results.get("curves") or {}).items():
            points = [p for p in points if isinstance(p.get("asr"), dict)]
            if points:
                curves.setdefault(stage, []).append((_label(row), points))
    figures = {}
    for stage, runs in curves.items():
        fig, ax = _axes(f"ASR during `{stage}` (the curve's prompts)", "clean rows seen", "ASR")
        for label, points in runs:
            ax.plot([p["rows_seen"] for p in points], [p["asr"]["value"] for p in points],
                    marker="o", ms=3, label=label)
        ax.set_ylim(-0.02, 1.02)
        _legend(ax, len(runs))
        figures[f"persistence_{stage}.png"] = fig
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


def _roc_curves(df) -> dict:
    """Per detector, one ROC curve per run from detection/<name>.jsonl (near-trigger prompts
    left out, as in the detector's AUROC)."""
    curves: dict[str, list] = {}
    for _, row in df.iterrows():
        for f in sorted((Path(row["run_dir"]) / "detection").glob("*.jsonl")):
            items = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()
                     if line.strip()]
            items = [it for it in items if it.get("split") != "near_trigger"
                     and isinstance(it.get("score"), (int, float)) and not math.isnan(it["score"])]
            roc = roc_curve([it["score"] for it in items], [it.get("poisoned") for it in items])
            if roc:
                curves.setdefault(f.stem, []).append((_label(row), roc))
    figures = {}
    for det, runs in curves.items():
        fig, ax = _axes(f"detector `{det}`: ROC", "false-positive rate", "true-positive rate")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        for label, (fpr, tpr) in runs:
            auc = sum((f1 - f0) * (t1 + t0) / 2 for f0, f1, t0, t1 in
                      zip(fpr, fpr[1:], tpr, tpr[1:]))
            ax.plot(fpr, tpr, label=f"{label} (AUROC {auc:.3f})")
        _legend(ax, len(runs))
        figures[f"roc_{det}.png"] = fig
    return figures


def _utility_vs_asr(df) -> dict:
    stages = [(s, d) for s in ("poisoned", "filtered", "after_safety")
              if (d := _with(df, f"asr_{s}", f"clean_utility_{s}")) is not None]
    if not stages:
        return {}
    fig, ax = _axes("clean utility vs ASR, one point per run", "ASR", "clean utility")
    for (stage, d), marker in zip(stages, "osD"):
        ax.scatter(d[f"asr_{stage}"], d[f"clean_utility_{stage}"], marker=marker, alpha=0.7,
                   label=stage)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    _legend(ax, len(stages))
    return {"utility_vs_asr.png": fig}
