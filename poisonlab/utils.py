"""Small helpers shared across stages: progress bars, hashing, seeding, JSONL."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from poisonlab import dist


def progress(iterable=None, **kw):
    """tqdm, quiet under CI, when POISONLAB_QUIET=1 and on every process but the main one
    (and off when stderr is not a TTY)."""
    quiet = (os.environ.get("CI") == "true" or os.environ.get("POISONLAB_QUIET") == "1"
             or not dist.is_main())
    return tqdm(iterable, disable=True if quiet else None, dynamic_ncols=True, **kw)


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
