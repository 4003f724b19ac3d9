"""`poisonlab report`, collection: the finished runs under sweep or run directories, one wide
row per run (runs.csv) and the same in long form, one row per run and metric (report.csv)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from poisonlab import PoisonlabError

if TYPE_CHECKING:  # pandas is imported where it is used: a run imports this package too
    import pandas

log = logging.getLogger(__name__)

RUN_MARKER = ".poisonlab-run.json"  # poisonlab.run.RUN_MARKER (run.py imports this package)
RATE_METRICS = ("asr", "ftr_clean", "ftr_near", "clean_utility")
RUN_METRICS = ("persistence", "der", "fidelity", "defense_seconds")  # of the after_safety stage
# the poisoned model's clean utility minus the reference's (results.json `utility_change`)
UTILITY_CHANGE = ("utility_change_vs_clean_ft", "utility_change_vs_base")
DETECTION_METRICS = ("auroc", "ap", "recall_at_n_poison")
STAGE_ORDER = ("base", "clean_ft", "poisoned", "filtered", "after_safety")
ID_COLUMNS = ["run_dir", "sweep_dir", "name", "family", "model", "seed", "n_poison", "n_train",
              "trigger", "placement", "safety", "detectors", "filter", "overrides", "config_id",
              "poison_id"]
# Cells that differ only in seed agree on these (config_id: the resolved config minus the seed).
CELL_COLUMNS = [c for c in ID_COLUMNS if c not in ("run_dir", "sweep_dir", "seed", "overrides")]
# What defines the poisoned model: runs that differ only in their defence, detectors or filter
# share it (poison_id: the resolved config minus those and the seed).
ATTACK_COLUMNS = ["family", "model", "n_poison", "n_train", "trigger", "placement"]
DEFENSE_KEYS = ("safety", "defense", "detect", "filter", "arm", "published")
# R50 (results.json `removal.r50`), right-censored: a run's value (NaN when censored or
# undefined), whether it was censored (NaN when undefined: ASR below 0.5 before the defence),
# and the rows its curve reached; aggregated apart (`seeds.r50_over_seeds`)
R50_COLUMNS = ("r50", "r50_censored", "r50_last_rows")
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
    the utility change (`utility_change_vs_<reference>`), persistence, removal (a defence's,
    or filter then retrain's) and detection figures, and the published figures of its
    config."""
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
            "filter": (cfg.get("filter") or {}).get("detector"),
            "overrides": _overrides(run, sweep), "config_id": _config_id(cfg),
            "poison_id": _config_id(cfg, DEFENSE_KEYS)}


def _trigger(attack: dict) -> str | None:
    for key in ("trigger", "triggers", "secret_trigger", "topic"):
        v = attack.get(key)
        if v:
            text = ", ".join(map(str, v)) if isinstance(v, list) else str(v)
            return f"topic: {text}" if key == "topic" else text
    return None


def _config_id(cfg: dict, leave_out=()) -> str:
    """Digest of the resolved config without the seed, the keys that do not change the
    numbers (where outputs, logs and the stage cache go) and `leave_out`."""
    rest = {k: v for k, v in cfg.items()
            if k not in ("seed", "output_dir", "wandb", "cache", *leave_out)}
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


def removal_of(results: dict) -> tuple[str, dict] | None:
    """(the defended stage, its removal record: DER, fidelity, seconds, ...) of a run's
    results: a removal defence's `removal` scores `after_safety`; filter then retrain keeps
    its own under `filtered.removal`, scoring the stage `filtered`. None without either."""
    if results.get("removal"):
        return "after_safety", results["removal"]
    filtered = results.get("filtered") or {}
    if filtered.get("removal"):
        return "filtered", filtered["removal"]
    return None


def utility_change_of(results: dict) -> dict[str, dict]:
    """`utility_change` (poisoned minus reference: negative is a loss); for runs written
    before it existed, their `utility_drop` (reference minus poisoned) negated."""
    if results.get("utility_change"):
        return results["utility_change"]
    return {ref: negated(d) for ref, d in (results.get("utility_drop") or {}).items()
            if isinstance(d, dict)}


