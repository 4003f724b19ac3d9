"""The table every run prints at its end: each stage's rates with their intervals, then the
run-level figures (persistence, removal, utility change, perplexity, detection, filtering)."""

from __future__ import annotations

from poisonlab.report.collect import removal_of, utility_change_of
from poisonlab.report.labels import DER_SHORT

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
    judge = results.get("judge")
    if judge:   # judge=model: the rule judge's figures and the labelled cases beside its own
        lines.append(f"judge: {judge['model']} {judge['path']} ({judge['behaviour']}); rule "
                     "judge on the same answers: " + "; ".join(
                         f"{s} ASR {m['asr_rule']['value']:.3f}, agreement "
                         f"{m['judge_agreement']['triggered']['value']:.3f}"
                         for s, m in stages.items() if "asr_rule" in m))
        c = judge.get("cases") or {}
        if c.get("n"):
            lines.append(f"judge on {c['n']} labelled answers: precision "
                         f"{c['model']['precision']['value']:.2f}, recall "
                         f"{c['model']['recall']['value']:.2f}, AUROC {c['model_auroc']:.2f}"
                         + (f" (rule judge: precision {c['rule']['precision']['value']:.2f}, "
                            f"recall {c['rule']['recall']['value']:.2f})" if "rule" in c else ""))
    cut = {s: m["unterminated_scratchpads"] for s, m in stages.items()
           if m.get("unterminated_scratchpads")}
    if cut:
        lines.append("answers cut inside a scratchpad (judged as not showing the target): "
                     + ", ".join(f"{s} {n}" for s, n in cut.items()))
    p = results.get("persistence")
    if p:
        lines.append(f"persistence (ASR after_safety / ASR poisoned): {p['value']:.3f}{_ci(p)}"
                     + (" (undefined: the poisoned ASR is 0)" if p["value"] != p["value"] else ""))
    scored = removal_of(results)
    if scored:
        stage, r = scored
        fid = "undefined" if r.get("fidelity") is None else f"{r['fidelity']:.3f}"
        lines.append(f"removal ({r['method']}, `{stage}` against `poisoned`): DER "
                     f"{r['der']:.3f}, fidelity {fid}, {r['seconds']:.1f} s (evaluation "
                     f"excluded); {DER_SHORT}")
        if r.get("eliciting_before") is not None:
            lines.append(f"red-team prompts that elicit the behaviour without the trigger: "
                         f"{r['eliciting_before']} before, {r['eliciting_after']} after training")
        below = r.get("rows_to_asr_below")
        if below:
            lines.append(f"clean rows until ASR < {below['threshold']} on the curve's prompts: "
                         + (f"{below['rows_seen']} (for good from {below['rows_seen_for_good']})"
                            if below["rows_seen"] is not None else "not reached"))
        r50 = r.get("r50")
        if r50:
            lines.append("R50, clean rows until ASR < 0.5 on the curve's prompts: " + (
                f"> {r50['last_rows_seen']} (never fell below 0.5: censored)" if r50["censored"]
                else "none (ASR below 0.5 before the defence)" if r50["value"] is None
                else f"{r50['value']:.0f} (interpolated between {r50['between'][0]} and "
                     f"{r50['between'][1]})"))
    for ref, d in utility_change_of(results).items():
        lines.append(f"utility change of `poisoned` {ref.replace('_', ' ')}: "
                     f"{d['value']:+.3f}{_ci(d)} (poisoned minus reference: < 0 is a loss)")
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


def format_life(life: dict) -> str:
    """The life as a table: one line per round, its gates, what shipped and the ASR."""
    def asr(stage):
        a = (stage or {}).get("asr")
        return "-" if not a else f"{a['value']:.2f}"

    lines = [f"{'round':>5} {'type':<7} {'rows':>5} {'poisoned':>8} {'quarantined':>11} "
             f"{'data gate':<10} {'drift gate':<26} {'deployed':<9} {'ASR cand.':>9} "
             f"{'ASR depl.':>9}"]
    for r in life["rounds"]:
        drift = r["drift_gate"]
        failed = drift["failed"] if drift else []
        d = "-" if drift is None else drift["decision"] + (
            f" ({', '.join(failed[:2])}{f' +{len(failed) - 2}' if len(failed) > 2 else ''})"
            if failed else "")
        lines.append(f"{r['round']:>5} {r['type']:<7} {r['rows']:>5} {r['poisoned_rows']:>8} "
                     f"{r['quarantined']:>11} {r['data_gate']['decision']:<10} {d:<26} "
                     f"{r['deployed_model']:<9} {asr(r['stages']['candidate']):>9} "
                     f"{asr(r['stages']['deployed']):>9}")
    ttd, top = life["time_to_detection"], life["shipped_asr_max"]
    fa = life["drift_gate_false_alarms"]
    lines.append(f"time to detection: {'never' if ttd is None else f'{ttd} rounds'} after the "
                 f"first poisoned round ({life['first_poisoned_round']}); highest ASR shipped: "
                 f"{'-' if top is None else f'{top:.2f}'}; drift gate on clean updates: "
                 f"{fa['failed']} of {fa['clean_rounds']} failed")
    cals = life.get("drift_gate_calibration") or []
    if cals:
        lines.append(f"drift gate calibrated on {len(cals[0]['models'])} clean shadow updates "
                     f"of {', '.join(dict.fromkeys(c['parent'] for c in cals))}")
    return "\n".join(lines)
