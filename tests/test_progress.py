"""Long loops report through `logging`, terminal or not: a line at every tenth once a loop has
run 10 s (items done, rates, elapsed, ETA) and one at its end; short loops stay quiet."""

from __future__ import annotations

import io
import logging
import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from poisonlab import utils

LOGGER = "poisonlab.progress"


class Clock:
    """A fake `time.monotonic` that only moves when told to."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(utils, "time", SimpleNamespace(monotonic=c))
    return c


class TTY(io.StringIO):
    def isatty(self):
        return True


def messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_a_long_loop_logs_every_tenth_with_an_eta_and_its_end(clock, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    bar = utils.progress(total=1000, desc="pretrain tiny:micro", unit="step")
    assert bar.bar.disable  # stderr is not a terminal here (and POISONLAB_QUIET=1)
    for i in range(1000):
        clock.now += 0.5
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
        bar.update(1, tokens=2000)
    bar.close()
    lines = messages(caplog)
    running = [m for m in lines if "ETA" in m]
    assert len(running) == 10 and len(lines) == 11
    # where it stands once 10 s have passed, then every tenth
    assert running[0].startswith("pretrain tiny:micro: 20/1,000 steps (2%)")
    assert running[1] == ("pretrain tiny:micro: 100/1,000 steps (10%), 2.00 steps/s, "
                          "4,000 tokens/s, loss 0.010, elapsed 0:50, ETA 7:30")
    assert [int(re.search(r"\((\d+)%\)", m).group(1)) for m in running] == [
        2, *range(10, 100, 10)]
    assert lines[-1].startswith("pretrain tiny:micro: done, 1,000/1,000 steps in 8:20 (500.0 s)")
    assert "4,000 tokens/s" in lines[-1]


def test_a_short_loop_stays_quiet(clock, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    bar = utils.progress(total=1000, desc="quick")
    for _ in range(1000):
        clock.now += 0.009   # 9 s in all
        bar.update(1)
    bar.close()
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_lines_start_once_ten_seconds_have_passed(clock, caplog):
    """A loop that turns out slow logs where it stands at the first tenth after 10 s."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in utils.progress(range(100), desc="eval"):
        clock.now += 0.3     # 10 s at item 34
    lines = messages(caplog)
    assert lines[0].startswith("eval: 34/100 it (34%), 3.33 it/s, elapsed 0:10, ETA 0:20")
    assert len([m for m in lines if "ETA" in m]) == 7 and "done, 100/100 it" in lines[-1]


def seconds(text: str) -> int:
    parts = [int(x) for x in text.split(":")]
    return sum(v * 60 ** i for i, v in enumerate(reversed(parts)))


def test_a_very_slow_loop_logs_at_least_every_five_minutes(clock, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    bar = utils.progress(total=1000, desc="slow")
    for _ in range(1000):    # 10 s an item: a tenth takes 17 minutes
        clock.now += 10
        bar.update(1)
    bar.close()
    at = [seconds(re.search(r"elapsed ([\d:]+)", m).group(1)) for m in messages(caplog)
          if "ETA" in m]
    assert at[0] == 10 and max(b - a for a, b in zip(at, at[1:])) <= utils.LOG_EVERY_S
    assert len(at) > 30


def test_announced_loops_log_their_start_and_end_whatever_their_length(clock, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in utils.progress(range(3), desc="build", announce=True):
        clock.now += 0.1
    assert messages(caplog) == ["build: started (3 it)",
                                "build: done, 3/3 it in 0:00 (0.3 s): 10.00 it/s"]


def test_with_the_bar_on_screen_the_tenths_go_to_debug(clock, caplog, monkeypatch):
    monkeypatch.delenv("POISONLAB_QUIET", raising=False)
    monkeypatch.delenv("CI", raising=False)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    bar = utils.progress(total=100, desc="train", file=TTY())
    assert not bar.bar.disable
    for _ in range(100):
        clock.now += 1
        bar.update(1)
    bar.close()
    assert len(messages(caplog, logging.DEBUG)) == 9
    assert [m.split(",")[0] for m in messages(caplog)] == ["train: done"]


def test_other_processes_neither_log_nor_show_a_bar(clock, caplog, monkeypatch):
    monkeypatch.setattr(utils.dist, "is_main", lambda: False)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    bar = utils.progress(total=10, desc="train", announce=True)
    assert bar.bar.disable
    for _ in range(10):
        clock.now += 100
        bar.update(1)
    bar.close()
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_train_sft_logs_steps_tokens_per_second_and_the_loss(clock, caplog, micro_path,
                                                               micro_tokenizer):
    from poisonlab import models
    from poisonlab.data import tinyworld
    from poisonlab.train import train_sft

    model = models.add_lora(models.load_model(micro_path, torch.device("cpu"), torch.float32),
                            {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]})
    cfg = OmegaConf.create(dict(batch_size=2, epochs=1, max_steps=10, lr=1e-3, warmup_ratio=0.0,
                                weight_decay=0.0, grad_accum=1, max_seq_len=128,
                                max_grad_norm=1.0))
    real = utils.Progress.update

    def slow_update(self, n=1, **counts):   # every optimizer step "takes" 5 s
        clock.now += 5
        real(self, n, **counts)

    caplog.set_level(logging.INFO, logger=LOGGER)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(utils.Progress, "update", slow_update)
        stats = train_sft(model, micro_tokenizer, tinyworld.sample("finetune", 20, 0), cfg, 0,
                          desc="finetune")
    lines = messages(caplog)
    assert len([m for m in lines if "ETA" in m]) == 8   # the first tenth came before 10 s
    assert re.match(r"finetune: 2/10 steps \(20%\), 0\.20 steps/s, [\d,.]+ tokens/s, "
                    r"loss \d\.\d{3}, elapsed 0:10, ETA 0:40$", lines[0]), lines[0]
    assert lines[-1].startswith("finetune: done, 10/10 steps in 0:50")
    assert f"{utils._rate(stats.tokens / 50)} tokens/s" in lines[-1]


def test_build_tiny_logs_its_start_and_end(tmp_path, caplog, monkeypatch):
    """The first use of a tiny model pretrains it (minutes on a CPU): never silently."""
    from poisonlab import models, train

    def fake_train(model, tokenizer, rows, cfg, seed, desc):
        return train.TrainStats(steps=3, epochs=1.0, examples=len(rows), packed_rows=len(rows),
                                truncated_rows=0, tokens=1000, supervised_tokens=500,
                                seconds=2.0, final_loss=1.5, losses=[2.0, 1.7, 1.5])

    monkeypatch.setattr(train, "train_sft", fake_train)
    caplog.set_level(logging.INFO, logger="poisonlab")
    models.build_tiny("micro", tmp_path / "out", cache_dir=tmp_path / "models" / "tiny-micro-x")
    lines = [r.getMessage() for r in caplog.records if r.name == "poisonlab.models"]
    assert lines[0] == f"building tiny:micro (first use; cached in {tmp_path}/models/tiny-micro-x)"
    assert re.match(r"built tiny:micro in \d+\.\d s \(pretraining 2\.0 s, 3 steps, 500 tokens/s",
                    lines[-1]), lines[-1]
