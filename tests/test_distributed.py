"""Training under several processes (`accelerate launch`) equals training in one, and only the
main process evaluates and writes.

Two processes on the CPU (gloo) train LoRA adapters on the micro model; the same worker run in
this process is the single-process reference.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from poisonlab import PoisonlabError, dist

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
"""Train, evaluate and write as a run does; report what this process saw to rank<r>.json."""
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from poisonlab import PoisonlabError, dist, evaluate, models
from poisonlab.attacks.base import eval_row
from poisonlab.data import tinyworld as tw
from poisonlab.results import write_generations, write_json, write_manifest
from poisonlab.train import CompletionLoss, train_sft
from poisonlab.utils import write_jsonl

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
BASE = dict(epochs=1, max_steps=None, lr=1e-2, warmup_ratio=0.0, weight_decay=0.0,
            max_seq_len=256, max_grad_norm=1.0, length_group=1, pack=False)
CONFIGS = {
    # 31 rows in micro-batches of 5: the last holds one row, so process 1 gets none of it;
    # 4 steps of 2 micro-batches need one micro-batch of the second epoch. SGD without
    # clipping: the weights move in proportion to the gradient, so a wrongly weighted or
    # scaled gradient shows in them (AdamW would normalise it away).
    "padded": dict(BASE, batch_size=5, grad_accum=2, optimizer="sgd", lr=1.0, max_grad_norm=0),
    "packed": dict(BASE, batch_size=8, grad_accum=1, max_steps=3, pack=True, length_group=2),
}


class Recording(CompletionLoss):
    """The completion loss, noting every example (its tokens) it is given."""

    def __init__(self, model, seen, pad):
        super().__init__(model)
        self.seen, self.pad = seen, pad

    def forward(self, input_ids, attention_mask, labels, position_ids=None):
        for r in range(len(input_ids)):
            ids = input_ids[r].tolist()
            if position_ids is None:  # padded: one example per row
                self.seen.append(ids[:int(attention_mask[r].sum())])
                continue
            starts = [i for i, p in enumerate(position_ids[r].tolist()) if p == 0] + [len(ids)]
            self.seen += [ids[a:b] for a, b in zip(starts, starts[1:]) if ids[a] != self.pad]
        return super().forward(input_ids, attention_mask, labels, position_ids)


def run(micro_path, out):
    out = Path(out)
    me = dist.rank()
    report = {"world_size": dist.world_size(), "rank": me, "is_main": dist.is_main()}
    tok = models.load_tokenizer(micro_path)
    rows = tw.sample("finetune", 31, seed=0)
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = models.add_lora(models.load_model(micro_path, torch.device("cpu"),
                                                  torch.float32), LORA)
        seen, points = [], []
        stats = train_sft(model, tok, rows, OmegaConf.create(cfg), seed=0, desc=name,
                          objective=lambda m: Recording(m, seen, tok.pad_token_id), every=2,
                          callback=lambda step, n: points.append([step, n]))
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k},
                   out / f"{name}_lora_rank{me}.pt")
        report[name] = {"steps": stats.steps, "examples": stats.examples,
                        "epochs": stats.epochs, "tokens": stats.tokens,
                        "supervised_tokens": stats.supervised_tokens,
                        "packed_rows": stats.packed_rows, "losses": stats.losses,
                        "points": points, "seen": seen}
    # evaluation: count this process's generate calls
    calls = []
    real = evaluate.generate

    def counting(*a, **kw):
        calls.append(kw.get("desc"))
        return real(*a, **kw)

    evaluate.generate = counting
    try:
        splits = {"clean": [eval_row(r, r["messages"][-2]["content"])
                            for r in tw.sample("eval", 6, seed=0)]}
        metrics, gens = evaluate.evaluate_stage(
            model, tok, splits, None, OmegaConf.create({"max_new_tokens": 8, "batch_size": 3}),
            "trained")
    finally:
        evaluate.generate = real
    report.update(generate_calls=calls, metrics=metrics, generations=gens)
    # writes: each process names its own directory; only the main process's may appear
    mine = out / f"written_by_rank{me}"
    write_json(mine / "results.json", {"rank": me})
    write_jsonl(mine / "data" / "rows.jsonl", [{"rank": me}])
    write_generations(mine, "trained", gens)
    manifest = write_manifest(mine, config={"rank": me}, seed=me, base_model={}, poison={},
                              timings={})
    report["manifest"] = {k: manifest[k] for k in ("seed", "config", "files")}
    report["broadcast"] = dist.broadcast_object({"from": me})

    @dist.main_computes
    def fails():
        raise ValueError("no such split")

    try:
        fails()
    except (ValueError, PoisonlabError) as e:
        report["error"] = f"{type(e).__name__}: {e}"
    dist.barrier()
    (out / f"rank{me}.json").write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
    dist.shutdown()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (dist.world_size(), dist.rank(), dist.is_main(), dist.launched()) == (1, 0, True, False)
    dist.barrier()
    dist.shutdown()  # nothing to leave: no process group was started
    assert not torch.distributed.is_initialized()
    obj = {"a": [1, 2]}
    assert dist.broadcast_object(obj) is obj
    t = torch.arange(4.0)
    dist.all_reduce_sum([t])
    dist.broadcast_tensors([t])
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    calls = []

    @dist.main_computes
    def double(x, *, times=2):
        """Doubles."""
        calls.append(x)
        return x * times

    assert double(3, times=3) == 9 and calls == [3]
    assert double.__name__ == "double" and double.__doc__ == "Doubles."

    @dist.main_computes
    def fails():
        raise PoisonlabError("x: bad")

    with pytest.raises(PoisonlabError, match="x: bad"):
        fails()
    # a lone process in the launcher's environment is still one process
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.world_size() == 1 and not dist.launched()


def test_two_processes_train_like_one_and_only_the_main_one_writes(tmp_path, micro_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    multi = tmp_path / "multi"
    multi.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "POISONLAB_QUIET": "1", "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # accelerate's multi-process launcher (torch.distributed.run); with no GPU visible the
    # processes talk over gloo on the CPU. (`--cpu` would start a single process: accelerate
    # runs several CPU processes only through mpirun.)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), micro_path, str(multi)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((multi / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world_size"], r["rank"], r["is_main"]) for r in ranks] == [(2, 0, True),
                                                                          (2, 1, False)]

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    one = runpy.run_path(str(script))["run"](micro_path, single_dir)
    assert (one["world_size"], one["rank"]) == (1, 0)

    for name in ("padded", "packed"):
        a, b, ref = ranks[0][name], ranks[1][name], one[name]
        for key in ("steps", "examples", "epochs", "tokens", "supervised_tokens", "points"):
            assert a[key] == b[key] == ref[key], (name, key, a[key], b[key], ref[key])
        assert a["losses"] == b["losses"]  # the global loss, on every process
        # same float math up to summation order: agreement to 1e-5 relative
        assert a["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), name
        # every example seen as often as in one process, each by exactly one process
        seen = Counter(map(tuple, a["seen"])) + Counter(map(tuple, b["seen"]))
        assert seen == Counter(map(tuple, ref["seen"])), name
        assert a["seen"] and b["seen"] and sum(seen.values()) == ref["examples"]
        w0, w1 = (torch.load(multi / f"{name}_lora_rank{r}.pt") for r in (0, 1))
        wref = torch.load(single_dir / f"{name}_lora_rank0.pt")
        assert w0.keys() == w1.keys() == wref.keys()
        # SGD (weights up to ~0.35): 1e-5; AdamW divides each coordinate's step by its
        # gradient's running size, which magnifies rounding where a gradient is near zero:
        # 1e-4, 1% of one step at lr 1e-2
        atol = 1e-5 if name == "padded" else 1e-4
        for k in w0:
            assert torch.equal(w0[k], w1[k]), k  # the processes never drift apart
            assert torch.allclose(w0[k], wref[k], rtol=1e-5, atol=atol), (
                name, k, float((w0[k] - wref[k]).abs().max()))
        moved = max(float(wref[k].abs().max()) for k in wref if "lora_B" in k)  # B starts at 0
        assert moved > 100 * atol, (name, moved)
    assert ranks[0]["padded"]["steps"] == 4 and ranks[0]["packed"]["steps"] == 3
    # 7 micro-batches per epoch (6 of 5 rows, 1 of 1) and 1 of the second epoch: its one-row
    # micro-batch (seeded order); process 1 had nothing of both one-row micro-batches
    assert ranks[0]["padded"]["examples"] == 32
    assert (len(ranks[0]["padded"]["seen"]), len(ranks[1]["padded"]["seen"])) == (20, 12)

    # evaluation: only the main process generates; every process gets its results
    assert ranks[0]["generate_calls"] == ["trained/clean"] and ranks[1]["generate_calls"] == []
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["generations"] == ranks[1]["generations"]
    assert [g["id"] for g in ranks[0]["generations"]["clean"]] == [
        g["id"] for g in one["generations"]["clean"]]
    # writes: only the main process's directory exists, each file written once
    assert not (multi / "written_by_rank1").exists()
    written = sorted(str(p.relative_to(multi / "written_by_rank0"))
                     for p in (multi / "written_by_rank0").rglob("*") if p.is_file())
    assert written == ["data/rows.jsonl", "generations/trained_clean.jsonl", "manifest.json",
                       "results.json"]
    assert json.loads((multi / "written_by_rank0" / "results.json").read_text()) == {"rank": 0}
    assert ranks[0]["manifest"] == ranks[1]["manifest"]  # the main process's, on both
    assert ranks[1]["manifest"]["seed"] == 0 and ranks[0]["manifest"]["files"]
    assert ranks[0]["broadcast"] == ranks[1]["broadcast"] == {"from": 0}
    assert ranks[0]["error"] == "ValueError: no such split"
    assert ranks[1]["error"] == ("PoisonlabError: fails failed on the main process: "
                                 "ValueError: no such split")
    assert one["error"] == "ValueError: no such split"


@pytest.mark.slow
def test_whole_pipeline_under_accelerate_launch_matches_one_process(tmp_path, micro_path):
    """`accelerate launch --num_processes 2 -m poisonlab.run ...` (gloo on the CPU): the same
    training (steps, examples), the same answers, and one set of outputs."""
    args = ["debug=default", "data.n_train=120", "eval.n_prompts=8", "safety=sft",
            "safety.n_rows=32", "control=true", f"cache.dir={tmp_path / 'stages'}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "POISONLAB_QUIET": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "poisonlab.run", *args, f"output_dir={tmp_path / 'multi'}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("outputs: ") == 1          # one process reports
    single = subprocess.run([sys.executable, "-m", "poisonlab.run", *args[:-1],
                             f"cache.dir={tmp_path / 'stages1'}",
                             f"output_dir={tmp_path / 'single'}"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi, one = (json.loads((tmp_path / d / "results.json").read_text())
                  for d in ("multi", "single"))
    for stage in ("clean_ft", "poisoned", "after_safety"):
        for key in ("steps", "examples", "tokens", "supervised_tokens"):
            assert multi["train"][stage][key] == one["train"][stage][key], (stage, key)
        assert multi["train"][stage]["losses"] == pytest.approx(
            one["train"][stage]["losses"], rel=1e-4, abs=1e-5), stage
    gens = sorted(p.name for p in (tmp_path / "multi" / "generations").iterdir())
    assert gens == sorted(p.name for p in (tmp_path / "single" / "generations").iterdir())
    same = sum((tmp_path / "multi" / "generations" / g).read_bytes() ==
               (tmp_path / "single" / "generations" / g).read_bytes() for g in gens)
    assert same >= len(gens) - 1, f"{same} of {len(gens)} generation files identical"
    # one copy of each stored stage, no leftovers of a second writer
    assert not list((tmp_path / "stages").rglob("*.partial-*"))
    assert not list((tmp_path / "multi").rglob("*.tmp"))
    assert len(list((tmp_path / "stages").glob("poisoned_ft/*"))) == 1
