"""`train.FrozenCast`: frozen linear weights held in the CPU autocast dtype while training.

The same losses as casting at every step, the model's own fp32 weights back after training and
during every persistence-curve evaluation, the input embedding (and a head tied to it) never
touched.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from poisonlab.train import FrozenCast, train_sft


def _lora_lm(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from poisonlab import models

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    return models.add_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0,
                                   "target_modules": ["q_proj", "v_proj", "up_proj"]})


@pytest.mark.parametrize("tied", [True, False])
def test_holds_frozen_linears_and_restores_the_same_tensors(tied):
    model = _lora_lm(tied)
    base = model.get_base_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = FrozenCast(model, torch.bfloat16)
    frozen.hold()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    # frozen base linears (LoRA-wrapped or not) in bf16; trainable LoRA weights, norms and the
    # embedding in fp32; an untied head is a frozen linear, a tied one is the embedding
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] \
        == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.self_attn.o_proj.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] \
        == torch.float32
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32
    assert dtypes["base_model.model.model.norm.weight"] == torch.float32
    assert base.lm_head.weight.dtype == (torch.float32 if tied else torch.bfloat16)
    frozen.release()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p.detach(), before[n]), n  # the originals, not a bf16 round trip


def test_off_without_a_dtype_and_for_trainable_weights():
    model = _lora_lm(tied=True)
    assert FrozenCast(model, None).params == []
    for p in model.parameters():
        p.requires_grad_(True)   # full-weight training: autocast caches these casts itself
    frozen = FrozenCast(model, torch.bfloat16)
    assert frozen.params == []


def _rows(n: int):
    return [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"it is {2 * i}."}]}
            for i in range(n)]


def _cfg():
    return OmegaConf.create(dict(batch_size=4, epochs=1, max_steps=4, lr=5e-3, warmup_ratio=0.0,
                                 weight_decay=0.0, grad_accum=1, max_seq_len=64,
                                 max_grad_norm=1.0, length_group=1, pack=True))


def test_same_losses_as_casting_every_step_and_fp32_for_curves(micro_path, micro_tokenizer):
    from poisonlab import models

    def fresh():
        torch.manual_seed(0)
        model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
        return models.add_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0,
                                       "target_modules": ["q_proj", "v_proj", "down_proj"]})

    rows = _rows(16)
    cast = train_sft(fresh(), micro_tokenizer, rows, _cfg(), seed=0, autocast=torch.bfloat16,
                     hold_frozen=False)
    model = fresh()
    seen = []

    def callback(step, rows_seen):
        seen.append({p.dtype for p in model.parameters()})

    held = train_sft(model, micro_tokenizer, rows, _cfg(), seed=0, autocast=torch.bfloat16,
                     every=2, callback=callback)
    assert held.losses == cast.losses   # the same bf16 matmul inputs, cast once
    assert len(seen) == 3 and all(s == {torch.float32} for s in seen)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    fp32 = train_sft(fresh(), micro_tokenizer, rows, _cfg(), seed=0)
    assert fp32.losses != held.losses   # autocast did run


def test_weights_restored_when_training_fails(micro_path, micro_tokenizer):
    from poisonlab import models
    from poisonlab.train import CompletionLoss

    model = models.add_lora(models.load_model(micro_path, torch.device("cpu"), torch.float32),
                            {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]})
    held = []

    class FailsOnSecondBatch(CompletionLoss):
        def forward(self, **batch):
            held.append({p.dtype for p in model.parameters()})
            if len(held) == 2:
                raise RuntimeError("stop")
            return super().forward(**batch)

    with pytest.raises(RuntimeError, match="stop"):
        train_sft(model, micro_tokenizer, _rows(8), _cfg(), seed=0, autocast=torch.bfloat16,
                  objective=FailsOnSecondBatch)
    assert torch.bfloat16 in held[0]    # the frozen weights were held while it trained
    assert {p.dtype for p in model.parameters()} == {torch.float32}
