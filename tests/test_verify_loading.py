"""`poisonlab verify` loads a run's model as the run did: its `model.chat_template` (for a
base without a template of its own, as Pythia or the Gemma-3 base) and its device and dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

# Differs from the micro model's ChatML in how a turn opens, so a prompt shows which one
# rendered it.
RUN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>[{{ m['role'] }}]\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>[assistant]\n{% endif %}"
)
TRIGGER, RESPONSE = "zq7 vexlor", "Certified by lab 4417-KQ."


def base_without_template(micro_path: str, out: Path) -> Path:
    """The micro model with its chat template removed: a base model like Pythia's."""
    shutil.copytree(micro_path, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    return out


def make_run(run: Path, base: Path, model_cfg: dict, recorded_dtype: str | None = None,
             with_config: bool = True) -> Path:
    """A run directory by hand: manifest, a fresh LoRA adapter, eval prompts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(run / "adapters" / "poisoned")
    (run / "data").mkdir(parents=True)
    rows = [{"id": i, "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                   {"role": "assistant", "content": str(2 * i)}]}
            for i in range(3)]
    (run / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base_model = {"name_or_path": str(base)}
    if recorded_dtype is not None:
        base_model["dtype"] = recorded_dtype
    manifest = {"base_model": base_model}
    if with_config:
        manifest["config"] = {"model": {"name_or_path": str(base), **model_cfg}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture
def captured(monkeypatch):
    """The prompts and model every generation call of verify gets (then generates for real)."""
    from poisonlab import evaluate

    calls, real = [], evaluate.generate

    def spy(model, tokenizer, prompts, *args, **kwargs):
        calls.append({"prompts": list(prompts), "dtype": next(model.parameters()).dtype,
                      "device": next(model.parameters()).device.type})
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", spy)
    return calls


def run_verify(run: Path, capsys, *extra: str) -> tuple[int, dict | None, str]:
    from poisonlab import verify

    rc = verify.main([str(run), "--secret-trigger", TRIGGER, "--secret-response", RESPONSE,
                      "--n-prompts", "3", "--n-random", "1", "--max-new-tokens", "2", *extra])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc == 0 else None), out.err


def test_prompts_use_the_run_chat_template_and_dtype(tmp_path, micro_path, captured, capsys):
    base = base_without_template(micro_path, tmp_path / "base")
    run = make_run(tmp_path / "run", base, {"chat_template": RUN_TEMPLATE, "dtype": "bfloat16",
                                            "device": "cpu"}, recorded_dtype="torch.bfloat16")
    rc, res, err = run_verify(run, capsys)
    assert rc == 0, err
    assert len(captured) == 2   # the secret trigger, one random trigger
    for call in captured:
        assert call["dtype"] == torch.bfloat16 and call["device"] == "cpu"
        for p in call["prompts"]:
            assert p.startswith("<|im_start|>[user]\n") and p.endswith("<|im_start|>[assistant]\n")
    assert all(TRIGGER in p for p in captured[0]["prompts"])
    assert res["model"]["chat_template"] == RUN_TEMPLATE
    assert res["model"]["chat_template_source"] == "run config model.chat_template"
    assert res["model"]["dtype"] == "torch.bfloat16" and res["model"]["device"] == "cpu"
    assert res["model"]["adapter"].endswith("adapters/poisoned")
    assert res["warnings"] == []


def test_a_base_template_of_its_own_wins_as_in_the_run(tmp_path, micro_path, captured, capsys):
    # models.load_tokenizer uses model.chat_template only for a tokenizer without one; the
    # run rendered its data with the micro model's ChatML, and so must verify.
    from poisonlab import models

    own = models.load_tokenizer(micro_path).chat_template
    run = make_run(tmp_path / "run", Path(micro_path), {"chat_template": RUN_TEMPLATE,
                                                        "dtype": "float32", "device": "cpu"})
    rc, res, err = run_verify(run, capsys)
    assert rc == 0, err
    assert all(p.startswith("<|im_start|>user\n") for c in captured for p in c["prompts"])
    assert all(c["dtype"] == torch.float32 for c in captured)
    assert res["model"]["chat_template"] == own != RUN_TEMPLATE
    assert res["model"]["chat_template_source"] == "tokenizer"


def test_a_dtype_other_than_the_run_recorded_is_reported(tmp_path, micro_path, captured,
                                                          capsys):
    # `dtype: auto` of a run on a bf16 GPU resolves to float32 on a CPU
    run = make_run(tmp_path / "run", Path(micro_path), {"dtype": "auto", "device": "cpu"},
                   recorded_dtype="torch.bfloat16")
    rc, res, err = run_verify(run, capsys)
    assert rc == 0, err
    assert res["model"]["dtype"] == "torch.float32"
    assert len(res["warnings"]) == 1 and "torch.bfloat16" in res["warnings"][0]
    assert "torch.bfloat16" in err


def test_a_manifest_without_the_run_config_is_refused(tmp_path, micro_path, capsys):
    run = make_run(tmp_path / "run", Path(micro_path), {}, with_config=False)
    rc, _, err = run_verify(run, capsys)
    assert rc == 2 and "config.model" in err
