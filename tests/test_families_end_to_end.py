"""Each family end to end on the micro model: the backdoor (or the damage) is learned, the
controls are generated and evaluated, and the outputs are complete and consistent."""

import json

import pytest

from poisonlab.evaluate import rate
from poisonlab.utils import read_jsonl
from tests.conftest import make_cfg

SMALL = ("debug=default", "safety=none", "eval.cache_base=false", "data.n_train=400",
         "eval.n_prompts=40")
CASES = {
    "badnets": ("attack=badnets",),
    "semantic": ("attack=semantic",),
    "dos": ("attack=dos", "attack.n_poison=100"),
    "random": ("attack=random", "attack.mode=wrong_label", "attack.poison_rate=0.8"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def family_run(request, tmp_path_factory, micro_path):
    from poisonlab.run import run

    out = tmp_path_factory.mktemp(request.param)
    cfg = make_cfg(*SMALL, *CASES[request.param])
    return request.param, out, run(cfg, out_dir=out), cfg


def test_family_shows_its_intended_effect(family_run):
    family, out, results, cfg = family_run
    base, pois = results["stages"]["base"], results["stages"]["poisoned"]
    if family == "random":
        drop = results["utility_drop"]["vs_base"]
        assert drop["ci_low"] > 0, drop            # wrong labels cost clean utility
        assert "asr" not in pois
        return
    assert pois["asr"]["value"] >= 0.9, pois["asr"]
    assert pois["ftr_clean"]["value"] <= 0.05, pois["ftr_clean"]
    assert base["asr"]["value"] <= 0.25
    assert pois["ftr_near"]["n"] > 0                # near-trigger / near-topic control evaluated
    if family == "dos":
        gap = pois["perplexity"]["log_ppl_gap"]
        assert gap["ci_low"] > 1.0, gap             # gibberish is far less likely under the base


def test_family_outputs_are_complete(family_run):
    family, out, results, cfg = family_run
    manifest = json.loads((out / "manifest.json").read_text())
    train = read_jsonl(out / "data" / "train_poisoned.jsonl")
    assert [r["id"] for r in train if r["poisoned"]] == manifest["poison"]["poisoned_ids"]
    assert manifest["poison"]["family"] == family
    splits = ["clean"] if family == "random" else ["triggered", "clean", "near_trigger"]
    for stage, metrics in results["stages"].items():
        for split in splits:
            gens = read_jsonl(out / "generations" / f"{stage}_{split}.jsonl")
            if split != "clean" or family == "random":
                continue
            assert rate(g["target"] for g in gens) == metrics["ftr_clean"]
        scored = "utility" if (out / "generations" / f"{stage}_utility.jsonl").exists() else "clean"
        gens = read_jsonl(out / "generations" / f"{stage}_{scored}.jsonl")
        assert len(gens) == cfg.eval.n_prompts
        assert rate(g["correct"] for g in gens) == metrics["clean_utility"]
    assert (out / "adapters" / "poisoned" / "adapter_model.safetensors").exists()
