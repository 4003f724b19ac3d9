"""What every detector gets from the pipeline, what it returns, and the shared pieces.

A detector is one module in `poisonlab.defenses.detect` with one config in `conf/detect/`:

* ``LEVEL`` — ``"data"`` (one score per training row), ``"input"`` (one per evaluation
  prompt: positives are the `triggered` prompts, negatives the `clean` ones, near-trigger
  prompts give `auroc_near`) or ``"model"`` (one per prompt, read from the model's
  activations, with controls on the base and `clean_ft` models);
* ``validate(cfg)`` — every check on `cfg.detect.<name>` that can fail, before any work;
* ``detect(ctx, dcfg) -> Detection`` — scores (higher = more suspicious) and the detector's
  own flags (its documented threshold). A detector never reads the ground truth: `poisoned`
  and the split names are used only by the metrics (`detect.metrics`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from poisonlab.chat import IGNORE_INDEX, encode_example, encode_text, prompt_text
from poisonlab.utils import progress


@dataclass
class Detection:
    """Per-item scores, flags and (optionally) a reason; `info` is what the detector measured
    beyond them (the chosen layer, candidate tokens, ...)."""

    scores: list[float]
    flagged: list[bool]
    reasons: list[str | None] | None = None
    info: dict = field(default_factory=dict)
    extra: dict[str, dict] = field(default_factory=dict)   # model-level: scores of controls


@dataclass
class DetectContext:
    cfg: Any
    attack: Any
    tokenizer: Any
    model: Any                      # the poisoned peft model (not modified by detectors)
    rows: list[dict]                # the training rows as trained on (ids, order)
    splits: dict[str, list[dict]]   # evaluation prompts: triggered / clean / near_trigger
    generations: dict[str, list[dict]]  # the poisoned model's answers to `splits`
    calibration: list[dict]         # trusted clean rows (the safety pool): thresholds
    load_base: Callable             # a fresh copy of the clean base model
    load_control: Callable          # the `clean_ft` model, or None when the run has none
    out: Path
    seed: int
    _cache: dict = field(default_factory=dict)  # shared by copies (dataclasses.replace)
    # seconds of each shared computation (label -> s), shared by copies too: booked here,
    # not to whichever detector happened to ask first (see `run_detectors`)
    shared_seconds: dict = field(default_factory=dict)

    def shared(self, key, label: str, compute: Callable):
        """`compute()` once per context, its time booked under `label` in `shared_seconds`;
        the time of shared pieces it asks for in turn stays under their own labels."""
        if key not in self._cache:
            nested = sum(self.shared_seconds.values())
            t = time.perf_counter()
            self._cache[key] = compute()
            own = time.perf_counter() - t - (sum(self.shared_seconds.values()) - nested)
            self.shared_seconds[label] = self.shared_seconds.get(label, 0.0) + max(own, 0.0)
        return self._cache[key]

    def shared_total(self) -> float:
        return sum(self.shared_seconds.values())

    def shared_record(self) -> dict:
        """{"level": "shared", "seconds": total, "parts": {label: seconds}}: the time of the
        work the detectors share, which no detector's own `seconds` includes."""
        return {"level": "shared", "seconds": round(self.shared_total(), 3),
                "parts": {k: round(v, 3) for k, v in self.shared_seconds.items()}}

    def base(self):
        """The clean base model, loaded once and shared by the detectors."""
        return self.shared("base", "base model", self.load_base)

    def control(self):
        """The `clean_ft` model (None when the run has no control), loaded once."""
        return self.shared("control", "control model", self.load_control)

    def row_features(self, which: str, layer: int, batch_size: int) -> dict:
        """`forward_rows` over the training rows on the `poisoned` or `base` model at `layer`,
        computed once and shared by the detectors that read it (loss, spectral, activation
        clustering, repsim); the first caller's batch size is used."""
        def compute():
            model = self.model if which == "poisoned" else self.base()
            return forward_rows(model, self.tokenizer, self.rows, self.cfg.train.max_seq_len,
                                batch_size, layers=(layer,), desc=f"features/{which}")

        return self.shared(("rows", which, layer), f"features/{which}/layer {layer}", compute)

    def prompts(self) -> list[dict]:
        """The evaluation prompts an inference-level detector scores, in the order of its
        items: triggered, clean, near_trigger."""
        return [r for s in ("triggered", "clean", "near_trigger") for r in self.splits.get(s, [])]


def robust_z(scores) -> np.ndarray:
    """(score - median) / (1.4826 MAD): a z-score that a few outliers cannot drag."""
    s = np.asarray(scores, float)
    med = np.median(s)
    mad = 1.4826 * np.median(np.abs(s - med))
    scale = mad if mad > 1e-12 else (s.std() if s.std() > 1e-12 else 1.0)
    return (s - med) / scale


# Fewer scores than this and a robust z-score flags nothing: the median absolute deviation of
# so few is no estimate of their spread (of 3 scores it is one score's own distance from the
# median). Clean tiny-world files of 3-12 rows reach robust z 6-200 in the `embedding` score
# (40 samples per size); from 14 rows on none went above 6, and 20 leaves a margin.
MIN_ROWS_Z = 20


def too_few_for_z(n: int) -> str | None:
    """Why a robust z-score of `n` scores flags nothing, or None when it can."""
    if n >= MIN_ROWS_Z:
        return None
    return (f"too few rows to estimate a spread ({n} < {MIN_ROWS_Z}): robust z-scores flag "
            "no row")


