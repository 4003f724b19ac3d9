"""Sweep benchmark: the 2 attacks x 3 defences x 2 seeds grid (`experiment=sweep_grid`) as one
command from an empty stage cache.

Prints, measured in the same run:
  * the sweep's wall time against the sum of the seconds of the stages it computed (each unique
    stage once; goal: wall <= 1.1x that sum; the rest is process start, imports, model loading,
    metrics and writing);
  * stage computations run vs the naive count (every cell from scratch) vs the unique stages
    the grid needs (goal: run == unique);
  * seconds per stage kind, summed over the cells.

    python scripts/sweep_bench.py                 # micro model (debug=default), ~3 min on 2 cores
    python scripts/sweep_bench.py --full          # the default tiny model (tiny:small)
    python scripts/sweep_bench.py -- eval.n_prompts=100   # extra overrides for every cell
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="tiny:small instead of the micro model")
    p.add_argument("--out", type=Path, default=None, help="sweep directory (default: a temp dir)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every cell")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="poisonlab-sweep-bench-") as tmp:
        sweep = args.out or Path(tmp) / "sweep"
        cmd = [sys.executable, "-m", "poisonlab.run", "experiment=sweep_grid",
               *([] if args.full else ["debug=default"]), f"cache.dir={Path(tmp) / 'stages'}",
               f"hydra.sweep.dir={sweep}", *args.overrides]
        print("$", " ".join(cmd), flush=True)
        t = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, POISONLAB_QUIET="1"),
                             capture_output=True, text=True)
        wall = time.perf_counter() - t
        if res.returncode != 0:
            print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
            return res.returncode
        from poisonlab.sweeps import finished_cells, stage_accounting

        cells = finished_cells(sweep)
        acc = stage_accounting(cells)
        computed_s, reused_s, by_kind = 0.0, 0.0, defaultdict(float)
        run_totals = 0.0
        for cell in cells:
            r = json.loads((cell / "results.json").read_text())
            cache = r["cache"]
            for name, sec in cache.get("seconds", {}).items():
                if name in cache["computed"]:
                    computed_s += sec
                    by_kind[name.split("/")[0]] += sec
                else:
                    reused_s += sec
            run_totals += r["timings_s"]["total"]
    print(f"\ncells: {acc['cells']}")
    print(f"stage computations: {acc['computed']} run, {acc['unique']} unique, "
          f"{acc['naive']} naive (each cell from scratch)   goal: run == unique -> "
          f"{'met' if acc['computed'] == acc['unique'] else 'NOT met'}")
    print(f"wall time {wall:.1f} s; sum of the computed stages {computed_s:.1f} s; "
          f"ratio {wall / computed_s:.2f}x (goal <= 1.10x)")
    print(f"  inside the cells: {run_totals:.1f} s (the rest, {wall - run_totals:.1f} s, is "
          "process start, imports and Hydra); reusing stored stages took "
          f"{reused_s:.1f} s in all")
    print("seconds per stage kind (computed):")
    for kind, sec in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<16} {sec:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
