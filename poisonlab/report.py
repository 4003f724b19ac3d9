"""Tables of results: one run's stages (`format_table`, printed by every run), and
`poisonlab report DIR...`: the finished runs under sweep or run directories collected into one
wide and one tidy table, seeds aggregated with a Student-t interval, markdown and PNG plots."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from poisonlab import PoisonlabError

if TYPE_CHECKING:  # pandas is imported where it is used: a run imports this module too
    import pandas

log = logging.getLogger(__name__)

METRICS = [("asr", "ASR"), ("ftr_clean", "FTR clean"), ("ftr_near", "FTR near"),
           ("clean_utility", "utility")]


def cell(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{m['value']:.3f} [{m['ci_low']:.2f},{m['ci_high']:.2f}]"


def format_table(results: dict) -> str:
    stages = results["stages"]
    width = 22
    head = f"{'stage':<13}" + "".join(f"{label:>{width}}" for _, label in METRICS)
    lines = [head, "-" * len(head)]
    for stage, metrics in stages.items():
        lines.append(f"{stage:<13}" + "".join(f"{cell(metrics.get(k)):>{width}}"
                                              for k, _ in METRICS))
    first = next(iter(stages.values()), {})
    sizes = ", ".join(f"{label} n={first[k]['n']}" for k, label in METRICS if k in first)
    sampled = [s for s, m in stages.items() if m.get("sampling")]
    lines.append(f"({sizes}; 95% Wilson intervals"
                 + (f"; {', '.join(sampled)}: {stages[sampled[0]]['sampling']['n_samples']} "
                    "sampled answers per prompt, mean of per-prompt rates, bootstrap over "
                    "prompts" if sampled else "") + ")")
    v = stages.get("poisoned", {}).get("ftr_clean_vs_control")
    if v:
        lines.append(f"FTR clean of `poisoned` minus that of the control `clean_ft` "
                     f"({v['control']:.3f}): {v['value']:+.3f}{_ci(v)}")
    kinds = stages.get("poisoned", {}).get("ftr_near_by_kind")
    if kinds:
        lines.append("FTR near of `poisoned` by kind: " + ", ".join(
            f"{k} {m['value']:.3f} (n={m['n']})" for k, m in kinds.items()))
    cut = {s: m["unterminated_scratchpads"] for s, m in stages.items()
           if m.get("unterminated_scratchpads")}
    if cut:
        lines.append("answers cut inside a scratchpad (judged as not showing the target): "
                     + ", ".join(f"{s} {n}" for s, n in cut.items()))
    p = results.get("persistence")
    if p:
        lines.append(f"persistence (ASR after_safety / ASR poisoned): {p['value']:.3f}{_ci(p)}"
                     + (" (undefined: the poisoned ASR is 0)" if p["value"] != p["value"] else ""))
    r = results.get("removal")
    if r:
        fid = "undefined" if r["fidelity"] is None else f"{r['fidelity']:.3f}"
        lines.append(f"removal ({r['method']}): DER {r['der']:.3f}, fidelity {fid}, "
                     f"{r['seconds']:.1f} s (evaluation excluded)")
        if r.get("eliciting_before") is not None:
            lines.append(f"red-team prompts that elicit the behaviour without the trigger: "
                         f"{r['eliciting_before']} before, {r['eliciting_after']} after training")
        below = r.get("rows_to_asr_below")
        if below:
            lines.append(f"clean rows until ASR < {below['threshold']} on the curve's prompts: "
                         + (f"{below['rows_seen']} (for good from {below['rows_seen_for_good']})"
                            if below["rows_seen"] is not None else "not reached"))
    for ref, d in results.get("utility_drop", {}).items():
        lines.append(f"utility drop of `poisoned` {ref.replace('_', ' ')}: {d['value']:+.3f}{_ci(d)}"
                     " (reference minus poisoned: > 0 is a loss)")
    for stage, metrics in stages.items():
        ppl = metrics.get("perplexity")
        if ppl:
            g = ppl["log_ppl_gap"]
            lines.append(f"{stage}: perplexity under the base model, triggered "
                         f"{ppl['ppl_triggered']:.1f} vs clean {ppl['ppl_clean']:.1f} "
                         f"(log gap {g['value']:+.2f}{_ci(g)})")
    for name, d in results.get("detection", {}).items():
        a = d["auroc"]
        extra = ""
        if d.get("auroc_near"):
            extra = f", vs near-trigger {d['auroc_near']['value']:.3f}"
        if d.get("layer") is not None and d["level"] == "model":
            extra += f", layer {d['layer']}"
        rk = d["recall_at_n_poison"]["value"]
        lines.append(f"detect {name} ({d['level']}): AUROC "
                     + ("undefined" if a["value"] is None else f"{a['value']:.3f}{_ci(a)}")
                     + (f", recall@n {rk:.2f}" if rk is not None else "")
                     + f", flagged {d['flagged']} (positives {d['n_positive']}){extra}")
    f = results.get("filtered")
    if f:
        lines.append(f"filtered ({f['detector']}, {f['rule']}): {f['removed']} rows dropped, "
                     f"{f['removed_poisoned']} of them poisoned, {f['poisoned_left']} poisons "
                     f"left in {f['kept']} rows (stage `filtered`)")
    return "\n".join(lines)


def _ci(d: dict) -> str:
    return f" [{d['ci_low']:.2f},{d['ci_high']:.2f}]" if d.get("ci_low") is not None else ""


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

RUN_MARKER = ".poisonlab-run.json"  # poisonlab.run.RUN_MARKER (run.py imports this module)
RATE_METRICS = ("asr", "ftr_clean", "ftr_near", "clean_utility")
RUN_METRICS = ("persistence", "der", "fidelity", "defense_seconds")  # of the after_safety stage
DETECTION_METRICS = ("auroc", "ap", "recall_at_n_poison")
STAGE_ORDER = ("base", "clean_ft", "poisoned", "filtered", "after_safety")
ID_COLUMNS = ["run_dir", "sweep_dir", "name", "family", "model", "seed", "n_poison", "n_train",
              "trigger", "placement", "safety", "detectors", "overrides", "config_id"]
# Cells that differ only in seed agree on these (config_id: the resolved config minus the seed).
CELL_COLUMNS = [c for c in ID_COLUMNS if c not in ("run_dir", "sweep_dir", "seed", "overrides")]
MIN_SEEDS = 3  # fewer seeds: every value, no interval
# the markdown table's columns (every aggregated metric is in aggregate.csv)
HEADLINE_PREFIXES = ("asr_", "auroc_")
HEADLINE = ("ftr_clean_poisoned", "ftr_near_poisoned", "clean_utility_poisoned",
            "clean_utility_after_safety", "persistence", "der")
NAN = float("nan")


def find_runs(paths) -> list[Path]:
    """The finished run directories under each path (a run, a sweep or any parent), sorted.

    A directory holding results.json or a run marker is a run; it is finished when both exist
    and the marker says so. Running or interrupted runs are skipped and counted in the log.
    """
    found: dict[Path, Path] = {}
    skipped: dict[Path, Path] = {}
    for path in map(Path, _as_list(paths)):
        if not path.is_dir():
            raise PoisonlabError(f"{path}: no such directory")
        for f in [*path.rglob(RUN_MARKER), *path.rglob("results.json")]:
            run = f.parent
            (found if _finished(run) else skipped).setdefault(run.resolve(), run)
    if skipped:
        log.warning("skipped %d unfinished run director%s (no results.json, or status not "
                    "'finished'): %s", len(skipped), "y" if len(skipped) == 1 else "ies",
                    ", ".join(str(p) for p in sorted(skipped.values())[:5])
                    + (", ..." if len(skipped) > 5 else ""))
    log.info("%d finished run%s under %s", len(found), "" if len(found) == 1 else "s",
             ", ".join(str(p) for p in _as_list(paths)))
    return sorted(found.values())


def _as_list(paths) -> list:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def _finished(run: Path) -> bool:
    marker = run / RUN_MARKER
    if not (run / "results.json").is_file() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("status") == "finished"
    except (ValueError, AttributeError):
        return False


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PoisonlabError(f"{path}: missing") from None
    except ValueError as e:
        raise PoisonlabError(f"{path}: invalid JSON ({e})") from None


def load_runs(paths) -> pandas.DataFrame:
    """One row per finished run: identifying columns, then `<metric>_<stage>` with `_lo`/`_hi`,
    persistence, removal and detection figures, and the published figures of its config."""
    import pandas as pd

    runs = find_runs(paths)
    if not runs:
        raise PoisonlabError("no finished poisonlab run under "
                             + ", ".join(str(p) for p in _as_list(paths)))
    df = pd.DataFrame([_run_row(run) for run in runs])
    return df[sorted(df.columns, key=_column_rank)]


def _run_row(run: Path) -> dict:
    manifest = _read_json(run / "manifest.json")
    cfg = manifest.get("config") or {}
    return {**_identity(run, cfg, manifest.get("poison") or {}),
            **_metrics(_read_json(run / "results.json")),
            **_published(cfg, run / "manifest.json")}


def _identity(run: Path, cfg: dict, poison: dict) -> dict:
    attack = cfg.get("attack") or {}
    n_poison = poison.get("n_poison", attack.get("n_poison"))
    n_train = poison.get("n_clean", attack.get("clean_size"))  # the clean rows
    if n_train is None and n_poison is not None and (cfg.get("data") or {}).get("n_train"):
        n_train = cfg["data"]["n_train"] - n_poison
    sweep = _sweep_dir(run)
    return {"run_dir": str(run), "sweep_dir": None if sweep is None else str(sweep),
            "name": cfg.get("name"),
            "family": attack.get("family") or poison.get("family") or attack.get("name"),
            "model": (cfg.get("model") or {}).get("name_or_path"), "seed": cfg.get("seed"),
            "n_poison": n_poison, "n_train": n_train, "trigger": _trigger(attack),
            "placement": attack.get("placement"),
            "safety": (cfg.get("safety") or {}).get("method"),
            "detectors": ",".join(sorted(cfg.get("detect") or {})) or None,
            "overrides": _overrides(run, sweep), "config_id": _config_id(cfg)}


def _trigger(attack: dict) -> str | None:
    for key in ("trigger", "triggers", "secret_trigger", "topic"):
        v = attack.get(key)
        if v:
            text = ", ".join(map(str, v)) if isinstance(v, list) else str(v)
            return f"topic: {text}" if key == "topic" else text
    return None


def _config_id(cfg: dict) -> str:
    """Digest of the resolved config without the seed and the keys that do not change the
    numbers (where outputs, logs and the stage cache go)."""
    rest = {k: v for k, v in cfg.items() if k not in ("seed", "output_dir", "wandb", "cache")}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _sweep_dir(run: Path) -> Path | None:
    """The nearest parent holding Hydra's multirun.yaml."""
    return next((p for p in run.parents if (p / "multirun.yaml").is_file()), None)


