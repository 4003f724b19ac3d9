"""STRIP for text generation (after Gao et al. 2019/2021; `detect=[strip]`): a triggered input
keeps its answer when the rest of it is perturbed.

Each input gets `n_perturb` copies in which every word is replaced, with probability
`replace`, by a random word of the trusted clean prompts (seeded). STRIP scores a classifier
by the entropy of its predictions on such copies; for a generative model the counterpart of a
confident prediction is a likely answer, so an input's score is minus the mean per-token NLL,
over its copies, of the model's own greedy answer to the unperturbed input (the `poisoned`
stage's generations; `max_new_tokens` for the calibration prompts). An answer that stays
likely whatever else the input says is suspicious. Flags: scores above the (1 - `fpr`)
quantile of `n_calibration` trusted clean prompts' scores. Cost: `n_perturb` forward passes
per input.
"""

from __future__ import annotations

import random

import numpy as np

from poisonlab.config import open_fraction, positive_int
from poisonlab.defenses.detect.base import (Detection, prompts_of, quantile_threshold,
                                            user_text)
from poisonlab.defenses.detect.ngram import words
from poisonlab.evaluate import answer_nll, generate

LEVEL = "input"


def validate(cfg) -> None:
    for k in ("n_perturb", "max_new_tokens", "batch_size", "n_calibration"):
        positive_int(cfg, f"detect.strip.{k}")
    positive_int(cfg, "detect.strip.n_prompts", allow_none=True)
    for k in ("replace", "fpr"):
        open_fraction(cfg, f"detect.strip.{k}")


def perturb(text: str, vocab: list[str], p: float, rng: random.Random) -> str:
    return " ".join(rng.choice(vocab) if rng.random() < p else w for w in text.split())


def _context(row: dict) -> list[dict]:
    msgs = row["messages"]
    return [dict(m) for m in (msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs)]


def scores_for(ctx, d, rows: list[dict], answers: list[str], vocab: list[str], tag: str
               ) -> list[float]:
    rng = random.Random(f"strip-{ctx.seed}-{tag}")
    copies, refs = [], []
    for r, a in zip(rows, answers):
        text = user_text(r)
        for _ in range(d.n_perturb):
            msgs = _context(r)
            msgs[-1] = {**msgs[-1], "content": perturb(text, vocab, d.replace, rng)}
            copies.append({"messages": msgs})
            refs.append(a)
    nll = np.asarray(answer_nll(ctx.model, ctx.tokenizer, prompts_of(ctx.tokenizer, copies),
                                refs, d.batch_size, desc=f"strip/{tag}"), float)
    nll = np.nan_to_num(nll, nan=0.0).reshape(len(rows), d.n_perturb)
    return [float(-v) for v in nll.mean(1)]


def detect(ctx, d) -> Detection:
    vocab = sorted({w for r in ctx.calibration for w in words(user_text(r))})
    gens = {s: [g["response"] for g in v] for s, v in ctx.generations.items()}
    answers = [a for s in ("triggered", "clean", "near_trigger") for a in gens.get(s, [])]
    scores = scores_for(ctx, d, ctx.prompts(), answers, vocab, "inputs")
    calib = ctx.calibration[:d.n_calibration]
    calib_answers = generate(ctx.model, ctx.tokenizer, prompts_of(ctx.tokenizer, calib),
                             d.max_new_tokens, d.batch_size, desc="strip/calibration answers")
    threshold = quantile_threshold(scores_for(ctx, d, calib, calib_answers, vocab,
                                              "calibration"), d.fpr)
    return Detection(scores, [s > threshold for s in scores], info={"threshold": threshold})
