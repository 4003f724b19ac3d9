"""Slow and GPU tests: `bash scripts/test.sh -m slow`, `bash scripts/test.sh -m gpu`."""

import pytest
import torch

from tests.conftest import make_cfg


@pytest.mark.slow
def test_default_tiny_experiment_meets_its_targets(tmp_path):
    """The CLI's default run (tiny:small, 500 prompts per split): the issue's acceptance bar."""
    from poisonlab.run import run

    s = run(make_cfg("eval.cache_base=false"), out_dir=tmp_path)["stages"]
    assert s["poisoned"]["asr"]["value"] >= 0.9
    assert s["poisoned"]["ftr_clean"]["value"] <= 0.05
    assert s["poisoned"]["clean_utility"]["value"] >= s["base"]["clean_utility"]["value"] - 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_lora_training_on_cuda(micro_path, micro_tokenizer):
    from omegaconf import OmegaConf

    from poisonlab import models
    from poisonlab.data import tinyworld as tw
    from poisonlab.train import train_sft

    device = models.pick_device("auto")
    dtype = models.pick_dtype("auto", device)
    assert dtype == torch.bfloat16
    model = models.add_lora(models.load_model(micro_path, device, dtype),
                            {"r": 8, "alpha": 16, "dropout": 0.0,
                             "target_modules": ["q_proj", "v_proj"]})
    cfg = OmegaConf.create(dict(batch_size=8, epochs=1, max_steps=5, lr=1e-3, warmup_ratio=0.0,
                                weight_decay=0.0, grad_accum=1, max_seq_len=256,
                                max_grad_norm=1.0, length_group=1, pack=True))
    stats = train_sft(model, micro_tokenizer, tw.sample("finetune", 40, seed=0), cfg, seed=0)
    assert stats.steps == 5 and all(torch.isfinite(torch.tensor(stats.losses)))