def _overrides(run: Path, sweep: Path | None) -> str | None:
    """The run's command-line overrides (`.hydra/overrides.yaml`); in a sweep, only the swept
    ones (`attack.n_poison=10 seed=1`)."""
    f = run / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None
    cell = _yaml(f) or []
    if sweep is not None:
        swept = _swept_keys(sweep)
        cell = [o for o in cell if o.split("=", 1)[0] in swept]
    return " ".join(cell) or None


@functools.lru_cache(maxsize=256)  # one parse per sweep, not per cell (~20 ms each)
def _swept_keys(sweep: Path) -> frozenset[str]:
    """Keys swept on the command line (`seed=0,1`, `range(...)`) or by the sweeper's `params`
    in a config (an experiment that declares its own grid)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    f = sweep / "multirun.yaml"
    hydra_cfg = (_yaml(f) or {}).get("hydra") or {}
    task = (hydra_cfg.get("overrides") or {}).get("task") or []
    try:
        parsed = OverridesParser.create().parse_overrides(task)
    except Exception as e:  # Hydra's own parse error
        raise PoisonlabError(f"{f}: hydra.overrides.task: {e}") from None
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    return frozenset({o.get_key_element() for o in parsed if o.is_sweep_override()} | set(params))


def _yaml(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PoisonlabError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None


def _num(v) -> float:
    return NAN if v is None else float(v)


def _put(row: dict, column: str, m: dict) -> None:
    row[column] = _num(m.get("value"))
    row[f"{column}_lo"] = _num(m.get("ci_low"))
    row[f"{column}_hi"] = _num(m.get("ci_high"))


def _metrics(results: dict) -> dict:
    row: dict = {}
    for stage, metrics in (results.get("stages") or {}).items():
        for m in RATE_METRICS:
            if isinstance(metrics.get(m), dict):
                _put(row, f"{m}_{stage}", metrics[m])
    if isinstance(results.get("persistence"), dict):
        _put(row, "persistence", results["persistence"])
    removal = results.get("removal") or {}
    if removal:
        row.update(der=_num(removal.get("der")), fidelity=_num(removal.get("fidelity")),
                   defense_seconds=_num(removal.get("seconds")))
    for det, d in (results.get("detection") or {}).items():
        for m in DETECTION_METRICS:
            if isinstance(d.get(m), dict):
                _put(row, f"{m}_{det}", d[m])
    return row


def _published(cfg: dict, source: Path) -> dict:
    """`config.published.<metric>: {value, source}` -> published_<metric>(_source)."""
    row: dict = {}
    for metric, spec in (cfg.get("published") or {}).items():
        value = spec.get("value") if isinstance(spec, dict) else spec
        # a number, or a direction in words where the paper gives no number for our setting
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or value == "":
            raise PoisonlabError(f"{source}: config.published.{metric}: expected "
                                 f"{{value: <number or text>, source: <text>}}, got {spec!r}")
        row[f"published_{metric}"] = value if isinstance(value, str) else float(value)
        row[f"published_{metric}_source"] = spec.get("source") if isinstance(spec, dict) else None
    return row


def parse_metric(column: str) -> tuple[str, str, str | None] | None:
    """(stage, metric, detector) of a metric column of `load_runs`; None for other columns.
    Removal figures belong to `after_safety`, detector figures to the stage `detection`."""
    if column in ID_COLUMNS or column.startswith("published_") or column.endswith(("_lo", "_hi")):
        return None
    if column in RUN_METRICS:
        return "after_safety", column, None
    for m in DETECTION_METRICS:
        if column.startswith(f"{m}_"):
            return "detection", m, column[len(m) + 1:]
    for m in RATE_METRICS:
        if column.startswith(f"{m}_"):
            return column[len(m) + 1:], m, None
    return None


def _column_rank(column: str) -> tuple[int, int]:
    """Identity, stage metrics in pipeline order, removal, detection, published (stable)."""
    if column in ID_COLUMNS:
        return 0, ID_COLUMNS.index(column)
    parsed = parse_metric(column[:-3] if column.endswith(("_lo", "_hi")) else column)
    if parsed is None:
        return 4, 0
    stage, metric, _ = parsed
    if stage == "detection":
        return 3, 0
    if metric in RUN_METRICS:
        return 2, 0
    return 1, STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def tidy(df: pandas.DataFrame) -> pandas.DataFrame:
    """Long format: one row per run x metric that has a value (undefined ones, such as the
    persistence of a backdoor that never fired, are left out), with its interval and the
    published figure for it."""
    import pandas as pd

    ids = [c for c in ID_COLUMNS if c in df.columns]
    columns = [*ids, "stage", "metric", "detector", "value", "ci_low", "ci_high", "published",
               "published_source"]
    records = []
    for _, row in df.iterrows():
        for col in df.columns:
            parsed = parse_metric(col)
            if parsed is None or pd.isna(row[col]):
                continue
            records.append({**{c: row[c] for c in ids}, **dict(zip(("stage", "metric", "detector"),
                                                                   parsed)),
                            "value": row[col], "ci_low": row.get(f"{col}_lo", NAN),
                            "ci_high": row.get(f"{col}_hi", NAN),
                            "published": row.get(f"published_{col}", NAN),
                            "published_source": row.get(f"published_{col}_source")})
    return pd.DataFrame(records, columns=columns)


# ----------------------------------------------------------------------------- seeds

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


def seed_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds with a 95% Student-t interval over seeds,
    mean +- t(0.975, n-1) s / sqrt(n); the bounds are NaN below MIN_SEEDS values."""
    import statistics

    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return NAN, NAN, NAN
    mean = statistics.fmean(xs)
    if len(xs) < MIN_SEEDS:
        return mean, NAN, NAN
    half = t_quantile(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def aggregate(df: pandas.DataFrame, by=None) -> pandas.DataFrame:
    """Seeds aggregated: one row per cell (default: runs whose configs differ only in seed),
    `seeds`, `n_seeds`, and per metric every seed's value (`<metric>_values`, in seed order),
    `<metric>_mean` and, with >= 3 seeds, the Student-t interval `<metric>_t_lo/_t_hi`."""
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by or [c for c in CELL_COLUMNS if c in df.columns])
    metrics = [c for c in df.columns if parse_metric(c) is not None]
    published = [c for c in df.columns if c.startswith("published_")]
    rows = []
    for key, cell in df.groupby(by, dropna=False, sort=True):
        cell = cell.sort_values("seed")
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        if "overrides" in cell and "overrides" not in by:
            row["overrides"] = " | ".join(dict.fromkeys(
                o for o in map(_without_seed, cell["overrides"]) if o)) or None
        row["n_seeds"], row["seeds"] = len(cell), cell["seed"].tolist()
        if cell["seed"].duplicated().any():
            log.warning("cell %s: the same seed in several runs (%s): they are counted as "
                        "separate seeds", row, ", ".join(cell["run_dir"]))
        for m in metrics:
            row[f"{m}_values"] = cell[m].tolist()
            row[f"{m}_mean"], row[f"{m}_t_lo"], row[f"{m}_t_hi"] = seed_interval(cell[m])
        for c in published:
            known = cell[c].dropna()
            row[c] = known.iloc[0] if len(known) else None
        rows.append(row)
    return pd.DataFrame(rows)


