"""The lean greedy decoder, LoRA folding for inference, and the compute precision."""

import pytest
import torch

from poisonlab import PoisonlabError, evaluate, models
from poisonlab.data import tinyworld as tw

SYSTEM = "You are a careful assistant who answers every question in the fewest words possible."


def reference_greedy(model, ids, max_new, stop):
    """Per-prompt greedy decoding without a cache: argmax of a full forward at every step."""
    out = []
    with torch.no_grad():
        for seq in ids:
            new = []
            for _ in range(max_new):
                nxt = int(model(torch.tensor([seq + new])).logits[0, -1].float().argmax())
                new.append(nxt)
                if nxt in stop:
                    break
            out.append(new)
    return out


def chat_ids(tok, n, system=True):
    from poisonlab.chat import encode_prompt

    rows = tw.sample("eval", n, seed=3)
    return [encode_prompt(tok, ([{"role": "system", "content": SYSTEM}] if system else [])
                          + r["messages"][:-1]) for r in rows]


@pytest.mark.parametrize("share_prefix,prefill_tokens,batch", [
    (True, 2048, 16), (True, 40, 3), (False, 40, 5), (False, 2048, 1)])
def test_greedy_decode_equals_a_per_prompt_loop(micro_path, micro_tokenizer, monkeypatch,
                                                share_prefix, prefill_tokens, batch):
    from poisonlab.chat import end_of_turn_ids

    tok = micro_tokenizer
    model = models.load_model(micro_path, torch.device("cpu"), torch.float32).eval()
    ids = chat_ids(tok, 12)
    assert evaluate.common_prefix_length(ids) >= evaluate.MIN_SHARED_PREFIX  # the prefix pass runs
    assert len({len(i) for i in ids}) > 3  # lengths differ: padding inside batches and chunks
    monkeypatch.setattr(evaluate, "PREFILL_TOKENS", prefill_tokens)  # 40: chunked prefill
    stop = end_of_turn_ids(tok)
    got = evaluate.greedy_decode(model, ids, 20, stop, tok.pad_token_id, batch,
                                 share_prefix=share_prefix)
    assert got == reference_greedy(model, ids, 20, set(stop))
    assert any(len(g) < 20 for g in got)  # some rows stopped early and left their batch


def test_common_prefix_length_leaves_every_row_a_token():
    assert evaluate.common_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert evaluate.common_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert evaluate.common_prefix_length([[5], [5]]) == 0
    assert evaluate.common_prefix_length([[1, 2, 3]]) == 2
    assert evaluate.common_prefix_length([]) == 0


def _random_model(kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                  initializer_range=0.5)  # peaked logits: no near-ties for argmax to flip on
    if kind.startswith("gemma3_text"):  # sliding-window layers beside full-attention ones:
        # a window the prompts overflow (one prefill forward) and one they fit (stacked chunks)
        cfg = AutoConfig.for_model("gemma3_text", head_dim=16,
                                   sliding_window=int(kind.split(":")[1]),
                                   layer_types=["sliding_attention", "full_attention"], **common)
    else:
        cfg = AutoConfig.for_model(kind, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("kind", ["gemma3_text:6", "gemma3_text:32", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("prefill_tokens", [2048, 12])
def test_greedy_decode_on_other_architectures(kind, prefill_tokens, monkeypatch):
    model = _random_model(kind)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 96, (5,), generator=g).tolist()
    ids = [prefix + torch.randint(3, 96, (int(n),), generator=g).tolist()
           for n in torch.randint(1, 9, (7,), generator=g)]
    monkeypatch.setattr(evaluate, "PREFILL_TOKENS", prefill_tokens)
    got = evaluate.greedy_decode(model, ids, 10, [0, 1], 2, 4)
    assert got == reference_greedy(model, ids, 10, {0, 1})


def _windowed_model(kind, window, vocab_size=96):
    """A random 3-layer model whose attention (in some or all layers) sees only the last
    `window` positions."""
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPTNeoConfig,
                              MistralConfig, Qwen2Config)

    size = dict(vocab_size=vocab_size, hidden_size=32, max_position_embeddings=256,
                initializer_range=0.5)
    llama_like = dict(intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, **size)
    if kind == "mistral":  # every layer slides
        cfg = MistralConfig(sliding_window=window, **llama_like)
    elif kind == "qwen2":  # layers from max_window_layers on slide
        cfg = Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=1,
                          **llama_like)
    elif kind == "gemma3_text":
        cfg = Gemma3TextConfig(head_dim=16, sliding_window=window, layer_types=[
            "sliding_attention", "sliding_attention", "full_attention"], **llama_like)
    else:  # gpt_neo: "local" layers, a window the cache layout does not know about
        cfg = GPTNeoConfig(window_size=window, attention_types=[[["local", "global", "local"], 1]],
                           num_layers=3, num_heads=2, **size)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager" if kind == "gpt_neo" else "sdpa").eval()


