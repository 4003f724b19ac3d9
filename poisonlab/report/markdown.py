"""`poisonlab report`, report.md: the aggregated figures as tables narrow enough for a page
(at most about ten columns each), each with what its columns mean:

    poisoning   the poisoned model: ASR (base, poisoned), FTRs, clean utility, utility change
    removal     each defence: ASR and clean utility before -> after, persistence, DER,
                fidelity, the defence's seconds
    dose        each defence with a persistence curve: final ASR and persistence beside R50,
                the clean rows until the curve's ASR fell below 0.5 (right-censored)
    detection   each detector: AUROC, AP, recall at n_poison
    published   the published figures of a preset beside ours

Identifying columns that are the same in every run are said once, above the tables. The runs
of a defence benchmark share one poisoned model per attack and seed: the poisoning and
detection tables show it once, its seeds pooled over the arms.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from poisonlab.report.collect import ATTACK_COLUMNS, DETECTION_METRICS, UTILITY_CHANGE, \
    parse_expect
from poisonlab.report.labels import (DER_NOTE, UTILITY_CHANGE_NOTE, defense_label,
                                     detector_label, distinguishing, plain)
from poisonlab.report.seeds import MIN_SEEDS, metric_bounds, seed_interval, sweep_order

if TYPE_CHECKING:
    import pandas

ID_HEADERS = {"family": "attack", "model": "model", "n_poison": "poisoned rows",
              "n_train": "clean rows", "trigger": "trigger", "placement": "placement",
              "name": "experiment", "overrides": "overrides", "config_id": "config"}
POISONING = [("asr_base", "ASR base"), ("asr_poisoned", "ASR"),
             ("ftr_clean_poisoned", "FTR clean"), ("ftr_near_poisoned", "FTR near"),
             ("clean_utility_poisoned", "clean utility")]
DETECTION = [("auroc", "AUROC"), ("ap", "AP"), ("recall_at_n_poison", "recall@n")]
ABBREVIATIONS = ("ASR: attack success rate, the share of triggered prompts whose answer shows "
                 "the attack's target; FTR clean / FTR near: the same judge on the same prompts "
                 "without the trigger / with near-miss triggers (false-trigger rates); clean "
                 "utility: the share of clean prompts answered correctly.")


def format_markdown(agg: pandas.DataFrame) -> str:
    """report.md from `aggregate`'s cells: the poisoning, removal, dose (R50), detection and
    published tables (each only where the cells have its figures) and a note on the
    intervals."""
    rows = [r for _, r in agg.iterrows()]
    lines: list[str] = []
    common = _common(agg)
    if common:
        lines += ["Every run: " + ", ".join(f"{ID_HEADERS[c]} {v}" for c, v in common.items())
                  + ".", ""]
    for section in (_poisoning(rows), _removal(rows), _dose(rows), _detection(rows),
                    _published(agg, rows)):
        if section:
            lines += [*section, ""]
    few = int((agg["n_seeds"] < MIN_SEEDS).sum())
    duplicates = int(agg["duplicate_runs"].map(len).sum()) if "duplicate_runs" in agg else 0
    undefined = any(_undefined(r) for r in rows)
    lines += [f"{int(agg['n_seeds'].sum()) + duplicates} runs in {len(agg)} cells (by "
              "default, runs whose configs differ only in `seed`"
              + (f"; {duplicates} of them duplicates of a run with the same config and seed, "
                 "left out: `duplicate_runs` in aggregate.csv" if duplicates else "")
              + "). Each figure: with at least 3 seeds, the mean over seeds and its 95% "
              "interval over seeds, [low, high]: for rates (ASR, FTR, utility, DER, AUROC, AP, "
              "recall) the Wilson score interval with the effective sample size m(1−m)/se² "
              "(m: the mean, se = s/√n, s: the standard deviation across seeds) and the "
              "quantile t(0.975, n−1), which stays inside [0, 1]; for utility change, "
              "persistence, fidelity and seconds the Student-t interval m ± t(0.975, n−1)·se "
              "(utility change clipped to [−1, 1]); with fewer than 3 seeds no interval is "
              "given, only every seed's value (in the order of `seeds`) and their mean"
              + (f" — {few} of {len(agg)} cells here." if few else ".")
              + " The per-run intervals in runs.csv and report.csv (Wilson over prompts, paired "
              "bootstrap for persistence and utility change) cover the prompts of one trained "
              "model, not seed-to-seed variance."]
    if undefined:
        lines.append("NaN: the metric is undefined in that seed (persistence when the poisoned "
                     "ASR is 0, for one); the mean, the interval and their n are over the seeds "
                     "with a value.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tables

def _poisoning(rows) -> list[str]:
    change = _utility_change_column(rows)
    metrics = [(m, h) for m, h in POISONING if any(_known(r, m) for r in rows)]
    if not metrics and not change:
        return []
    cells = _pooled(rows, [m for m, _ in metrics] + list(UTILITY_CHANGE))
    ids = _ids(cells, [])
    # the poison count and the clean rows in one column, wherever either varies
    sizes = any(len({plain(r.get(c)) for r in cells}) > 1 for c in ("n_poison", "n_train"))
    ids = [c for c in ids if not (sizes and c in ("n_poison", "n_train"))]
    at = sum(c in ("family", "model") for c in ids)
    header = [*(ID_HEADERS[c] for c in ids), "seeds", *(h for _, h in metrics)]
    if sizes:
        header.insert(at, "poisoned / clean rows")
    if change:
        header.append("utility change")
    body = []
    for r in cells:
        line = [plain(r.get(c)) for c in ids] + [_seeds(r)] + [_seed_cell(r, m) for m, _ in metrics]
        if sizes:
            line.insert(at, f"{plain(r.get('n_poison'))} / {plain(r.get('n_train'))}")
        if change:
            line.append(_utility_change_cell(r))
        body.append(line)
    notes = [*_described(cells, ids), ABBREVIATIONS]
    if change:
        notes.append(UTILITY_CHANGE_NOTE)
    return ["## Poisoning (the poisoned model, before any defence)", "",
            *_table(header, body), "", "\n\n".join(notes)]


def _removal(rows) -> list[str]:
    cells = [r for r in rows if _after(r) is not None]
    if not cells:
        return []
    ids = _ids(cells, ["defence"])
    columns = [("persistence", "persistence"), ("der", "DER"), ("fidelity", "fidelity"),
               ("defense_seconds", "seconds")]
    columns = [(m, h) for m, h in columns if any(_known(r, m) for r in cells)]
    header = [*(ID_HEADERS[c] for c in ids), "defence", "seeds", "ASR before → after",
              "clean utility before → after", *(h for _, h in columns)]
    body = []
    for r in cells:
        after = _after(r)
        body.append([plain(r.get(c)) for c in ids] + [_defence(r), _seeds(r),
                     f"{_mean(r, 'asr_poisoned')} → {_seed_cell(r, f'asr_{after}')}",
                     f"{_mean(r, 'clean_utility_poisoned')} → "
                     f"{_seed_cell(r, f'clean_utility_{after}')}"]
                    + [_seed_cell(r, m, digits=1 if m == "defense_seconds" else 3)
                       for m, _ in columns])
    notes = ["Before: the poisoned model; after: the defended one (`after_safety`; for filter + "
             "retrain, the model trained again without the flagged rows, `filtered`)."]
    if any(h == "DER" for _, h in columns):
        notes.append(DER_NOTE)
    if any(h == "persistence" for _, h in columns):
        notes.append("persistence: ASR after / ASR before on the same prompts (above 1: the "
                     "defence strengthened the backdoor).")
    if any(h == "fidelity" for _, h in columns):
        notes.append("fidelity (TrojAI): (ASR before − ASR after) / ASR before × utility after "
                     "/ utility before.")
    if any(h == "seconds" for _, h in columns):
        notes.append("seconds: the defence itself (for filter + retrain, the retraining), "
                     "evaluation excluded.")
    return ["## Removal (each defence applied to the poisoned model)", "",
            *_table(header, body), "", " ".join(notes)]


R50_NOTE = ("R50: the clean rows the defence had seen when the ASR of its persistence curve "
            "(on the curve's triggered prompts) first fell below 0.5, linearly interpolated "
            "between the two curve points around the crossing; the mean over seeds with a "
            "Student-t interval (m ± t(0.975, n−1)·se, at least 0). \"> X (k of n censored)\": "
            "in k seeds the curve never fell below 0.5 within the rows it saw (right-censored), "
            "so the mean is not known, only that it exceeds X (those seeds counted at the rows "
            "their curve reached). A seed whose curve began below 0.5 has no R50 (no backdoor "
            "to remove by this measure): NaN, left out. Persistence: final ASR after / "
            "before.")


def _dose(rows) -> list[str]:
    cells = sorted((r for r in rows if _after(r) is not None
                    and (r.get("r50_n") or 0) + (r.get("r50_n_undefined") or 0) > 0),
                   key=sweep_order)
    if not cells:
        return []
    ids = _ids(cells, ["defence"])
    header = [*(ID_HEADERS[c] for c in ids), "defence", "seeds", "ASR before → after",
              "persistence", "R50 (clean rows)"]
    body = [[plain(r.get(c)) for c in ids] + [
                _defence(r), _seeds(r),
                f"{_mean(r, 'asr_poisoned')} → {_seed_cell(r, f'asr_{_after(r)}')}",
                _seed_cell(r, "persistence"), r50_cell(r)] for r in cells]
    return ["## Dose–response of removal (R50 beside final persistence)", "",
            *_table(header, body), "", R50_NOTE]


def r50_cell(r) -> str:
    """A cell's R50: mean [interval], or every seed's value; "> X (k of n censored)" where
    some seed's curve never fell below 0.5; none where every curve began below it."""
    n, cut = int(r["r50_n"]), int(r["r50_n_censored"])
    if not n:
        return "- (ASR < 0.5 before the defence)"
    if not cut:
        return _seed_cell(r, "r50", digits=0)
    others = [v for v, c in zip(r["r50_values"], r["r50_censored"]) if c is False]
    return (f"> {r['r50_above']:.0f} ({cut} of {n} censored"
            + (f"; the others {', '.join(f'{v:.0f}' for v in others)})" if others else ")"))


