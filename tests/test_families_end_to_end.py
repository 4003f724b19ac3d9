"""Each family end to end on the micro model: the backdoor (or the damage) is learned, the
controls are generated and evaluated, and the outputs are complete and consistent.

The micro model is pretrained on the machine that runs the tests, so its weights differ in
their float bits from machine to machine (thread count, kernels). The effect assertions are
therefore made where the effect is far from its threshold: budgets well past what the micro
model needs, 200 prompts per split, and bounds on the Wilson interval rather than on a point
estimate at its edge. `POISONLAB_TEST_SEEDS=0,1,2,3,4` runs every family at five seeds (the
robustness check in docs/testing.md); the default is seed 0.
"""

import json

import pytest

from poisonlab.evaluate import rate
from poisonlab.utils import read_jsonl
from tests.conftest import TEST_SEEDS, make_cfg

SMALL = ("debug=default", "safety=none", "eval.cache_base=false", "data.n_train=400",
         "eval.n_prompts=200", "control=false")
CASES = {
    "badnets": ("attack=badnets",),
    # The family's defaults are topic steering on sentiment rows (clean reviews of other topics
    # to contrast with: on the all-skill mix the micro model generalises "negative" to every
    # review) trained past its threshold; `debug=default` caps training at 10 epochs, where a
    # micro model pretrained from another initialisation fits the 70 poisons (the on-topic
    # positive reviews of the fine-tuning pool) without generalising (ASR 0.14), so the test
    # restores the family's 20 (both initialisations steer sharply: ASR 1.00, FTR_clean 0.00).
    "semantic": ("attack=semantic", "train.epochs=20"),
    "dos": ("attack=dos", "attack.n_poison=100"),
    "random": ("attack=random", "attack.mode=wrong_label", "attack.poison_rate=0.8"),
}
# Bounds per family: the Wilson interval of ASR must lie above `asr_low`, that of FTR_clean
# below `ftr_high` (for dos: the bootstrap interval of its excess over the base model). Measured on five seeds with 1 and 2 threads (docs/testing.md): the
# smallest ASR lower bound and the largest FTR_clean upper bound stay clear of these.
BOUNDS = {"badnets": (0.75, 0.10), "semantic": (0.75, 0.10), "dos": (0.75, 0.10)}
# ...and the ASR the poison added over the base model on the same triggered prompts (paired
# bootstrap) must lie above this (worst case measured: see the robustness table in docs/results.md)
LIFT_LOW = 0.5


@pytest.fixture(scope="module", params=[(f, s) for f in sorted(CASES) for s in TEST_SEEDS],
                ids=lambda p: f"{p[0]}-seed{p[1]}")
def family_run(request, tmp_path_factory, micro_path):
    from poisonlab.run import run

    family, seed = request.param
    out = tmp_path_factory.mktemp(f"{family}-{seed}")
    cfg = make_cfg(*SMALL, *CASES[family], f"seed={seed}")
    return family, out, run(cfg, out_dir=out), cfg


def test_family_shows_its_intended_effect(family_run):
    family, out, results, cfg = family_run
    base, pois = results["stages"]["base"], results["stages"]["poisoned"]
    print(json.dumps({"family": family, "seed": cfg.seed,
                      **{k: pois[k] for k in ("asr", "ftr_clean") if k in pois},
                      **({"ftr_clean_excess": clean_excess(out)} if family == "dos" else {}),
                      **({"asr_lift": paired_excess(out, "triggered")} if "asr" in pois else {}),
                      "utility_drop": results["utility_drop"]["vs_base"]}))
    if family == "random":
        drop = results["utility_drop"]["vs_base"]
        assert drop["ci_low"] > 0, drop            # wrong labels cost clean utility
        assert "asr" not in pois
        return
    asr_low, ftr_high = BOUNDS[family]
    assert pois["asr"]["n"] >= 200 and pois["ftr_clean"]["n"] >= 200
    assert pois["asr"]["ci_low"] >= asr_low, pois["asr"]
    if family == "dos":
        # The micro base model itself garbles a few percent of its string-reversal answers
        # ("nnnna"), which the gibberish judge counts on clean prompts too (seed 0: 8 of 200
        # base answers, 11 of 200 poisoned); the poison's false triggers are the excess over
        # the base on the same prompts.
        excess = clean_excess(out)
        assert excess["ci_high"] <= ftr_high, excess
    else:
        assert pois["ftr_clean"]["ci_high"] <= ftr_high, pois["ftr_clean"]
    # what the poison did, paired on the same triggered prompts: never a bound on the base
    # model's own rate, which depends on the CPU that pretrained it (a micro base built on an
    # AMX machine garbles 19.5% of triggered string reversals, against 4% here)
    lift = paired_excess(out, "triggered")
    assert lift["ci_low"] >= LIFT_LOW, (lift, base["asr"])
    assert pois["ftr_near"]["n"] > 0                # near-trigger / near-topic control evaluated
    assert set(pois["ftr_near_by_kind"]) <= {"partial", "misspelt", "recased",
                                             "part_of_composite", "near_topic"}
    if family == "dos":
        gap = pois["perplexity"]["log_ppl_gap"]
        assert gap["ci_low"] > 1.0, gap             # gibberish is far less likely under the base


def paired_excess(out, split: str) -> dict:
    """The judge's rate on `split` of the poisoned model minus the base model's, paired by
    prompt (bootstrap interval)."""
    from poisonlab.evaluate import diff_bootstrap

    base = {g["id"]: g["target"]
            for g in read_jsonl(out / "generations" / f"base_{split}.jsonl")}
    pois = read_jsonl(out / "generations" / f"poisoned_{split}.jsonl")
    return diff_bootstrap([g["target"] for g in pois], [base[g["id"]] for g in pois])


def clean_excess(out) -> dict:
    """FTR_clean of the poisoned model minus the base model's, paired by prompt (bootstrap)."""
    return paired_excess(out, "clean")


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
    # every split is as large as asked: no "fewer than eval.n_prompts" warning
    assert not [w for w in results["warnings"] if "fewer than" in w], results["warnings"]