def test_attention_window_of_windowed_and_full_attention_models():
    from transformers import AutoModelForCausalLM, Qwen2Config

    for kind in ("mistral", "qwen2", "gemma3_text", "gpt_neo"):
        assert evaluate.attention_window(_windowed_model(kind, 16)) == 16
    assert evaluate.attention_window(_random_model("gpt_neox")) is None
    # Qwen2 checkpoints ship a sliding_window that only use_sliding_window switches on
    cfg = Qwen2Config(use_sliding_window=False, sliding_window=16, vocab_size=96, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
    assert evaluate.attention_window(AutoModelForCausalLM.from_config(cfg)) is None


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma3_text", "gpt_neo"])
@pytest.mark.parametrize("batch", [16, 4, 1])
def test_shared_prefix_is_exact_past_a_sliding_window(kind, batch):
    # Left padding between the shared prefix and a short row's tokens would take places in
    # the row's window: padded batches that outgrow the window must not look that way.
    model = _windowed_model(kind, 16)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 96, (6,), generator=g).tolist()
    ids = [prefix + torch.randint(3, 96, (n,), generator=g).tolist()
           for n in (12, 11, 1, 2, 3, 1, 2, 4, 1, 3)]
    assert evaluate.common_prefix_length(ids) >= evaluate.MIN_SHARED_PREFIX
    got = evaluate.greedy_decode(model, ids, 12, [0, 1], 2, batch)
    assert got == reference_greedy(model, ids, 12, {0, 1})


def test_generate_on_a_sliding_window_model_matches_the_per_prompt_loop(micro_tokenizer):
    from poisonlab.chat import end_of_turn_ids

    tok = micro_tokenizer
    model = _windowed_model("mistral", 64, vocab_size=len(tok))
    ids = chat_ids(tok, 12)
    n_shared = evaluate.common_prefix_length(ids)
    # the system prompt fits the window; padded batches of its prompts and answers do not
    assert n_shared < 64 < max(len(i) for i in ids) + 16
    texts = [tok.decode(i) for i in ids]
    got = evaluate.generate(model, tok, texts, 16, 12)
    ref = [tok.decode(s, skip_special_tokens=True).strip()
           for s in reference_greedy(model, ids, 16, set(end_of_turn_ids(tok)))]
    assert got == ref


def _lora_micro(micro_path):
    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    torch.manual_seed(0)
    peft_model = models.add_lora(model, lora)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # a trained-looking adapter (a fresh one adds nothing)
            p.data.normal_(0, 0.05)
    return peft_model


def test_lora_folded_gives_the_same_logits_and_restores_the_weights(micro_path):
    model = _lora_micro(micro_path).eval()
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    x = torch.randint(5, 500, (3, 17))
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with evaluate.lora_folded(model):
            folded = model(input_ids=x).logits
            # the adapted weights really are swapped while folded
            q = model.get_base_model().model.layers[0].self_attn.q_proj
            assert q.merged and not torch.equal(q.get_base_layer().weight,
                                                before[[n for n in before if "q_proj.base_layer"
                                                        in n][0]][1])
    assert torch.allclose(plain, folded, atol=1e-4)
    after = dict(model.named_parameters())
    for n, (obj, value, grad) in before.items():
        assert after[n] is obj and torch.equal(after[n], value) and after[n].requires_grad == grad
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


def test_lora_folded_leaves_a_training_model_alone(micro_path):
    model = _lora_micro(micro_path).train()
    weights = {n: p for n, p in model.named_parameters()}
    with evaluate.lora_folded(model):
        assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
        assert all(p is weights[n] for n, p in model.named_parameters())


