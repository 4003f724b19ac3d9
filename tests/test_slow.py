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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lean_decoder_and_a_bf16_run_on_cuda(micro_path, micro_tokenizer, tmp_path):
    from poisonlab import models
    from poisonlab.chat import end_of_turn_ids
    from poisonlab.evaluate import greedy_decode
    from poisonlab.run import run
    from tests.test_decoding import chat_ids, reference_greedy

    device = torch.device("cuda")
    model = models.load_model(micro_path, device, torch.float32).eval()
    ids = chat_ids(micro_tokenizer, 12)
    stop = end_of_turn_ids(micro_tokenizer)
    got = greedy_decode(model, ids, 16, stop, micro_tokenizer.pad_token_id, 5)
    ref = reference_greedy(model.cpu(), ids, 16, set(stop))
    # fp32 on a GPU: TF32 and other kernels may flip a near-tie; the decoder must still agree
    assert sum(a == b for a, b in zip(got, ref)) >= len(ref) - 1
    res = run(make_cfg("debug=default", "safety=none", "model.device=cuda",
                       "cache.enabled=false"), out_dir=tmp_path)
    assert res["precision"] == "bfloat16"
    assert res["stages"]["poisoned"]["asr"]["value"] >= 0.5