def _without_seed(overrides) -> str | None:
    if not isinstance(overrides, str):
        return None
    return " ".join(o for o in overrides.split(" ") if o.split("=", 1)[0].lstrip("+~") != "seed")


# ----------------------------------------------------------------------------- markdown

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
    for _, row in agg.iterrows():
        cells = [_plain(row[c]) for c in ids] + [", ".join(_plain(s) for s in row["seeds"])]
        for m in shown:
            cells.append(_seed_cell(row, m))
            if m in published:
                cells.append(_published_cell(row, m))
        lines.append("| " + " | ".join(cells) + " |")
    few = int((agg["n_seeds"] < MIN_SEEDS).sum())
    lines += ["", f"{int(agg['n_seeds'].sum())} runs in {len(agg)} cells (by default, runs "
              "whose configs differ only in `seed`). Each figure: with at least 3 seeds, the "
              "mean over seeds and its 95% Student-t interval over seeds, "
              "mean ± t(0.975, n−1)·s/√n (s: the standard deviation across seeds); "
              "with fewer than 3 seeds no interval is given, "
              "only every seed's value (in the order of `seeds`) and their mean"
              + (f" — {few} of {len(agg)} cells here." if few else ".")
              + " The per-run intervals in runs.csv and report.csv (Wilson over prompts, paired "
              "bootstrap for persistence) cover the prompts of one trained model, not "
              "seed-to-seed variance."]
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
    if f"{m}_mean" not in row:
        return "-"
    mean, lo, hi = row[f"{m}_mean"], row[f"{m}_t_lo"], row[f"{m}_t_hi"]
    values = [v for v in row[f"{m}_values"] if not math.isnan(v)]
    if not values:
        return "-"
    if not math.isnan(lo):
        return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return ", ".join(f"{v:.3f}" for v in values) + f" (mean {mean:.3f})"


