"""Small helpers shared across stages: progress bars (and their log lines), hashing, seeding,
JSONL."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from poisonlab import dist


PROGRESS_LOG = logging.getLogger("poisonlab.progress")
LOG_AFTER_S = 10.0   # a loop logs only once it has run this long (short loops stay quiet)
LOG_STEPS = 10       # then a line at every tenth of its total
LOG_EVERY_S = 300.0  # and at least this often, however long a tenth takes


def bars_off() -> bool:
    """Progress bars are off under CI, with POISONLAB_QUIET=1 and on every process but the
    main one (and tqdm turns them off when stderr is not a TTY)."""
    return (os.environ.get("CI") == "true" or os.environ.get("POISONLAB_QUIET") == "1"
            or not dist.is_main())


def duration(seconds: float) -> str:
    """`83.2` -> '1:23', `4000` -> '1:06:40'."""
    s = max(0, int(round(seconds)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _plural(unit: str) -> str:
    return unit if unit == "it" or unit.endswith("s") else unit + "s"


class Progress:
    """A tqdm bar that also reports through `logging` (logger `poisonlab.progress`), so a run
    without a terminal (nohup, a job scheduler, CI) is never silent for minutes.

    Once the loop has run `LOG_AFTER_S` seconds it logs where it stands, then a line at every
    tenth of its total (and at least every `LOG_EVERY_S` seconds): items done, rates (per
    second, of the items and of every count given to `update`, e.g. tokens), the bar's postfix
    (the loss), the time elapsed and an ETA; and at `close` one line with its total time.
    Loops that end sooner log nothing, unless `announce` (a line as it starts and one as it
    ends, whatever its length). While the bar itself is on screen the
    tenths are logged at DEBUG only (the bar shows them). Nothing is logged, and no bar is
    shown, on a process other than the main one.

    Drop-in for the tqdm calls of this package: iterate it, or call `update(n)`,
    `set_postfix(...)` and `close()`; `update(n, tokens=k)` adds to a named count.
    """

    def __init__(self, iterable=None, total=None, desc=None, unit="it", announce=False,
                 logger=None, **kw):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.unit = iterable, total, unit
        self.desc = desc or "progress"
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=True if bars_off() else None,
                        dynamic_ncols=True, **kw)
        self.log = (logger or PROGRESS_LOG) if dist.is_main() else None
        self.tenth_level = logging.DEBUG if not self.bar.disable else logging.INFO
        self.announce = announce
        self.n, self.counts, self.postfix = 0, {}, {}
        self.tenths = 0          # tenths of the total already logged
        self.last = None         # when the last line was logged (None: none yet)
        self.closed = False
        self.t0 = time.monotonic()
        if self.log is not None and announce:
            size = f" ({total:,} {_plural(unit)})" if total else ""
            self.log.info("%s: started%s", self.desc, size)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):  # anything else tqdm offers (set_description, write, ...)
        if name == "bar":
            raise AttributeError(name)
        return getattr(self.bar, name)

    def set_postfix(self, ordered_dict=None, refresh=True, **kw):
        self.postfix = {**(ordered_dict or {}), **kw}
        self.bar.set_postfix(ordered_dict, refresh=refresh, **kw)

    def update(self, n=1, **counts):
        self.n += n
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.bar.update(n)
        if self.log is None or not self.total or self.n >= self.total:
            return
        elapsed = time.monotonic() - self.t0
        if elapsed < LOG_AFTER_S:
            return
        tenths = self.n * LOG_STEPS // self.total
        if self.last is None or tenths > self.tenths or elapsed - self.last >= LOG_EVERY_S:
            self.tenths, self.last = tenths, elapsed
            if self.log.isEnabledFor(self.tenth_level):
                self.log.log(self.tenth_level, "%s", self._line(elapsed))

    def _rates(self, elapsed: float) -> list[str]:
        if elapsed <= 0:
            return []
        return [f"{_rate(self.n / elapsed)} {_plural(self.unit)}/s"] + [
            f"{_rate(v / elapsed)} {k}/s" for k, v in self.counts.items()]

    def _line(self, elapsed: float) -> str:
        done = f"{self.n:,}/{self.total:,} {_plural(self.unit)} ({100 * self.n / self.total:.0f}%)"
        eta = elapsed * (self.total - self.n) / self.n if self.n else None
        parts = [done, *self._rates(elapsed), *(f"{k} {v}" for k, v in self.postfix.items()),
                 f"elapsed {duration(elapsed)}", f"ETA {duration(eta) if eta is not None else '?'}"]
        return f"{self.desc}: " + ", ".join(parts)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        elapsed = time.monotonic() - self.t0
        if self.log is None or not (self.announce or elapsed >= LOG_AFTER_S):
            return
        done = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "")
        parts = [*self._rates(elapsed), *(f"{k} {v}" for k, v in self.postfix.items())]
        self.log.info("%s: done, %s %s in %s (%.1f s)%s", self.desc, done, _plural(self.unit),
                      duration(elapsed), elapsed, f": {', '.join(parts)}" if parts else "")


def progress(iterable=None, **kw) -> Progress:
    """A progress bar (`Progress`): tqdm's where a terminal shows it, and log lines for loops
    that run longer than `LOG_AFTER_S` seconds, terminal or not. Keywords: `total`, `desc`,
    `unit`, `announce` (log its start and end whatever its length), `logger`; others go to
    tqdm."""
    return Progress(iterable, **kw)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` (created if missing), released on exit or process death."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_jsonl(path: Path, rows) -> None:
    """Atomic JSONL write, by the main process only (`dist`)."""
    if not dist.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
