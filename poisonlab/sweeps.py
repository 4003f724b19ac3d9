"""Sweeps: the defence benchmark's table and the stage accounting of a multirun.

`BenchmarkCallback` is a Hydra callback (`hydra.callbacks`, see conf/experiment/
defense_benchmark.yaml): when a multirun ends it writes `benchmark.csv` and `benchmark.md` into
the sweep directory, one row per attack x defence (x seed): ASR and utility before (the
`poisoned` stage) and after the defence, DER, fidelity, detection AUROC/AP, seconds. It also
counts the stage computations the sweep ran against the naive count (every cell from scratch)
and the unique stages it needed (`stage_accounting`). `python -m poisonlab.sweeps SWEEP_DIR`
writes the same files for an existing sweep directory.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from poisonlab import PoisonlabError

log = logging.getLogger(__name__)
MARKER = ".poisonlab-run.json"
COLUMNS = ["attack", "defense", "kind", "seed", "n_poison",
           "asr_before", "asr_before_lo", "asr_before_hi", "asr_after", "asr_after_lo",
           "asr_after_hi", "utility_before", "utility_after", "der", "fidelity",
           "auroc", "auroc_lo", "auroc_hi", "ap", "seconds", "stages_computed", "stages_reused",
           "run_dir", "note"]


def _cells(sweep_dir: Path, status: str) -> list[tuple[Path, dict]]:
    found = []
    for marker in Path(sweep_dir).rglob(MARKER):
        try:
            info = json.loads(marker.read_text())
        except ValueError:
            continue
        if info.get("status") == status:
            found.append((marker.parent, info))
    return sorted(found, key=lambda c: [int(p) if p.isdigit() else p for p in c[0].parts])


def finished_cells(sweep_dir: Path) -> list[Path]:
    """The sweep's finished cell directories (a done marker and results.json), in job order."""
    return [d for d, _ in _cells(sweep_dir, "finished") if (d / "results.json").exists()]


def refused_cells(sweep_dir: Path) -> list[tuple[Path, str]]:
    """Cells the pipeline refused (e.g. a defence that does not apply to an attack): (dir,
    reason)."""
    return [(d, info.get("error", "")) for d, info in _cells(sweep_dir, "refused")]


def _override(cell: Path, key: str) -> str | None:
    overrides = cell / ".hydra" / "overrides.yaml"
    if overrides.exists():
        for line in overrides.read_text().splitlines():
            item = line.strip().lstrip("- ").strip("'\"")
            if item.startswith(f"{key}="):
                return item.split("=", 1)[1]
    return None


def _hydra_config(cell: Path) -> dict:
    """The cell's composed config as Hydra saved it ({} when absent)."""
    path = cell / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def _m(metrics: dict | None, key: str) -> tuple[float, float, float]:
    v = (metrics or {}).get(key)
    if not isinstance(v, dict):
        return math.nan, math.nan, math.nan
    return v["value"], v.get("ci_low", math.nan), v.get("ci_high", math.nan)