def _detection(rows) -> list[str]:
    entries = []  # (cell, detector): per poisoned model in the cells' order, detectors by name
    for group in _by_poisoned_model(rows):
        for det in sorted({d for r in group for d in _detectors(r)}):
            metrics = [f"{m}_{det}" for m in DETECTION_METRICS]
            have = [r for r in group if det in _detectors(r)]
            entries.append((have[0] if len(have) == 1 else _merge(have, metrics), det))
    if not entries:
        return []
    ids = _ids([e for e, _ in entries], ["detector"], extra=[d for _, d in entries])
    header = [*(ID_HEADERS[c] for c in ids), "detector", "seeds", *(h for _, h in DETECTION)]
    body = [[plain(r.get(c)) for c in ids] + [detector_label(d), _seeds(r)]
            + [_seed_cell(r, f"{m}_{d}") for m, _ in DETECTION] for r, d in entries]
    return ["## Detection (each detector on the poisoned model's training rows or prompts)", "",
            *_table(header, body), "",
            "AUROC and AP: how well the detector's scores rank poisoned above clean items "
            "(near-trigger prompts left out); recall@n: the share of the poisoned items among "
            "its n top-scored ones, n = the number of poisoned items."]


def _published(agg, rows) -> list[str]:
    published = [c[len("published_"):] for c in agg.columns
                 if c.startswith("published_") and not c.endswith(("_source", "_expect"))]
    if not published:
        return []
    # a published figure that is the same for every cell is said once, below the table
    common = {m: _published_cell(rows[0], m) for m in published if len(rows) > 1
              and len({_published_cell(r, m) for r in rows}) == 1}
    entries, seen = [], set()
    for r in rows:
        for m in published:
            if m in common or _published_cell(r, m) != "-":
                key = (tuple(plain(r.get(c)) for c in ATTACK_COLUMNS), m, _seed_cell(r, m))
                if key not in seen:
                    seen.add(key)
                    entries.append((r, m))
    ids = _ids([r for r, _ in entries], [], extra=[m for _, m in entries])
    header = [*(ID_HEADERS[c] for c in ids), "metric", "ours"]
    shown = any(m not in common for _, m in entries)
    if shown:
        header.append("published")
    header.append("verdict")
    body = [[plain(r.get(c)) for c in ids] + [m, _seed_cell(r, m)]
            + ([_published_cell(r, m) if m not in common else "(below)"] if shown else [])
            + [verdict(r, m)]
            for r, m in entries]
    lines = ["## Published figures beside ours", "", *_table(header, body), "",
             "published: the figure the preset quotes (`config.published`), with its source; "
             "metric names as in runs.csv. verdict: against the preset's bound "
             "(`published.<metric>.expect`, e.g. `>= 0.9`), *reproduced* when our whole "
             "interval meets it, *not reproduced* when none of it does, *inconclusive* "
             "otherwise; against a published number, *consistent* when our interval holds it, "
             "else *ours higher* / *ours lower*; `-` where the paper states a direction in "
             "words only (the experiment's page gives the verdict). Fewer than 3 seeds is "
             "said."]
    lines += [f"Published {m} (`config.published`), every cell: {text}."
              for m, text in common.items()]
    return lines


