"""wandb tracking: an offline run of the shared debug run, read back from its own files."""

import json
import math
import shutil
import struct
import sys
from pathlib import Path

import pytest

from poisonlab import PoisonlabError, tracking
from poisonlab.utils import read_jsonl

wandb = pytest.importorskip("wandb")


def records(path: Path):
    """The protobuf records of an offline run's `run-<id>.wandb` file (wandb's LevelDB-style
    log: a 7-byte file header, then 32 KiB blocks of chunks with 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST chunk
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def read_summary(log: Path) -> dict:
    """The run's summary as wandb last wrote it (nested keys as nested dicts)."""
    summary: dict = {}
    for rec in records(log):
        if rec.WhichOneof("record_type") == "summary":
            for i in rec.summary.update:  # a nested key: ["generations", "path"]
                *parents, last = list(i.nested_key) or [i.key]
                d = summary
                for k in parents:
                    d = d.setdefault(k, {})
                d[last] = json.loads(i.value_json)
    return summary


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline wandb with every file of its own under tmp_path, run from an empty cwd."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_log_run_offline_writes_into_the_run_dir(debug_run, tmp_path, offline):
    src, results, cfg = debug_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    # a run some earlier cell left open: this run must not log into it (reinit)
    wandb.init(project="stray", mode="offline", dir=str(tmp_path / "stray"))
    tracking.log_run(cfg, results, out)
    wandb.teardown()  # wait for wandb's writer process to flush the runs' files
    (stray_log,) = (tmp_path / "stray").glob("wandb/offline-run-*/run-*.wandb")
    assert [r.WhichOneof("record_type") for r in records(stray_log)][-1] == "exit"
    assert not (offline / "wandb").exists()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    summary, artifacts, config = read_summary(log), {}, {}
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "artifact":
            artifacts[rec.artifact.name] = rec.artifact
        elif kind == "run":
            assert rec.run.project == cfg.wandb.project and rec.run.display_name == cfg.name
        if kind in ("run", "config"):
            update = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in update})
    assert rec.WhichOneof("record_type") == "exit"  # finished
    assert config["seed"] == cfg.seed and config["attack"]["trigger"] == cfg.attack.trigger
    for stage, metrics in results["stages"].items():
        for m in ("asr", "ftr_clean", "ftr_near", "clean_utility"):
            for k, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high"),
                              ("n", "_n")):
                assert math.isclose(summary[f"{stage}/{m}{suffix}"], metrics[m][k]), (stage, m)
        for kind, rate in metrics["ftr_near_by_kind"].items():
            assert math.isclose(summary[f"{stage}/ftr_near_by_kind/{kind}"], rate["value"])
    assert math.isclose(summary["persistence"], results["persistence"]["value"])
    assert math.isclose(summary["removal/der"], results["removal"]["der"])
    # generations: the table file holds the first answers of each stage and split
    table = summary["generations"]
    rows = json.loads((run_dir / "files" / table["path"]).read_text())
    n = tracking.N_GENERATIONS
    want = [[s, sp, g["id"], g["prompt"], g["response"], g.get("target"), g.get("correct")]
            for s in results["stages"] for sp in results["evaluation"]["split_sizes"]
            for g in read_jsonl(out / "generations" / f"{s}_{sp}.jsonl")[:n]]
    assert rows["columns"][:2] == ["stage", "split"] and rows["data"] == want
    # adapters: model artifacts by reference to the run's own files
    for name, stage in (("poisoned", "poisoned"), ("safety", "after_safety"),
                        ("clean_ft", "clean_ft")):
        art = artifacts[f"{cfg.name}-{name}"]
        assert art.type == "model" and json.loads(art.metadata)["stage"] == stage
        refs = {e.path: e.ref for e in art.manifest.contents}
        assert refs == {f"{name}/{p.name}": p.resolve().as_uri()
                        for p in (out / "adapters" / name).iterdir()}


def test_persistence_curve_is_a_line_plot(tmp_path, offline, micro_path):
    from poisonlab.run import run
    from tests.conftest import make_cfg

    cfg = make_cfg("debug=default", "eval.n_prompts=8", "train.epochs=1", "control=false",
                   "safety.n_rows=64", "safety.batch_size=16", "safety.eval_every=2",
                   "safety.curve_n_prompts=8", "eval.cache_base=false")
    out = tmp_path / "run"
    results = run(cfg, out_dir=out)
    points = results["curves"]["after_safety"]
    assert len(points) >= 3
    tracking.log_run(cfg, results, out)
    wandb.teardown()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    table = read_summary(log)["curves/after_safety_table"]
    data = json.loads((run_dir / "files" / table["path"]).read_text())["data"]
    assert data == [[p["rows_seen"], m, p[m]["value"]] for m in tracking.CURVE_METRICS
                    for p in points]


def test_missing_wandb_is_a_one_line_error(debug_run, monkeypatch, tmp_path):
    _, results, cfg = debug_run
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(PoisonlabError, match="pip install wandb") as e:
        tracking.log_run(cfg, results, tmp_path)
    assert "\n" not in str(e.value)


def test_flatten_keeps_intervals_and_skips_lists():
    rate = {"value": 0.5, "ci_low": 0.25, "ci_high": 0.75, "n": 8}
    got = tracking.summary({"stages": {"poisoned": {"asr": rate, "by": {"a": rate}}},
                            "train": {"poisoned": {"steps": 3, "losses": [1.0, 0.5]}},
                            "removal": {"der": 0.5, "fidelity": None}})
    assert got == {"poisoned/asr": 0.5, "poisoned/asr_ci_low": 0.25,
                   "poisoned/asr_ci_high": 0.75, "poisoned/asr_n": 8,
                   "poisoned/by/a": 0.5, "poisoned/by/a_ci_low": 0.25,
                   "poisoned/by/a_ci_high": 0.75, "poisoned/by/a_n": 8,
                   "train/poisoned/steps": 3, "removal/der": 0.5}
