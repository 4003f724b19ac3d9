"""`poisonlab report`, seeds: the runs of a cell (by default, runs whose configs differ only in
seed) aggregated into the mean over seeds with a 95% interval over seeds.

The interval is over seeds (seed-to-seed variance), from at least MIN_SEEDS seeds:

* Rates and other figures on [0, 1] (ASR, FTRs, clean utility, DER, AUROC, AP, recall:
  UNIT_METRICS): the Wilson score interval of the mean with an effective sample size, ``n_eff
  = m(1 − m) / se²`` (m: the mean over seeds, se = s/√n its standard error) and the Student-t
  quantile t(0.975, n−1) in place of z, the design-effect form survey statistics use for
  proportions estimated from clustered samples (Korn & Graubard 1998 do the same for
  Clopper–Pearson). Away from 0 and 1 it is close to the Student-t interval m ± t·se; near
  them it is asymmetric, wider on the side away from the bound, and never leaves [0, 1] (FTRs
  0.70, 0.90, 0.95: Student-t [0.52, 1.18], this one [0.40, 0.98]). Simulated (3 or 5 seeds of
  200 prompts, seed rates logit-normal around 0.5 to 0.99), it covered the mean rate 91–97% of
  the time throughout, where the Student-t interval, clipped to [0, 1], fell to 86–88% with
  spread-out seeds near 1 (about 95% for both at 0.5). A plain Wilson interval over the pooled
  prompts would leave out the seed-to-seed variance, and a bootstrap over 3 to 5 seeds covers
  far less than 95% (its resamples never leave the range of the seeds), so neither is used.
  Every seed at the same value (say all 1.0) gives a zero-width interval, as Student-t does.
* Differences of rates (`utility_change_*`, on [−1, 1]): Student-t, clipped to [−1, 1].
* Persistence (a ratio: above 1 when safety training strengthens the backdoor), fidelity
  (negative when the ASR rose) and the defence's seconds: Student-t, unclipped.
* R50 (clean rows until the persistence curve's ASR fell below 0.5): Student-t, its low end
  clipped at 0 — when no seed is censored. A seed whose curve never fell below 0.5 is
  right-censored (R50 > the rows its curve reached): with one or more, the mean is not known
  and none is given, only the count censored and a bound the mean exceeds (each censored
  seed taken at the rows its curve reached), `r50_over_seeds`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from poisonlab.report.collect import (CELL_COLUMNS, DETECTION_METRICS, NAN, RATE_METRICS,
                                      UTILITY_CHANGE, parse_metric)

R50_KEY = "removal.r50"  # the aggregate's R50 record: {value, ci_low, ci_high, n_seeds, ...}

if TYPE_CHECKING:
    import pandas

log = logging.getLogger(__name__)

MIN_SEEDS = 3  # fewer seeds: every value, no interval
# Proportions (and DER, a rating on [0, 1]): Wilson with an effective n, inside [0, 1].
UNIT_METRICS = (*RATE_METRICS, "der", *DETECTION_METRICS)
DIFFERENCE_METRICS = UTILITY_CHANGE  # differences of two rates: Student-t within [-1, 1]


def t_quantile(df: int, p: float = 0.975) -> float:
    """Student-t quantile for integer degrees of freedom (closed-form CDF, bisection)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + _t_within(mid, df) / 2 < p else (lo, mid)
    return (lo + hi) / 2


