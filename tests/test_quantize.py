"""The quantization defence: the grid is what it says, and the method runs end to end."""

import json

import pytest
import torch

from poisonlab.defenses.quantize import quantize_linear_weights, quantize_tensor
from tests.conftest import make_cfg


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_land_on_a_symmetric_grid_per_group(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 100)
    q = quantize_tensor(w, bits, group_size=32)
    qmax = 2 ** (bits - 1) - 1
    for g in range(0, 100, 32):
        block, qblock = w[:, g:g + 32], q[:, g:g + 32]
        scale = block.abs().amax(dim=1, keepdim=True) / qmax
        steps = qblock / scale
        assert torch.allclose(steps, steps.round(), atol=1e-4)       # on the grid
        assert (qblock - block).abs().le(scale / 2 + 1e-6).all()      # nearest point
        assert len(torch.unique(steps.round())) <= 2 ** bits


def test_every_linear_layer_is_rounded(micro_path):
    from poisonlab import models

    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = quantize_linear_weights(model, bits=4, group_size=64)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert info["tensors"] >= len(linear) - 1 and info["relative_l1_change"] > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("q_proj" in k for k in changed)
    assert not any("norm" in k for k in changed)          # only linear weights move


def test_quantize_runs_end_to_end(tmp_path, micro_path):
    from poisonlab.run import run

    res = run(make_cfg("debug=default", "data.n_train=200", "eval.n_prompts=16",
                       "train.epochs=2", "safety=quantize", "safety.bits=8"), out_dir=tmp_path)
    assert set(res["stages"]) == {"base", "poisoned", "after_safety"}
    assert res["removal"]["method"] == "quantize" and res["removal"]["seconds"] > 0
    assert (tmp_path / "models/after_safety/model.safetensors").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["defense"]["quantize"]["bits"] == 8
    # tied embeddings (tiny models): the shared table stays in full precision, and says so
    assert manifest["defense"]["quantize"]["full_precision"] == ["lm_head", "model.embed_tokens"]
    assert manifest["defense"]["quantize"]["tied_embeddings"] is True
    assert manifest["reload"]["after_safety"][0].startswith("models/after_safety")


@pytest.mark.parametrize("override,key", [("safety.bits=3", "safety.bits"),
                                          ("safety.group_size=0", "safety.group_size")])
def test_bad_quantize_configs_fail_before_any_work(tmp_path, override, key):
    from poisonlab import PoisonlabError
    from poisonlab.run import run

    with pytest.raises(PoisonlabError, match=key.replace(".", r"\.")):
        run(make_cfg("debug=default", "safety=quantize", override), out_dir=tmp_path)