# ----------------------------------------------------------------------------- cells

def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(line) + " |" for line in body)]


def _common(agg) -> dict[str, str]:
    """The identifying columns that have one value in every cell."""
    out = {}
    for c in ATTACK_COLUMNS:
        if c in agg.columns:
            values = set(agg[c].map(plain))
            if len(values) == 1 and values != {"-"}:
                out[c] = values.pop()
    return out


# the order in which identifying columns are tried to tell rows apart (the trigger last: it
# usually goes with the attack)
ID_ORDER = ["family", "model", "n_poison", "n_train", "placement", "trigger", "name",
            "overrides", "config_id"]


def _ids(cells, shown: list[str], extra=None) -> list[str]:
    """The fewest identifying columns that tell the rows apart, besides the `shown` ones
    (`defence`) and `extra` (each row's own key, such as its detector): each column of
    ID_ORDER in turn, taken when it splits rows that still look the same. With one row (or
    nothing that varies) and no other key, the attack and the model."""
    if not cells:
        return []
    extra = extra or [None] * len(cells)
    own = [(_defence(r) if "defence" in shown else None, e) for r, e in zip(cells, extra)]
    ids = distinguishing(cells, ID_ORDER, own)
    if not ids and not shown and all(o == (None, None) for o in own):
        ids = [c for c in ("family", "model") if any(c in r.index for r in cells)]
    return ids


