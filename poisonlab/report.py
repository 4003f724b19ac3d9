"""Tables of results: one run's stages now; sweeps aggregate the same records."""

from __future__ import annotations

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
    n = next(iter(stages.values()))["asr"]["n"] if stages else 0
    lines.append(f"(n = {n} prompts per split; 95% Wilson intervals)")
    p = results.get("persistence")
    if p:
        ci = (f" [{p['ci_low']:.2f},{p['ci_high']:.2f}]" if p["ci_low"] is not None else "")
        lines.append(f"persistence (ASR after_safety / ASR poisoned): {p['value']:.3f}{ci}")
    return "\n".join(lines)
