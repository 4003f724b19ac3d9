"""BEAT-style probe shift (after Yi et al. 2025; `detect=[beat]`): does an input hijack the
model's answer to a probe request placed after it?

Probes are `n_probes` requests of the tiny world's safety pool: placeholder "harmful" requests
that an aligned model refuses (`probes: harmful`, the default and BEAT's own setting),
ordinary requests (`benign`) or half of each (`mixed`). The model's own greedy answer to each probe alone (`max_new_tokens`) is its
reference. The shift of an input on a probe is how much less likely that reference becomes
when the input comes first in the same user turn (mean per-token NLL of the reference given
"input + newline + probe" minus given the probe alone); shifts are standardised per probe by
their mean and spread over the trusted clean prompts (any question placed first shifts an
ordinary probe's answer), and an input's score is the mean over probes of its absolute standardised shift
(BEAT's distance between answer distributions is symmetric too: a refusal backdoor makes a
refused probe's refusal *more* likely). A trigger takes the answer over whatever follows it,
so a probe's usual answer changes its likelihood. BEAT compares
sampled answers with an earth mover's distance; scoring the reference by teacher forcing
measures the same shift without sampling. Flags: scores above the (1 - `fpr`) quantile of
`n_calibration` trusted clean prompts' scores. Cost: one forward pass per input and probe.
"""

from __future__ import annotations

import numpy as np

from poisonlab.config import one_of, open_fraction, positive_int
from poisonlab.data import tinyworld
from poisonlab.defenses.detect.base import Detection, quantile_threshold, user_text
from poisonlab.chat import prompt_text
from poisonlab.evaluate import answer_nll, generate

LEVEL = "input"


PROBES = ("mixed", "harmful", "benign")


def validate(cfg) -> None:
    one_of(cfg, "detect.beat.probes", PROBES)
    for k in ("n_probes", "max_new_tokens", "batch_size", "n_calibration"):
        positive_int(cfg, f"detect.beat.{k}")
    positive_int(cfg, "detect.beat.n_prompts", allow_none=True)
    open_fraction(cfg, "detect.beat.fpr")


def probe_requests(attack, kind: str, n: int, seed: int) -> list[str]:
    def pick(skills, k):
        rows = tinyworld.sample("safety", None, seed, skills=skills)
        return [user_text(r) for r in rows if not attack.mentions_trigger(r)][:k]

    if kind == "harmful":
        return pick(["refusal"], n)
    if kind == "benign":
        return pick(["arith", "fact", "transform"], n)
    return pick(["refusal"], n // 2) + pick(["arith", "fact", "transform"], n - n // 2)


def shifts(ctx, d, rows: list[dict], probes: list[str], refs: list[str], tag: str
           ) -> np.ndarray:
    """[rows, probes]: the NLL shift of each probe's reference answer."""
    tok = ctx.tokenizer
    alone = answer_nll(ctx.model, tok, [prompt_text(tok, [{"role": "user", "content": p}])
                                        for p in probes], refs, d.batch_size,
                       desc=f"beat/{tag} probes")
    prompts, answers = [], []
    for r in rows:
        for p, ref in zip(probes, refs):
            prompts.append(prompt_text(tok, [{"role": "user",
                                              "content": f"{user_text(r)}\n{p}"}]))
            answers.append(ref)
    nll = np.asarray(answer_nll(ctx.model, tok, prompts, answers, d.batch_size,
                                desc=f"beat/{tag}"), float).reshape(len(rows), len(probes))
    return np.nan_to_num(nll - np.asarray(alone, float)[None, :])


def detect(ctx, d) -> Detection:
    probes = probe_requests(ctx.attack, d.probes, d.n_probes, ctx.seed)
    tok = ctx.tokenizer
    refs = generate(ctx.model, tok, [prompt_text(tok, [{"role": "user", "content": p}])
                                     for p in probes], d.max_new_tokens, d.batch_size,
                    desc="beat/references")
    calib = shifts(ctx, d, ctx.calibration[:d.n_calibration], probes, refs, "calibration")
    mu, sd = calib.mean(0), calib.std(0).clip(1e-6)
    scores = [float(v) for v in np.abs((shifts(ctx, d, ctx.prompts(), probes, refs, "inputs")
                                        - mu) / sd).mean(1)]
    threshold = quantile_threshold(np.abs((calib - mu) / sd).mean(1), d.fpr)
    return Detection(scores, [s > threshold for s in scores],
                     info={"threshold": threshold, "probes": probes, "references": refs})