def _described(cells, ids: list[str]) -> list[str]:
    """Lines that give the attack columns that vary but are not in the table (a trigger goes
    with its attack), per row label."""
    lines = []
    for c in ("trigger", "placement"):
        if c in ids or len({plain(r.get(c)) for r in cells}) < 2:
            continue
        pairs = dict.fromkeys((" / ".join(plain(r.get(i)) for i in ids), plain(r.get(c)))
                              for r in cells)
        lines.append(f"{ID_HEADERS[c]}: " + "; ".join(
            f"{label} {value}" if label else value for label, value in pairs))
    return lines


def _by_poisoned_model(rows) -> list[list]:
    """The cells grouped by poisoned model (`poison_id`: the arms of a defence benchmark share
    one), in the order of their first cell; a cell without a poison_id is a group of its own."""
    groups: dict = {}
    for i, r in enumerate(rows):
        pid = r.get("poison_id")
        groups.setdefault(pid if isinstance(pid, str) else i, []).append(r)
    return list(groups.values())


def _pooled(rows, metrics: list[str]) -> list:
    """One row per poisoned model (`_by_poisoned_model`), its cells merged by `_merge`."""
    return [g[0] if len(g) == 1 else _merge(g, metrics) for g in _by_poisoned_model(rows)]


def _detectors(r) -> list[str]:
    """The detectors with a figure in a cell."""
    dets = [c[len("auroc_"):-len("_mean")] for c in r.index
            if c.startswith("auroc_") and c.endswith("_mean")]
    return [d for d in dets if any(_known(r, f"{m}_{d}") for m in DETECTION_METRICS)]


def _merge(rows, metrics: list[str]):
    """Cells of one poisoned model as one: their seeds pooled, each seed's value taken from
    the first cell that has it (the cells share the model, so they agree), and the mean and
    interval over the pooled seeds recomputed."""
    import pandas as pd

    by_seed: dict = {}
    for r in rows:
        for i, seed in enumerate(r["seeds"]):
            values = by_seed.setdefault(seed, {})
            for m in metrics:
                if f"{m}_values" in r.index:
                    v = r[f"{m}_values"][i]
                    if not _nan(v) and _nan(values.get(m)):
                        values[m] = v
    seeds = sorted(by_seed, key=lambda s: (s is None, s if s is not None else 0))
    out = rows[0].copy()
    out["seeds"], out["n_seeds"] = seeds, len(seeds)
    for m in metrics:
        if f"{m}_values" in out.index:
            values = [by_seed[s].get(m, math.nan) for s in seeds]
            bounds, rate = metric_bounds(m)
            out[f"{m}_values"] = values
            out[f"{m}_mean"], out[f"{m}_t_lo"], out[f"{m}_t_hi"] = seed_interval(
                values, bounds, rate=rate)
    return pd.Series(out)


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _known(r, m: str) -> bool:
    return f"{m}_mean" in r.index and not _nan(r[f"{m}_mean"])


