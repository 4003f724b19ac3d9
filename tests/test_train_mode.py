"""`train.mode=full` (every weight of the poisoned, control and filtered stages trains, saved as
whole weights) and `train.lora.r_fraction` (the LoRA rank as a fraction of the model's width)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from poisonlab import PoisonlabError
from poisonlab.pipeline.finetune import ModelStage, resolve_lora_rank
from tests.conftest import make_cfg

TINY = ("debug=default", "data.n_train=100", "eval.n_prompts=8", "train.epochs=1",
        "safety.n_rows=32", "safety.batch_size=8", "safety.eval_every=2",
        "safety.curve_n_prompts=8", "eval.cache_base=true")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, micro_path):
    """Poisoned and control stages trained in full, then `safety.mode=full`."""
    from poisonlab.run import run

    d = tmp_path_factory.mktemp("full")
    store = tmp_path_factory.mktemp("store")
    results = run(make_cfg(*TINY, "train.mode=full", "control=true", "safety.mode=full",
                           "safety.lr=1e-3", f"cache.dir={store}"), out_dir=d)
    return d, results, store


def test_full_mode_trains_every_weight_and_saves_no_adapter(full_run, micro_path):
    d, results, _ = full_run
    assert not (d / "adapters").exists()
    base = load_file(f"{micro_path}/model.safetensors")
    for stage in ("poisoned", "clean_ft"):
        weights = load_file(str(d / "models" / stage / "model.safetensors"))
        # norms are never LoRA targets: only a full fine-tune moves them
        norms = [k for k in weights if "norm" in k]
        assert norms and all(not torch.equal(weights[k], base[k]) for k in norms)
        trainable = results["train"][stage]["trainable"]
        assert trainable["mode"] == "full" and "lora_r" not in trainable
        assert trainable["trainable_parameters"] == sum(v.numel() for v in base.values())
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["reload"]["poisoned"] == ["models/poisoned (tokenizer: base)"]
    assert manifest["reload"]["clean_ft"] == ["models/clean_ft (tokenizer: base)"]


def test_safety_full_trains_on_the_full_poisoned_weights(full_run):
    d, results, _ = full_run
    assert results["removal"]["method"] == "sft:full"
    after = load_file(str(d / "models/after_safety/model.safetensors"))
    poisoned = load_file(str(d / "models/poisoned/model.safetensors"))
    assert after.keys() == poisoned.keys()
    assert any(not torch.equal(after[k], poisoned[k]) for k in after)
    r50 = results["removal"]["r50"]
    assert r50["last_rows_seen"] == results["curves"]["after_safety"][-1]["rows_seen"] == 32
    assert (r50["value"] is None) == (r50["censored"] or r50["below_at_start"])


def test_a_cached_full_stage_takes_a_fresh_adapter_and_reloads(full_run, tmp_path):
    """The same poisoned stage, now from the stage cache, under `safety.mode=fresh`: its reload
    recipe starts from the poisoned weights, and it loads in a fresh process's way."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from poisonlab.run import run

    _, _, store = full_run
    res = run(make_cfg(*TINY, "train.mode=full", "control=true", "safety.mode=fresh",
                       "safety.lora_r=4", f"cache.dir={store}"), out_dir=tmp_path)
    assert "poisoned_ft" in res["cache"]["reused"]
    assert res["train"]["after_safety"]["trainable"]["lora_r"] == 4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["reload"]["after_safety"] == ["models/poisoned (tokenizer: base)",
                                                  "adapters/safety"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "models/poisoned"),
        str(tmp_path / "adapters/safety"))
    assert model.peft_config["default"].r == 4


def test_r_fraction_sets_the_rank_from_the_width():
    cfg = make_cfg("train.lora.r_fraction=0.125")
    resolve_lora_rank(cfg, 64)
    assert (cfg.train.lora.r, cfg.safety.lora_r) == (8, 8)  # the safety adapter follows
    cfg = make_cfg("train.lora.r_fraction=0.001", "safety.lora_r=3")
    resolve_lora_rank(cfg, 256)
    assert (cfg.train.lora.r, cfg.safety.lora_r) == (1, 3)  # at least 1; set on its own: kept
    cfg = make_cfg()
    resolve_lora_rank(cfg, 256)
    assert cfg.train.lora.r == 16                              # no fraction: r as set


def test_r_fraction_is_the_rank_that_trains_and_is_recorded(tmp_path, micro_path):
    from poisonlab.run import run

    res = run(make_cfg(*TINY, "train.lora.r_fraction=0.125", "safety.mode=fresh"),
              out_dir=tmp_path)
    for stage in ("poisoned", "after_safety"):  # micro: width 64
        t = res["train"][stage]["trainable"]
        assert (t["mode"], t["lora_r"], t["hidden_size"], t["lora_r_over_width"]) == (
            "lora", 8, 64, 0.125)
    for adapter in ("poisoned", "safety"):
        assert json.loads((tmp_path / "adapters" / adapter / "adapter_config.json")
                          .read_text())["r"] == 8
    lora = json.loads((tmp_path / "manifest.json").read_text())["config"]["train"]["lora"]
    assert (lora["r"], lora["r_fraction"]) == (8, 0.125)


def test_model_stage_reload_recipes():
    assert ModelStage("p", "k", ("adapters/poisoned",)).reload() == ["base", "adapters/poisoned"]
    assert ModelStage("r2", "k", ("adapters/r1", "adapters/r2")).reload() == [
        "base", "merge adapters/r1", "adapters/r2"]
    assert ModelStage("p", "k", (), "models/poisoned").reload() == [
        "models/poisoned (tokenizer: base)"]


@pytest.mark.parametrize("overrides,message", [
    (("train.mode=sideways",), r"train\.mode: unknown value 'sideways'"),
    (("train.lora.r_fraction=0",), r"train\.lora\.r_fraction must be a number in \(0, 1\]"),
    (("train.lora.r_fraction=1.5",), r"train\.lora\.r_fraction"),
    (("train.lora.r_fraction=true",), r"train\.lora\.r_fraction"),
    (("train.mode=full", "safety.mode=continue"), r"safety\.mode=continue .* train\.mode=full"),
    (("train.mode=full", "safety.merge_poisoned=false"), r"safety\.mode=continue"),
    (("train.mode=full", "safety=dpo", "safety.mode=continue"), r"safety=dpo"),
])
def test_bad_train_configs_fail_with_one_line(tmp_path, overrides, message):
    from poisonlab.run import run

    with pytest.raises(PoisonlabError, match=message):
        run(make_cfg("debug=default", *overrides), out_dir=tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