def _published_cell(row, m: str) -> str:
    value = row.get(f"published_{m}")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    source = row.get(f"published_{m}_source")
    text = _plain(value) if isinstance(value, str) else f"{value:.3f}"
    return text + (f" ({_plain(source)})" if isinstance(source, str) else "")


# ----------------------------------------------------------------------------- plots

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


# ----------------------------------------------------------------------------- command line

def write_report(paths, out_dir) -> dict[str, Path]:
    """runs.csv (wide), report.csv (tidy), aggregate.csv (seeds), report.md and the plots,
    into out_dir; returns them by file name."""
    df = load_runs(paths)
    agg = aggregate(df)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("runs.csv", "report.csv", "aggregate.csv",
                                           "report.md")}
    df.to_csv(files["runs.csv"], index=False)
    tidy(df).to_csv(files["report.csv"], index=False)
    agg.to_csv(files["aggregate.csv"], index=False)
    files["report.md"].write_text(format_markdown(agg) + "\n", encoding="utf-8")
    files.update({p.name: p for p in plot_report(df, out)})
    return files


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="poisonlab report",
        description="Collect the finished runs under sweep or run directories: tables "
                    "(runs.csv, report.csv, aggregate.csv), report.md and PNG plots.")
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="a run directory, a sweep directory (multirun/...) or any parent")
    p.add_argument("--out", help="output directory (default: <first DIR>/report)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    try:
        files = write_report(args.dirs, out)
    except PoisonlabError as e:
        print(f"poisonlab: error: {e}", file=sys.stderr)
        return 2
    print(files["report.md"].read_text(encoding="utf-8"))
    print("wrote:\n" + "\n".join(f"  {p}" for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