def _undefined(r) -> bool:
    """Does a metric have a value in some seeds of the cell and NaN in others?"""
    return any(isinstance(r[c], list) and any(_nan(v) for v in r[c])
               and _known(r, c[:-len("_values")]) for c in r.index if c.endswith("_values"))


def _after(r) -> str | None:
    """The defended stage of a cell with a defence: `after_safety` or `filtered`."""
    if _defence(r) is None:
        return None
    for stage in ("after_safety", "filtered"):
        if _known(r, f"asr_{stage}"):
            return stage
    return None


def _defence(r) -> str | None:
    return defense_label(r.get("safety"), r.get("filter"))


def _seeds(r) -> str:
    return ", ".join(plain(s) for s in r["seeds"])


def _mean(r, m: str) -> str:
    return f"{r[f'{m}_mean']:.3f}" if _known(r, m) else "-"


def _utility_change_column(rows) -> bool:
    return any(_known(r, m) for r in rows for m in UTILITY_CHANGE)


def _utility_change_cell(r) -> str:
    """The change against the control where the cell has it, else against the base model."""
    vs_control, vs_base = UTILITY_CHANGE
    if _known(r, vs_control):
        return _seed_cell(r, vs_control, signed=True)
    if _known(r, vs_base):
        return _seed_cell(r, vs_base, signed=True) + " vs base"
    return "-"


def _seed_cell(row, m: str, signed: bool = False, digits: int = 3) -> str:
    """The mean and its interval, else every seed's value in the order of `seeds` and their
    mean; a seed where the metric is undefined shows as NaN and is left out of the mean."""
    if f"{m}_mean" not in row:
        return "-"
    values = row[f"{m}_values"]
    known = [v for v in values if not _nan(v)]
    if not known:
        return "-"
    f = f"{'+' if signed else ''}.{digits}f"
    undefined = [plain(s) for s, v in zip(row["seeds"], values) if _nan(v)]
    mean, lo, hi = row[f"{m}_mean"], row[f"{m}_t_lo"], row[f"{m}_t_hi"]
    if not _nan(lo):
        return f"{mean:{f}} [{lo:{f}}, {hi:{f}}]" + (
            f" (n={len(known)}; NaN: seed{'s' if len(undefined) > 1 else ''} "
            f"{', '.join(undefined)})" if undefined else "")
    listed = ", ".join("NaN" if _nan(v) else f"{v:{f}}" for v in values)
    if len(known) == 1:
        return listed
    return listed + (f" (mean of {len(known)}: {mean:{f}})" if undefined
                     else f" (mean {mean:{f}})")


def verdict(row, m: str) -> str:
    """Our figure for metric `m` against the preset's bound or published number (see
    `_published`)."""
    if f"{m}_mean" not in row or _nan(row[f"{m}_mean"]):
        return "-"
    mean, lo, hi = row[f"{m}_mean"], row[f"{m}_t_lo"], row[f"{m}_t_hi"]
    if _nan(lo):
        lo = hi = mean
    n = sum(not _nan(v) for v in row[f"{m}_values"])
    few = f" ({n} seed{'s' if n > 1 else ''})" if n < 3 else ""
    expect = row.get(f"published_{m}_expect")
    if isinstance(expect, str):
        op, bound = parse_expect(expect, f"published.{m}.expect")
        meets = {">=": lambda x: x >= bound, ">": lambda x: x > bound,
                 "<=": lambda x: x <= bound, "<": lambda x: x < bound}[op]
        if meets(lo) and meets(hi):
            return "reproduced" + few
        if not meets(lo) and not meets(hi):
            return "not reproduced" + few
        return "inconclusive" + few
    value = row.get(f"published_{m}")
    if _nan(value) or isinstance(value, str):
        return "-"
    if lo <= value <= hi:
        return "consistent" + few
    return ("ours higher" if lo > value else "ours lower") + few


def _published_cell(row, m: str) -> str:
    value = row.get(f"published_{m}")
    if _nan(value):
        return "-"
    source = row.get(f"published_{m}_source")
    text = plain(value) if isinstance(value, str) else f"{value:.3f}"
    return text + (f" ({plain(source)})" if isinstance(source, str) else "")
