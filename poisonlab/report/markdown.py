"""`poisonlab report`, report.md: the aggregated figures as a markdown table, the published
figures beside ours, and a note on what the intervals are."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from poisonlab.report.collect import CELL_COLUMNS
from poisonlab.report.seeds import MIN_SEEDS

if TYPE_CHECKING:
    import pandas

# the markdown table's columns (every aggregated metric is in aggregate.csv)
HEADLINE_PREFIXES = ("asr_", "auroc_")
HEADLINE = ("ftr_clean_poisoned", "ftr_near_poisoned", "clean_utility_poisoned",
            "clean_utility_after_safety", "persistence", "der")


def format_markdown(agg: pandas.DataFrame) -> str:
    """The aggregated figures as a markdown table (published figures beside ours) and a note
    on the intervals."""
    metrics = [c[:-5] for c in agg.columns if c.endswith("_mean")]
    published = [c[len("published_"):] for c in agg.columns
                 if c.startswith("published_") and not c.endswith("_source")]
    shown = [m for m in metrics if m.startswith(HEADLINE_PREFIXES) or m in HEADLINE
             or m in published]
    shown += [m for m in published if m not in shown]
    # a published figure that is the same for every cell is said once, below the table
    common = {m: _published_cell(agg.iloc[0], m) for m in published if len(agg) > 1
              and agg.apply(lambda r: _published_cell(r, m), axis=1).nunique() == 1}
    published = [m for m in published if m not in common]
    ids = _distinguishing(agg)
    header = [*ids, "seeds"]
    for m in shown:
        header += [m, f"{m} (published)"] if m in published else [m]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    undefined = False  # a seed without a value beside seeds with one
    for _, row in agg.iterrows():
        cells = [_plain(row[c]) for c in ids] + [", ".join(_plain(s) for s in row["seeds"])]
        for m in shown:
            cells.append(_seed_cell(row, m))
            undefined |= "NaN" in cells[-1]
            if m in published:
                cells.append(_published_cell(row, m))
        lines.append("| " + " | ".join(cells) + " |")
    few = int((agg["n_seeds"] < MIN_SEEDS).sum())
    duplicates = int(agg["duplicate_runs"].map(len).sum()) if "duplicate_runs" in agg else 0
    lines += ["", f"{int(agg['n_seeds'].sum()) + duplicates} runs in {len(agg)} cells (by "
              "default, runs whose configs differ only in `seed`"
              + (f"; {duplicates} of them duplicates of a run with the same config and seed, "
                 "left out: `duplicate_runs` in aggregate.csv" if duplicates else "")
              + "). Each figure: with at least 3 seeds, the "
              "mean over seeds and its 95% Student-t interval over seeds, "
              "mean ± t(0.975, n−1)·s/√n (s: the standard deviation across seeds), "
              "clipped to [0, 1] for rates (ASR, FTR, utility, DER, detection figures); "
              "with fewer than 3 seeds no interval is given, "
              "only every seed's value (in the order of `seeds`) and their mean"
              + (f" — {few} of {len(agg)} cells here." if few else ".")
              + " The per-run intervals in runs.csv and report.csv (Wilson over prompts, paired "
              "bootstrap for persistence) cover the prompts of one trained model, not "
              "seed-to-seed variance."]
    if undefined:
        lines.append("NaN: the metric is undefined in that seed (persistence when the poisoned "
                     "ASR is 0, for one); the mean, the interval and their n are over the seeds "
                     "with a value.")
    if published:
        lines.append("`(published)`: the figure the preset quotes (`config.published`), with "
                     "its source.")
    for m, text in common.items():
        lines.append(f"Published {m} (`config.published`): {text}.")
    return "\n".join(lines)


def _distinguishing(agg: pandas.DataFrame) -> list[str]:
    """Identifying columns that vary between cells (family and model when none does)."""
    cols = [c for c in [*CELL_COLUMNS, "overrides"] if c in agg.columns and c != "config_id"]
    varying = [c for c in cols if agg[c].map(_plain).nunique() > 1]
    if not varying:
        varying = [c for c in ("family", "model") if c in agg.columns]
    if "config_id" in agg.columns and agg[varying].map(_plain).duplicated().any():
        varying.append("config_id")  # cells differ in a key the other columns do not show
    return varying


def _plain(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return str(v).replace("|", "\\|")


def _seed_cell(row, m: str) -> str:
    """The mean and its interval, else every seed's value in the order of `seeds` and their
    mean; a seed where the metric is undefined shows as NaN and is left out of the mean."""
    if f"{m}_mean" not in row:
        return "-"
    values = row[f"{m}_values"]
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return "-"
    undefined = [_plain(s) for s, v in zip(row["seeds"], values) if math.isnan(v)]
    mean, lo, hi = row[f"{m}_mean"], row[f"{m}_t_lo"], row[f"{m}_t_hi"]
    if not math.isnan(lo):
        return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]" + (
            f" (n={len(known)}; NaN: seed{'s' if len(undefined) > 1 else ''} "
            f"{', '.join(undefined)})" if undefined else "")
    listed = ", ".join("NaN" if math.isnan(v) else f"{v:.3f}" for v in values)
    if len(known) == 1:
        return listed
    return listed + (f" (mean of {len(known)}: {mean:.3f})" if undefined
                     else f" (mean {mean:.3f})")


def _published_cell(row, m: str) -> str:
    value = row.get(f"published_{m}")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    source = row.get(f"published_{m}_source")
    text = _plain(value) if isinstance(value, str) else f"{value:.3f}"
    return text + (f" ({_plain(source)})" if isinstance(source, str) else "")