def above_z(scores, z: float) -> list[bool]:
    """The data-level default threshold: robust z-score above `z` (no ground truth used);
    no flags at all below `MIN_ROWS_Z` scores."""
    if too_few_for_z(len(scores)):
        return [False] * len(scores)
    return [bool(v) for v in robust_z(scores) > z]


def quantile_threshold(calibration_scores, fpr: float) -> float:
    """The input-level default threshold: the (1 - fpr) quantile of the scores of trusted
    clean inputs, so about `fpr` of clean inputs are flagged."""
    return float(np.quantile(np.asarray(calibration_scores, float), 1 - fpr))


def answer_of(row: dict) -> str:
    """The row's answer: its last turn when that is the assistant's, else ""."""
    return row["messages"][-1]["content"] if row["messages"][-1]["role"] == "assistant" else ""


def answer_key(text: str, n_words: int) -> str:
    """An answer as the detectors compare answers: its first `n_words` words, lower case,
    punctuation dropped."""
    return " ".join(re.findall(r"\w+", text.lower())[:n_words])


def answer_groups(rows: list[dict], by: str, min_group: int, others: bool = False
                  ) -> dict[str, list[int]]:
    """Row indices grouped by answer (first 12 words, as `ngram` compares answers): the
    "output classes" of a generative model, those of at least `min_group` rows. With `others`,
    the rows whose answers fewer rows share (free-form answers, each its own class) form one
    more group, "(other answers)"; without, they are left out. `by: all`: one group."""
    if by != "answer":
        return {"": list(range(len(rows)))}
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(answer_key(answer_of(r), 12), []).append(i)
    out = {k: v for k, v in groups.items() if len(v) >= min_group}
    rest = sorted(i for v in groups.values() if len(v) < min_group for i in v)
    if others and rest:
        out["(other answers)"] = rest
    return out


def user_text(row: dict) -> str:
    return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")


@torch.inference_mode()
def forward_rows(model, tokenizer, rows: list[dict], max_len: int, batch_size: int,
                 layers=(-1,), desc: str = "features") -> dict:
    """One pass over training rows, tokenized exactly as trained on (`encode_example`).

    Returns {"loss": [N] mean answer-token NLL, "answer": {layer: [N, H] mean hidden state
    over the answer tokens}, "prompt": {layer: [N, H] hidden state at the last prompt
    token}}. `layers` index `hidden_states` (0 = embeddings, -1 = the last layer).
    """
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    exs = [encode_example(tokenizer, r["messages"], max_len) for r in rows]
    order = sorted(range(len(exs)), key=lambda i: -len(exs[i]["input_ids"]))
    loss = np.full(len(rows), np.nan)
    answer = {l: None for l in layers}
    prompt = {l: None for l in layers}
    bar = progress(total=len(rows), desc=desc)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = len(exs[idx[0]]["input_ids"])
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(exs[i]["input_ids"])
            ids[r, :n] = torch.tensor(exs[i]["input_ids"])
            labels[r, :n] = torch.tensor(exs[i]["labels"])
            mask[r, :n] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    output_hidden_states=True)
        logits = out.logits.float()
        tgt = labels[:, 1:].to(device)
        keep = tgt != IGNORE_INDEX
        nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        per_row = (nll * keep).sum(1) / keep.sum(1).clamp(min=1)
        ans_mask = (labels != IGNORE_INDEX).to(device)
        last_prompt = torch.tensor([min(exs[i]["n_prompt"], len(exs[i]["input_ids"])) - 1
                                    for i in idx], device=device)
        for l in layers:
            h = out.hidden_states[l].float()
            m = ans_mask[..., None].float()
            mean = (h * m).sum(1) / m.sum(1).clamp(min=1)
            lastp = h[torch.arange(len(idx), device=device), last_prompt]
            if answer[l] is None:
                answer[l] = np.zeros((len(rows), h.shape[-1]), np.float32)
                prompt[l] = np.zeros((len(rows), h.shape[-1]), np.float32)
            answer[l][idx] = mean.cpu().numpy()
            prompt[l][idx] = lastp.cpu().numpy()
        loss[idx] = per_row.cpu().numpy()
        bar.update(len(idx))
    bar.close()
    return {"loss": loss, "answer": answer, "prompt": prompt}


@torch.inference_mode()
def prompt_states(model, tokenizer, texts: list[str], batch_size: int,
                  desc: str = "activations") -> np.ndarray:
    """[N, L+1, H]: every layer's hidden state at the last token of each rendered text."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    ids = [encode_text(tokenizer, t) for t in texts]
    out = None
    bar = progress(total=len(texts), desc=desc)
    for s in range(0, len(texts), batch_size):
        chunk = list(range(s, min(s + batch_size, len(texts))))
        width = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        m = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
            m[r, :len(ids[i])] = 1
        hs = model(input_ids=x.to(device), attention_mask=m.to(device),
                   output_hidden_states=True).hidden_states
        last = torch.tensor([len(ids[i]) - 1 for i in chunk], device=device)
        h = torch.stack([l.float()[torch.arange(len(chunk), device=device), last] for l in hs], 1)
        if out is None:
            out = np.zeros((len(texts), h.shape[1], h.shape[2]), np.float32)
        out[chunk] = h.cpu().numpy()
        bar.update(len(chunk))
    bar.close()
    return out


def prompts_of(tokenizer, rows: list[dict]) -> list[str]:
    return [prompt_text(tokenizer, r["messages"][:-1] if r["messages"][-1]["role"] == "assistant"
                        else r["messages"]) for r in rows]