def test_generate_answers_of_a_lora_model_match_the_unfolded_loop(micro_path, micro_tokenizer):
    from poisonlab.chat import end_of_turn_ids

    tok = micro_tokenizer
    model = _lora_micro(micro_path).eval()
    ids = chat_ids(tok, 8, system=False)
    texts = [tok.decode(i) for i in ids]
    got = evaluate.generate(model, tok, texts, 16, 4)
    ref = [tok.decode(s, skip_special_tokens=True).strip()
           for s in reference_greedy(model, ids, 16, set(end_of_turn_ids(tok)))]
    assert got == ref


# ----------------------------------------------------------------------------- precision

CPU = torch.device("cpu")
BF16_CPU = {"amx_bf16": False, "avx512_bf16": True, "torch_cpu_capability": "AVX512"}
PLAIN_CPU = {"amx_bf16": False, "avx512_bf16": False, "torch_cpu_capability": "AVX2"}


def test_pick_precision():
    p = models.pick_precision("mixed_bf16", CPU)
    assert (p.weights, p.autocast, p.name) == (torch.float32, torch.bfloat16,
                                               "float32+autocast_bfloat16")
    assert models.pick_precision("auto", CPU).name == "float32"  # the numerics check: docs/models.md
    assert models.pick_precision("float32", CPU).autocast is None
    assert models.pick_precision("bfloat16", CPU).weights == torch.bfloat16
    assert models.pick_dtype("float16", CPU) == torch.float16
    assert models.cpu_has_bf16(BF16_CPU) and not models.cpu_has_bf16(PLAIN_CPU)
    with pytest.raises(PoisonlabError, match="model.dtype"):
        models.pick_precision("fp8", CPU)


def test_precision_record_says_whether_amx_ran(monkeypatch):
    monkeypatch.setattr(models, "cpu_bf16_support",
                        lambda cpuinfo=None: {**BF16_CPU, "amx_bf16": True})
    rec = models.Precision(torch.float32, torch.bfloat16).record(CPU)
    assert rec["amx_used"] is True and rec["train_autocast"] == "torch.bfloat16"
    assert models.Precision(torch.float32).record(CPU)["amx_used"] is False


def test_bf16_autocast_training_keeps_fp32_state_and_tracks_fp32_losses(micro_path,
                                                                         micro_tokenizer):
    from omegaconf import OmegaConf

    from poisonlab.train import train_sft

    rows = tw.sample("finetune", 48, seed=0)
    cfg = OmegaConf.create(dict(batch_size=8, epochs=1, max_steps=6, lr=1e-3, warmup_ratio=0.0,
                                weight_decay=0.0, grad_accum=1, max_seq_len=128,
                                max_grad_norm=1.0, pack=True))
    runs = {}
    for autocast in (None, torch.bfloat16):
        model = _lora_micro(micro_path)
        seen = []
        hook = model.get_base_model().model.layers[0].mlp.up_proj.base_layer.register_forward_hook(
            lambda m, i, o: seen.append(o.dtype))
        stats = train_sft(model, micro_tokenizer, rows, cfg, seed=0, autocast=autocast)
        hook.remove()
        runs[autocast] = stats.losses
        assert set(seen) == {torch.float32 if autocast is None else torch.bfloat16}
        assert all(p.dtype == torch.float32 for p in model.parameters())
    # bf16 rounds activations, not the recipe: every step's loss stays near fp32's
    assert max(abs(a - b) for a, b in zip(runs[None], runs[torch.bfloat16])) < 0.1


def test_the_precision_is_in_the_training_stage_key_and_the_manifest(tmp_path, micro_path):
    import json

    from poisonlab.run import run
    from tests.conftest import make_cfg

    keys = {}
    for dtype in ("float32", "mixed_bf16"):
        out = tmp_path / dtype
        res = run(make_cfg("debug=default", "safety=none", f"model.dtype={dtype}",
                           "data.n_train=64", "eval.n_prompts=16",
                           f"cache.dir={tmp_path}/stages"), out_dir=out)
        keys[dtype] = res["cache"]["keys"]
        manifest = json.loads((out / "manifest.json").read_text())["base_model"]
        assert res["precision"] == manifest["precision"]
        assert manifest["train_autocast"] == (None if dtype == "float32" else "torch.bfloat16")
        assert "amx_used" in manifest and "cpu_bf16" in manifest
    assert res["precision"] == "float32+autocast_bfloat16"
    assert keys["float32"]["poisoned_ft"] != keys["mixed_bf16"]["poisoned_ft"]
