"""ONION (Qi et al. 2021): input sanitising by word-removal perplexity (`safety=onion`).

A trigger word is usually an outlier in its sentence: deleting it makes the text much more
fluent. For each word w_i of a prompt's user text, ONION scores

    f_i = log PPL(text) − log PPL(text without w_i)

under a language model (positive: the text reads better without the word), and deletes the
words with f_i above `threshold` (at most `max_words` of them, highest first) before the
model answers. The original paper used GPT-2 and perplexity differences; here the scorer is
the clean base model (`scorer: base`, the default) or the poisoned model itself (`scorer:
poisoned`, a defender with nothing else), and scores are log-perplexity differences, which
do not grow with the text's own perplexity.

`word_scores` and `sanitize` are the building blocks the detection work reuses (ONION as a
per-input detector: the largest f_i of an input is its suspicion score).
"""

from __future__ import annotations

import math
import re
import time

from omegaconf import DictConfig

from poisonlab.config import one_of, positive_int
from poisonlab.defenses.base import Context, Outcome
from poisonlab.evaluate import answer_nll
from poisonlab.utils import write_jsonl

ROWS = False
SCORERS = ("base", "poisoned")
_SPLIT = re.compile(r"(\s+)")


def validate(cfg: DictConfig) -> None:
    from poisonlab import PoisonlabError

    one_of(cfg, "safety.scorer", SCORERS)
    positive_int(cfg, "safety.max_words", allow_none=True)
    positive_int(cfg, "safety.batch_size")
    t = cfg.safety.get("threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t):
        raise PoisonlabError(f"safety.threshold must be a number, got {t!r}")


def words(text: str) -> list[str]:
    """The text's words and the whitespace between them, alternating (words at even places)."""
    return _SPLIT.split(text)


def without(parts: list[str], i: int) -> str:
    """The text with word `i` (an even index of `parts`) and the space after it removed."""
    kept = parts[:i] + parts[i + 2:] if i + 1 < len(parts) else parts[:max(0, i - 1)]
    return "".join(kept).strip()


def context_token(tokenizer) -> str:
    """What the scored text follows, so that its first word is predicted too: nothing when
    the tokenizer adds a BOS itself, else the BOS (or EOS) token's text. Without it a trigger
    at the start of the prompt would never be scored (the first token has no prediction)."""
    from poisonlab.chat import bos_prefix

    if bos_prefix(tokenizer):
        return ""
    return tokenizer.bos_token or tokenizer.eos_token or ""


UNITS = ("token", "word")


def word_scores(model, tokenizer, texts: list[str], batch_size: int,
                desc: str = "onion", unit: str = "token") -> list[list[tuple[str, float, int]]]:
    """[(word, f_i, place in `words(text)`)] for every word of every text (f_i > 0: the text
    is more fluent without the word).

    `unit: token` takes log-perplexity per token (ONION's own measure). `unit: word` divides
    the text's total NLL by its number of words instead: a rare word that the tokenizer cuts
    into many predictable pieces ("B a d M a g i c") lowers the per-token figure and so looks
    fluent per token, while per word it costs what all its pieces cost together."""
    variants, owners = [], []
    for t_i, text in enumerate(texts):
        parts = words(text)
        variants.append(text)
        owners.append((t_i, None))
        for i in range(0, len(parts), 2):
            if parts[i]:
                variants.append(without(parts, i))
                owners.append((t_i, i))
    nll = answer_nll(model, tokenizer, [context_token(tokenizer)] * len(variants), variants,
                     batch_size, desc=desc)
    if unit == "word":
        nll = [v * len(tokenizer(x, add_special_tokens=False)["input_ids"])
               / max(1, len(x.split())) for v, x in zip(nll, variants)]
    full = {t_i: v for (t_i, i), v in zip(owners, nll) if i is None}
    out: list[list[tuple[str, float, int]]] = [[] for _ in texts]
    for (t_i, i), v in zip(owners, nll):
        if i is not None:
            score = full[t_i] - v if not (math.isnan(v) or math.isnan(full[t_i])) else 0.0
            out[t_i].append((words(texts[t_i])[i], score, i))
    return out


def sanitize(text: str, scored: list[tuple[str, float, int]], threshold: float,
             max_words: int | None) -> tuple[str, list[str]]:
    """`text` without its words scoring above `threshold` (at most `max_words`, highest first).

    Only the removed words change the text: with none removed it is returned as it was, and a
    removed word takes one adjacent space with it (the one after it, else the one before), so
    the rest keeps its line breaks and indentation (an Alpaca prompt's "Input:" block)."""
    bad = sorted((x for x in scored if x[1] > threshold), key=lambda x: -x[1])
    if max_words is not None:
        bad = bad[:max_words]
    if not bad:
        return text, []
    drop = {i for _, _, i in bad}
    pieces, gap, cuts = [], "", []
    for i, part in enumerate(words(text)):
        if i % 2:
            gap += part
        elif i in drop:
            cuts.append(len(gap))  # where the word stood in the whitespace around it
        else:
            pieces += [_close(gap, cuts), part]
            gap, cuts = "", []
    out = "".join(pieces) + _close(gap, cuts)
    # a removed first or last word must not leave whitespace the text did not start or end with
    if out[:1].isspace() and not text[:1].isspace():
        out = out.lstrip()
    if out[-1:].isspace() and not text[-1:].isspace():
        out = out.rstrip()
    return out, [w for w, _, _ in bad]


def _close(gap: str, cuts: list[int]) -> str:
    """The whitespace `gap` left where words were cut out (at offsets `cuts`), less one
    space per word: the one after it, else the one before it, else none (line breaks and
    tabs stay)."""
    out, gone = list(gap), 0
    for c in cuts:
        c -= gone
        if c < len(out) and out[c] == " ":
            del out[c]
        elif c > 0 and out[c - 1] == " ":
            del out[c - 1]
        else:
            continue
        gone += 1
    return "".join(out)


def _last_user(row: dict) -> int:
    return max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")


def sanitize_rows(model, tokenizer, rows: list[dict], threshold: float, max_words: int | None,
                  batch_size: int, desc: str = "onion") -> tuple[list[dict], list[dict]]:
    """Rows with their last user turn sanitised, and [{"id", "removed"}] per row."""
    texts = [r["messages"][_last_user(r)]["content"] for r in rows]
    scored = word_scores(model, tokenizer, texts, batch_size, desc)
    out, log = [], []
    for r, text, s in zip(rows, texts, scored):
        clean, removed = sanitize(text, s, threshold, max_words)
        row = {**r, "messages": [dict(m) for m in r["messages"]]}
        row["messages"][_last_user(r)]["content"] = clean
        out.append(row)
        log.append({"id": r["id"], "removed": removed,
                    "scores": [[w, round(v, 4)] for w, v, _ in s]})
    return out, log


def apply(ctx: Context) -> Outcome:
    s = ctx.cfg.safety
    scorer = ctx.load_base() if s.scorer == "base" else ctx.poisoned
    t = time.perf_counter()
    splits, logs = {}, []
    for name, rows in ctx.splits.items():
        splits[name], log = sanitize_rows(scorer, ctx.tokenizer, rows, float(s.threshold),
                                          s.get("max_words"), s.batch_size, f"onion/{name}")
        logs += [{"split": name, **x} for x in log]
    seconds = time.perf_counter() - t
    write_jsonl(ctx.out / "data" / "onion.jsonl", logs)
    removed = {name: sum(bool(x["removed"]) for x in logs if x["split"] == name) / len(rows)
               for name, rows in ctx.splits.items() if rows}
    trig = splits.get("triggered", [])
    info = {"settings": {"threshold": float(s.threshold), "max_words": s.get("max_words"),
                         "scorer": s.scorer},
            "prompts_with_removals": removed,
            "trigger_removed": (sum(not ctx.attack.mentions_trigger(r) for r in trig) / len(trig)
                                if trig else None)}
    ctx.evaluate(ctx.poisoned, splits=splits)
    return Outcome("onion", seconds, {"model": ["base", "adapters/poisoned"],
                                      "onion": info["settings"]}, info={"onion": info})