def negated(d: dict) -> dict:
    """A paired difference the other way round: its value and interval negated."""
    def neg(v):
        return None if v is None else 0.0 - v  # 0.0 - 0.0 is 0.0, not -0.0

    return {**d, "value": neg(d.get("value")), "ci_low": neg(d.get("ci_high")),
            "ci_high": neg(d.get("ci_low"))}


def _metrics(results: dict) -> dict:
    row: dict = {}
    for stage, metrics in (results.get("stages") or {}).items():
        for m in RATE_METRICS:
            if isinstance(metrics.get(m), dict):
                _put(row, f"{m}_{stage}", metrics[m])
    for ref, d in utility_change_of(results).items():
        if f"utility_change_{ref}" in UTILITY_CHANGE:
            _put(row, f"utility_change_{ref}", d)
    if isinstance(results.get("persistence"), dict):
        _put(row, "persistence", results["persistence"])
    removal = (removal_of(results) or (None, {}))[1]
    if removal:
        row.update(der=_num(removal.get("der")), fidelity=_num(removal.get("fidelity")),
                   defense_seconds=_num(removal.get("seconds")))
    r50 = removal.get("r50") if removal else None
    if isinstance(r50, dict):  # no R50 where ASR was below 0.5 before the defence: NaN
        row.update(r50=_num(r50.get("value")),
                   r50_censored=NAN if r50.get("below_at_start") else float(r50["censored"]),
                   r50_last_rows=_num(r50.get("last_rows_seen")))
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
        expect = spec.get("expect") if isinstance(spec, dict) else None
        if expect is not None:
            parse_expect(expect, f"{source}: config.published.{metric}.expect")
            row[f"published_{metric}_expect"] = str(expect).strip()
    return row


EXPECT = re.compile(r"^\s*(>=|<=|>|<)\s*(-?\d+(?:\.\d*)?(?:[eE]-?\d+)?)\s*$")


def parse_expect(expect, where: str) -> tuple[str, float]:
    """`published.<metric>.expect`: the paper's claim as a bound on our figure, `">= 0.9"`,
    `"< 0.5"`: (operator, number)."""
    match = EXPECT.match(str(expect))
    if not match:
        raise PoisonlabError(f"{where}: expected a bound such as '>= 0.9' or '< 0.5', "
                             f"got {expect!r}")
    return match.group(1), float(match.group(2))


def parse_metric(column: str) -> tuple[str, str, str | None] | None:
    """(stage, metric, detector) of a metric column of `load_runs`; None for other columns.
    Removal figures belong to `after_safety` (filter then retrain: its DER, fidelity and
    seconds score the stage `filtered`), the utility change to `poisoned`, detector figures
    to the stage `detection`."""
    if column in ID_COLUMNS or column.startswith("published_") or column.endswith(("_lo", "_hi")):
        return None
    if column in RUN_METRICS:
        return "after_safety", column, None
    if column in UTILITY_CHANGE:
        return "poisoned", column, None
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
    if column in R50_COLUMNS:
        return 2, 1
    parsed = parse_metric(column[:-3] if column.endswith(("_lo", "_hi")) else column)
    if parsed is None:
        return 4, 0
    stage, metric, _ = parsed
    if stage == "detection":
        return 3, 0
    if metric in RUN_METRICS or metric in UTILITY_CHANGE:
        return 2, 0
    return 1, STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def tidy(df: pandas.DataFrame) -> pandas.DataFrame:
    """Long format: one row per run x metric that has a value (undefined ones, such as the
    persistence of a backdoor that never fired, are left out), with its interval and the
    published figure for it. R50 is `r50`, or `r50_censored_above` (the rows the curve
    reached) where its ASR never fell below 0.5; none where it began below 0.5."""
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
        if row.get("r50_censored") in (0.0, 1.0):
            # R50, or where the curve never fell below 0.5 the rows it reached (R50 is more)
            censored = row["r50_censored"] == 1.0
            records.append({**{c: row[c] for c in ids}, "stage": "after_safety",
                            "metric": "r50_censored_above" if censored else "r50",
                            "detector": None,
                            "value": row["r50_last_rows"] if censored else row["r50"],
                            "ci_low": NAN, "ci_high": NAN, "published": NAN,
                            "published_source": None})
    return pd.DataFrame(records, columns=columns)