def cell_rows(cell: Path) -> list[dict]:
    """A cell's rows of the benchmark table: one per removal defence, detector or filter."""
    results = json.loads((cell / "results.json").read_text())
    manifest = json.loads((cell / "manifest.json").read_text())
    config = manifest.get("config", {})
    stages = results["stages"]
    pre = stages.get("poisoned", {})
    asr, asr_lo, asr_hi = _m(pre, "asr")
    cache = results.get("cache", {})
    common = {"attack": config.get("attack", {}).get("name", results.get("name")),
              "seed": config.get("seed"), "n_poison": manifest.get("poison", {}).get("n_poison"),
              "asr_before": asr, "asr_before_lo": asr_lo, "asr_before_hi": asr_hi,
              "utility_before": _m(pre, "clean_utility")[0],
              "stages_computed": len(cache.get("computed", [])),
              "stages_reused": len(cache.get("reused", [])), "run_dir": str(cell)}
    rows = []

    def after(stage: str, removal: dict | None) -> dict:
        a, lo, hi = _m(stages.get(stage), "asr")
        return {"asr_after": a, "asr_after_lo": lo, "asr_after_hi": hi,
                "utility_after": _m(stages.get(stage), "clean_utility")[0],
                "der": (removal or {}).get("der", math.nan),
                "fidelity": (removal or {}).get("fidelity") if (removal or {}).get(
                    "fidelity") is not None else math.nan}

    removal = results.get("removal")
    if removal is not None:
        rows.append({**common, "defense": removal["method"].split(":")[0], "kind": "removal",
                     **after("after_safety", removal), "seconds": removal.get("seconds")})
    filtered = results.get("filtered")
    detection = results.get("detection") or {}
    for name, rec in detection.items():
        if filtered is not None and filtered.get("detector") == name:
            continue  # the filter's own row below carries its detector's AUROC
        auc, lo, hi = _m(rec, "auroc")
        rows.append({**common, "defense": name, "kind": "detector", "auroc": auc,
                     "auroc_lo": lo, "auroc_hi": hi, "ap": _m(rec, "ap")[0],
                     "seconds": rec.get("seconds")})
    if filtered is not None:
        rec = detection.get(filtered["detector"], {})
        auc, lo, hi = _m(rec, "auroc")
        rem = filtered.get("removal")
        rows.append({**common, "defense": f"filter:{filtered['detector']}", "kind": "filter",
                     **after("filtered", rem), "auroc": auc, "auroc_lo": lo, "auroc_hi": hi,
                     "ap": _m(rec, "ap")[0],
                     "seconds": (rem or {}).get("seconds", math.nan) + (rec.get("seconds") or 0)})
    if not rows:  # no defence at all: the poisoned model alone
        rows.append({**common, "defense": _override(cell, "arm") or "none", "kind": "none"})
    return rows


def stage_accounting(cells: list[Path]) -> dict:
    """Stage computations of a sweep: `computed` (what its cells ran), `naive` (every cell
    computing all its stages itself) and `unique` (distinct stages: a cached stage is one
    stage per key, a cell's own stage is one per cell). A sweep that shares its prefixes
    perfectly has computed == unique."""
    computed = naive = 0
    unique: set = set()
    for cell in cells:
        cache = json.loads((cell / "results.json").read_text()).get("cache", {})
        keys = cache.get("keys", {})
        done = cache.get("computed", []) + cache.get("reused", [])
        computed += len(cache.get("computed", []))
        naive += len(done)
        unique.update((s, keys[s]) if s in keys else (str(cell), s) for s in done)
    return {"cells": len(cells), "computed": computed, "naive": naive, "unique": len(unique)}


def benchmark_table(sweep_dir: Path):
    """(pandas DataFrame with `COLUMNS`, stage accounting) for a sweep directory."""
    import pandas as pd

    cells = finished_cells(sweep_dir)
    if not cells:
        raise PoisonlabError(f"{sweep_dir}: no finished run below this directory")
    rows = [r for c in cells for r in cell_rows(c)]
    for cell, reason in refused_cells(sweep_dir):
        config = _hydra_config(cell)
        rows.append({"attack": config.get("attack", {}).get("name", _override(cell, "attack")),
                     "kind": "refused",
                     "defense": _override(cell, "arm") or config.get("safety", {}).get("method"),
                     "seed": config.get("seed"), "run_dir": str(cell), "note": reason})
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    df = df.sort_values(["attack", "kind", "defense", "seed"], kind="stable").reset_index(drop=True)
    return df, stage_accounting(cells)


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if digits == 0:
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(v, lo, hi) -> str:
    return "-" if _fmt(v) == "-" else f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"


