"""Safety-training modes: each changes only what it should.

fresh    — a new adapter on the merged poisoned model; the poisoned adapter is untouched;
continue — the poisoned adapter itself trains on;
full     — every weight of the merged model trains (saved as safetensors, no adapter).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from poisonlab import PoisonlabError
from tests.conftest import make_cfg

TINY = ("debug=default", "data.n_train=200", "eval.n_prompts=16", "train.epochs=2",
        "safety.n_rows=64", "eval.cache_base=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_path):
    from poisonlab.run import run

    out = {}
    for name, extra in {"none": ("safety=none",),
                        "fresh": ("safety.mode=fresh", "safety.lora_r=4"),
                        "continue": ("safety.mode=continue", "safety.optimizer=sgd"),
                        "full": ("safety.mode=full", "safety.lr=1e-3")}.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, run(make_cfg(*TINY, *extra), out_dir=d))
    return out


def test_fresh_adapter_leaves_the_poisoned_adapter_untouched(runs):
    none_dir, fresh_dir = runs["none"][0], runs["fresh"][0]
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (none_dir / "adapters/poisoned" / f).read_bytes() == \
            (fresh_dir / "adapters/poisoned" / f).read_bytes()
    cfg = json.loads((fresh_dir / "adapters/safety/adapter_config.json").read_text())
    assert cfg["r"] == 4                                     # safety.lora_r
    manifest = json.loads((fresh_dir / "manifest.json").read_text())
    assert manifest["safety_mode"] == "fresh"
    assert runs["fresh"][1]["removal"]["method"] == "sft:fresh"


def test_continue_trains_the_poisoned_adapter_on(runs):
    d = runs["continue"][0]
    before = load_file(str(d / "adapters/poisoned/adapter_model.safetensors"))
    after = load_file(str(d / "adapters/safety/adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (d / "models").exists()


def test_full_finetuning_changes_weights_no_adapter_touches(runs, micro_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = runs["full"][0]
    full = load_file(str(d / "models/after_safety/model.safetensors"))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_path),
                                       str(d / "adapters/poisoned")).merge_and_unload()
    ref = merged.state_dict()
    # norms are never LoRA targets: only full fine-tuning can move them
    norms = [k for k in full if "norm" in k]
    assert norms and any(not torch.equal(full[k], ref[k]) for k in norms)
    assert not (d / "adapters/safety").exists()
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["reload"]["after_safety"][0].startswith("models/after_safety")


@pytest.mark.parametrize("override,key", [
    ("safety.mode=sideways", "safety.mode"),
    ("safety.optimizer=adagrad", "safety.optimizer"),
    ("train.optimizer=adagrad", "train.optimizer"),
    ("safety.lora_r=0", "safety.lora_r"),
    ("safety.max_steps=-3", "safety.max_steps"),
    ("safety.lr=-1", "safety.lr"),
])
def test_bad_safety_configs_fail_with_one_line(tmp_path, override, key):
    from poisonlab.run import run

    with pytest.raises(PoisonlabError, match=key.replace(".", r"\.")):
        run(make_cfg("debug=default", override), out_dir=tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_merge_poisoned_stays_an_alias_of_mode():
    from poisonlab.run import safety_mode

    assert safety_mode(make_cfg("safety.merge_poisoned=false")) == "continue"
    assert safety_mode(make_cfg("safety.merge_poisoned=true")) == "fresh"
    with pytest.raises(PoisonlabError, match="contradicts"):
        safety_mode(make_cfg("safety.merge_poisoned=false", "safety.mode=full"))


def test_persistence_curve_has_the_promised_points(tmp_path, micro_path):
    from poisonlab.run import run

    # 64 safety rows in batches of 8 for 2 epochs: 16 optimizer steps, a point every 5
    res = run(make_cfg(*TINY, "safety.batch_size=8", "safety.epochs=2", "safety.eval_every=5",
                       "safety.curve_n_prompts=8"), out_dir=tmp_path)
    points = res["curves"]["after_safety"]
    assert [p["step"] for p in points] == [0, 5, 10, 15, 16]
    assert [p["rows_seen"] for p in points] == [0, 40, 80, 120, 128]
    for p in points:
        assert {"asr", "ftr_clean", "clean_utility"} <= set(p)
        assert p["asr"]["n"] == 8 and 0 <= p["asr"]["ci_low"] <= p["asr"]["value"]
    assert (tmp_path / "curves" / "after_safety.png").stat().st_size > 1000
    # the last point is the trained model, on the first prompts of the full evaluation
    assert res["removal"]["seconds"] == res["train"]["after_safety"]["seconds"] > 0


def test_curve_interval_larger_than_the_run_is_refused(tmp_path):
    from poisonlab.run import run

    with pytest.raises(PoisonlabError, match=r"safety\.eval_every=999 is larger than the run"):
        run(make_cfg(*TINY, "safety.eval_every=999"), out_dir=tmp_path)