def _t_within(t: float, df: int) -> float:
    """P(|T| <= t) for T ~ Student-t(df) (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2.4/3.5 cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1.3/2.4 cos^4 + ...)
    for k in range(1, df // 2):
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return math.sin(theta) * total


def seed_interval(values, bounds: tuple[float, float] | None = None, rate: bool = False
                  ) -> tuple[float, float, float]:
    """(mean, low, high): the mean over the seeds with a value (NaN and None are left out) with
    a 95% interval over them: for a rate (`rate`, values on [0, 1]) the Wilson interval with
    the effective sample size (`wilson_over_seeds`), else Student-t, mean +- t(0.975, n-1)
    s / sqrt(n); its bounds clipped to `bounds` when given. The bounds are NaN below MIN_SEEDS
    values."""
    import statistics

    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return NAN, NAN, NAN
    mean = statistics.fmean(xs)
    if len(xs) < MIN_SEEDS:
        return mean, NAN, NAN
    q = t_quantile(len(xs) - 1)
    se = statistics.stdev(xs) / math.sqrt(len(xs))
    if rate and 0.0 <= mean <= 1.0:
        lo, hi = wilson_over_seeds(mean, se, q)
    else:
        lo, hi = mean - q * se, mean + q * se
    if bounds is not None:
        lo, hi = min(max(lo, bounds[0]), bounds[1]), max(min(hi, bounds[1]), bounds[0])
    return mean, lo, hi


def wilson_over_seeds(mean: float, se: float, q: float) -> tuple[float, float]:
    """The Wilson score interval of a mean rate `mean` with standard error `se` (over seeds):
    the effective sample size n = mean (1 - mean) / se^2 and the quantile `q` (Student-t with
    n_seeds - 1 degrees of freedom). Inside [0, 1]; zero width when se is 0."""
    if se <= 0 or mean <= 0 or mean >= 1:
        return mean, mean
    n = mean * (1 - mean) / se ** 2
    denominator = 1 + q * q / n
    centre = (mean + q * q / (2 * n)) / denominator
    half = q / denominator * math.sqrt(se ** 2 + q * q / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def metric_bounds(column: str) -> tuple[tuple[float, float] | None, bool]:
    """(bounds, is a rate) of a metric column of `load_runs` (or a bare metric name)."""
    parsed = parse_metric(column)
    metric = parsed[1] if parsed is not None else column
    if metric in UNIT_METRICS:
        return (0.0, 1.0), True
    if metric in DIFFERENCE_METRICS:
        return (-1.0, 1.0), False
    return None, False


def aggregate(df: pandas.DataFrame, by=None) -> pandas.DataFrame:
    """Seeds aggregated: one row per cell (default: runs whose configs differ only in seed).

    Runs of the same config and seed are one seed: the first by run directory is used and the
    others are listed in `duplicate_runs`. `seeds` lists the seeds (`run_dirs` the runs used,
    in the same order), `n_seeds` counts them (with `by`, the distinct config and seed pairs).
    Per metric: every seed's value (`<metric>_values`, in seed order, NaN where the metric is
    undefined), the number of seeds with a value (`<metric>_n`) and with NaN
    (`<metric>_n_nan`); over the seeds with a value, their mean (`<metric>_mean`) and, with
    >= 3 of them, the 95% interval `<metric>_t_lo/_t_hi` (t: its quantile is Student-t's):
    Wilson with an effective n for rates (UNIT_METRICS, inside [0, 1]), else Student-t (see
    the module docstring). R50, right-censored, by `r50_over_seeds`."""
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by or [c for c in CELL_COLUMNS if c in df.columns])
    metrics = [c for c in df.columns if parse_metric(c) is not None]
    published = [c for c in df.columns if c.startswith("published_")]
    same = [c for c in ("config_id", "seed") if c in df.columns]  # the same run twice
    rows = []
    for key, cell in df.groupby(by, dropna=False, sort=True):
        cell = cell.sort_values([c for c in ("seed", "run_dir") if c in cell], kind="stable")
        ident = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row = dict(ident)
        if "overrides" in cell and "overrides" not in by:
            row["overrides"] = " | ".join(dict.fromkeys(
                o for o in map(_without_seed, cell["overrides"]) if o)) or None
        duplicate = cell.duplicated(same)
        used = cell[~duplicate]
        row["n_seeds"], row["seeds"] = len(used), used["seed"].tolist()
        if "run_dir" in cell:
            row["run_dirs"] = used["run_dir"].tolist()
            row["duplicate_runs"] = cell.loc[duplicate, "run_dir"].tolist()
        if duplicate.any():
            n = int(duplicate.sum())
            log.warning("cell %s: %d duplicate run%s (same config and seed) left out, the first "
                        "run directory of each seed used: %s", ident, n, "" if n == 1 else "s",
                        ", ".join(map(str, row.get("duplicate_runs", []))))
        for m in metrics:
            values = used[m]
            row[f"{m}_values"] = values.tolist()
            row[f"{m}_n"] = int(values.notna().sum())
            row[f"{m}_n_nan"] = len(values) - row[f"{m}_n"]
            bounds, is_rate = metric_bounds(m)
            row[f"{m}_mean"], row[f"{m}_t_lo"], row[f"{m}_t_hi"] = seed_interval(
                values, bounds, rate=is_rate)
        if "r50" in used:
            row.update(r50_over_seeds(used["r50"], used["r50_censored"], used["r50_last_rows"]))
        for c in published:
            known = cell[c].dropna()
            row[c] = known.iloc[0] if len(known) else None
        rows.append(row)
    return pd.DataFrame(rows)


def r50_over_seeds(values, censored, last_rows) -> dict:
    """R50 of a cell's seeds, in seed order (`load_runs`' r50, r50_censored, r50_last_rows):

    * `r50_values` (NaN where censored or absent), `r50_censored` (per seed; None where the
      seed has no R50), `r50_n` (seeds with an R50, censored or not), `r50_n_censored`,
      `r50_n_undefined` (seeds whose curve began below 0.5: no backdoor to remove);
    * with no seed censored: `r50_mean` and, from MIN_SEEDS seeds, its Student-t interval
      `r50_t_lo` / `r50_t_hi` (the low end clipped at 0);
    * with some censored: `r50_mean` and the interval NaN (the mean is not known) and
      `r50_above` — the mean exceeds it: the mean with each censored seed at the rows its
      curve reached (every seed censored: the mean of those rows);
    * `removal.r50`: the same as {value, ci_low, ci_high, n_seeds, n_censored, above}
      (None for what is not known; the whole record None without an R50)."""
    values, censored, last_rows = list(values), list(censored), list(last_rows)
    have = [not _missing(c) for c in censored]
    cut = [h and c == 1.0 for h, c in zip(have, censored)]
    n, n_cut = sum(have), sum(cut)
    undefined = sum(not h and not _missing(last) for h, last in zip(have, last_rows))
    observed = [v if h and not c else NAN for v, h, c in zip(values, have, cut)]
    mean = lo = hi = above = NAN
    if n and not n_cut:
        mean, lo, hi = seed_interval(observed, (0.0, math.inf))
    elif n_cut:
        import statistics

        above = statistics.fmean(last if c else v for v, last, h, c in
                                 zip(values, last_rows, have, cut) if h)
    known = {"value": mean, "ci_low": lo, "ci_high": hi, "above": above}
    return {"r50_values": observed, "r50_censored": [bool(c) if h else None
                                                     for h, c in zip(have, cut)],
            "r50_n": n, "r50_n_censored": n_cut, "r50_n_undefined": undefined,
            "r50_mean": mean, "r50_t_lo": lo, "r50_t_hi": hi, "r50_above": above,
            R50_KEY: None if not n else {**{k: None if _missing(v) else float(v)
                                            for k, v in known.items()},
                                         "n_seeds": n, "n_censored": n_cut}}


def sweep_order(row) -> tuple:
    """A cell's place in its sweep: its first run's job number (Hydra's subdirectory), so
    that cells follow the grid in the order the sweep declared it."""
    dirs = row.get("run_dirs")
    if not isinstance(dirs, list) or not dirs:
        return ("", 0, "")
    path = Path(dirs[0])
    return (str(path.parent), int(path.name) if path.name.isdigit() else 0, path.name)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _without_seed(overrides) -> str | None:
    if not isinstance(overrides, str):
        return None
    return " ".join(o for o in overrides.split(" ") if o.split("=", 1)[0].lstrip("+~") != "seed")