def markdown(df, accounting: dict, title: str = "Defence benchmark") -> str:
    """The benchmark table as markdown (ASR and AUROC with their 95% intervals)."""
    head = ["attack", "defence", "seed", "ASR before", "ASR after", "utility before → after",
            "DER", "fidelity", "AUROC", "AP", "seconds"]
    lines = [f"# {title}", "",
             "ASR: 95% Wilson intervals over prompts; AUROC: 95% bootstrap intervals over "
             "training rows for data-level detectors and over prompts for input- and "
             "model-level ones. Before = the `poisoned` stage; after = the defence's model "
             "(`after_safety`, or `filtered` for filter then retrain). DER, the defence "
             "effectiveness rating (BackdoorBench) = (max(0, ΔASR) − max(0, Δutility) + 1) / 2: "
             "1 removed at no utility cost, 0.5 no net effect. Seconds: the defence or detector "
             "itself, evaluation excluded.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    refused = df[df["kind"] == "refused"]
    for r in df[df["kind"] != "refused"].itertuples(index=False):
        util = ("-" if _fmt(r.utility_before) == "-" else
                f"{_fmt(r.utility_before)} → {_fmt(r.utility_after)}"
                if _fmt(r.utility_after) != "-" else _fmt(r.utility_before))
        lines.append("| " + " | ".join([
            str(r.attack), str(r.defense), _fmt(r.seed, 0),
            _ci(r.asr_before, r.asr_before_lo, r.asr_before_hi),
            _ci(r.asr_after, r.asr_after_lo, r.asr_after_hi), util, _fmt(r.der),
            _fmt(r.fidelity), _ci(r.auroc, r.auroc_lo, r.auroc_hi), _fmt(r.ap),
            _fmt(r.seconds, 1)]) + " |")
    if len(refused):
        lines += ["", "Refused cells (the pipeline declined the combination; its one-line "
                  "reason):", ""]
        lines += [f"* {r.attack} × {r.defense} (seed {_fmt(r.seed, 0)}): {r.note}"
                  for r in refused.itertuples(index=False)]
    a = accounting
    lines += ["", f"{a['cells']} cells; stage computations: {a['computed']} run, "
              f"{a['unique']} unique, {a['naive']} if every cell ran from scratch."]
    return "\n".join(lines) + "\n"


def write_benchmark(sweep_dir: Path) -> dict[str, Path]:
    """Write benchmark.csv and benchmark.md into `sweep_dir`; returns their paths."""
    from poisonlab.results import write_json

    sweep_dir = Path(sweep_dir)
    df, accounting = benchmark_table(sweep_dir)
    paths = {"csv": sweep_dir / "benchmark.csv", "md": sweep_dir / "benchmark.md",
             "stages": sweep_dir / "benchmark_stages.json"}
    tmp = paths["csv"].with_suffix(".csv.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(paths["csv"])
    tmp = paths["md"].with_suffix(".md.tmp")
    tmp.write_text(markdown(df, accounting))
    tmp.replace(paths["md"])
    write_json(paths["stages"], accounting)
    log.info("benchmark: %d rows from %d cells; stage computations %d run, %d unique, %d naive; "
             "%s", len(df), accounting["cells"], accounting["computed"], accounting["unique"],
             accounting["naive"], paths["md"])
    return paths


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


class BenchmarkCallback(Callback):
    """Hydra callback: the benchmark table of the sweep directory when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            paths = write_benchmark(sweep_dir)
        except PoisonlabError as e:
            log.error("benchmark table not written: %s", e)
            return
        print(paths["md"].read_text())
        print(f"benchmark: {paths['csv']}, {paths['md']}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m poisonlab.sweeps",
                                description="Write benchmark.csv/.md for a sweep directory.")
    p.add_argument("sweep_dir", type=Path)
    args = p.parse_args(argv)
    try:
        if not args.sweep_dir.is_dir():
            raise PoisonlabError(f"{args.sweep_dir}: no such directory")
        paths = write_benchmark(args.sweep_dir)
    except PoisonlabError as e:
        print(f"poisonlab: error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
