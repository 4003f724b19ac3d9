"""The stage store: computed stages on disk, and one run's record of them.

A run is a chain of stages (see `STAGES`); each is keyed by the SHA-256 of exactly what defines
it (`poisonlab.pipeline.keys`): its own settings, the keys or content of what it reads (external
files by their content), and the source of the code it can run (its import closure). A computed
stage is stored once under `cache.dir` (default `$POISONLAB_HOME/stages`):

    <store>/<stage>/<key>/stage.json   name, key, spec, payload (JSON) and its SHA-256,
                                       SHA-256 of each file
    <store>/<stage>/<key>/files/...    the files the stage wrote into its run directory

written to a temporary directory and renamed into place (never half-written), computed under a
per-key file lock (concurrent cells wait for each other instead of computing it twice), and
verified before every reuse — each file and the payload against their SHA-256, and the stage's
own check (an evaluation holds one answer per prompt) — a corrupted entry is recomputed.
A reused stage's files are hard-linked into the run directory, or copied where hard links are
impossible (another file system): a run directory stays self-contained, never symlinks.

Sweep cells that share a prefix (the same data, poison and fine-tune, different defences or
detectors) thus compute it once. `results.json` says which stages a run computed and which it
reused: `"cache": {"computed": [...], "reused": [...]}`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

from poisonlab import dist, models
from poisonlab.pipeline.keys import digest
from poisonlab.utils import file_lock, sha256_file

log = logging.getLogger(__name__)

# In pipeline order. `defense/<name>` and `defense_eval/<name>` carry the defence's name.
STAGES = ("clean_data", "poison", "base_eval", "clean_ft", "clean_ft_eval", "poisoned_ft",
          "poisoned_eval", "detect", "filtered", "defense", "defense_eval")
META = "stage.json"


def payload_sha256(payload) -> str:
    """SHA-256 of a payload as stored (canonical JSON): an edited payload is a corrupted one."""
    blob = json.dumps(payload, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def as_stored(payload):
    """The payload as it reads back from `stage.json` (tuples become lists, ...), so that a
    computed stage and a reused one hand their callers the same objects."""
    return json.loads(json.dumps(payload, default=str))


def fault_point(name: str) -> None:
    """Where a test of resumption kills a run: with `POISONLAB_KILL_AT=<stage>` (e.g.
    `defense/prune`) the process kills itself (SIGKILL: no cleanup, as a crash or a scheduler
    would) as that stage starts. Unset, it does nothing."""
    if os.environ.get("POISONLAB_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _files_under(out: Path, rel: str) -> list[str]:
    """`rel` itself if it is a file, else every file below it (relative to `out`, sorted)."""
    p = out / rel
    if p.is_file():
        return [rel]
    if p.is_dir():
        return sorted(str(f.relative_to(out)) for f in p.rglob("*")
                      if f.is_file() and not f.name.endswith(".tmp"))
    raise FileNotFoundError(f"stage output {rel} was not written")


def place(src: Path, dst: Path, link: bool = True) -> None:
    """Hard-link `src` to `dst` (replacing it), or copy where a link is impossible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    if link:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class StageStore:
    """Computed stages on disk, content-addressed by their keys."""

    def __init__(self, root: Path, link: bool = True):
        self.root = Path(root)
        self.link = link

    def entry(self, name: str, key: str) -> Path:
        return self.root / name.replace("/", "--") / key

    def load(self, name: str, key: str, check: Callable[[object], str | None] | None = None
             ) -> dict | None:
        """The stored stage's record, after checking every file's SHA-256 and the payload's
        own; None when absent or corrupted (a corrupted entry is moved out of the way, to be
        recomputed). `check(payload)` may add a stage's own test (e.g. one answer per prompt):
        it returns what is wrong, or None."""
        d = self.entry(name, key)
        meta = d / META
        if not meta.exists():
            return None
        try:
            info = json.loads(meta.read_text())
            bad = [rel for rel, sha in info["files"].items()
                   if not (d / "files" / rel).is_file() or sha256_file(d / "files" / rel) != sha]
            if info.get("payload_sha256") != payload_sha256(info["payload"]):
                bad.append("payload")
            elif check is not None and (problem := check(info["payload"])):
                bad.append(problem)
        except (OSError, ValueError, KeyError) as e:
            bad = [f"{META} ({e})"]
        if bad:
            log.warning("stage cache: %s/%s is corrupted (%s); computing it again", name, key,
                        ", ".join(bad[:3]))
            with contextlib.suppress(OSError):
                os.replace(d, d.with_name(f"{key}.corrupt-{os.getpid()}-{time.time_ns()}"))
            return None
        return info

    def save(self, name: str, key: str, spec: dict, payload, out: Path,
             outputs: list[str]) -> dict:
        """Store the stage: its payload and copies of its `outputs` (paths in `out`)."""
        final = self.entry(name, key)
        tmp = final.with_name(f"{key}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        files = {}
        try:
            for rel in (f for o in outputs for f in _files_under(out, o)):
                dst = tmp / "files" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(out / rel, dst)
                files[rel] = sha256_file(dst)
            info = {"name": name, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "spec": spec, "payload": payload, "payload_sha256": payload_sha256(payload),
                    "files": files}
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / META).write_text(json.dumps(info, indent=1, default=str) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return info

    def materialize(self, info: dict, out: Path) -> None:
        """Put a stored stage's files into the run directory `out` (hard links or copies)."""
        d = self.entry(info["name"], info["key"])
        for rel in info["files"]:
            place(d / "files" / rel, out / rel, self.link)

    def lock(self, name: str, key: str):
        return file_lock(self.root / ".locks" / f"{name.replace('/', '--')}-{key}.lock")


class Stages:
    """One run's stages: each is reused from the store when its key is there, else computed
    (under the key's lock) and stored. Records the keys and what was computed or reused."""

    def __init__(self, store: StageStore | None, out: Path):
        self.store = store
        self.out = out
        self.keys: dict[str, str] = {}
        self.computed: list[str] = []
        self.reused: list[str] = []
        self.seconds: dict[str, float] = {}

    def record(self) -> dict:
        return {"computed": list(self.computed), "reused": list(self.reused),
                "keys": dict(self.keys),
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}

    def note(self, name: str, seconds: float) -> None:
        """A stage computed outside the store (a cell's own: detection, defence)."""
        self.computed.append(name)
        self.seconds[name] = seconds

    def run(self, name: str, spec: dict, compute: Callable[[], object],
            outputs: list[str] | Callable[[object], list[str]] = (),
            cache: bool = True, check: Callable[[object], str | None] | None = None):
        """The stage's payload: computed by `compute()` (which writes `outputs` into the run
        directory and returns a JSON-able payload) or reused from the store (after its files,
        its payload and `check(payload)` have passed; see `StageStore.load`).

        Under several processes (`accelerate launch`) the main process decides and stores;
        every process computes together (training is collective), or all take the stored
        payload once the main process has put its files in place.
        """
        fault_point(name)
        key = digest(spec)
        self.keys[name] = key
        store = self.store if cache else None
        t = time.perf_counter()
        if store is None:
            log.info("stage %s: computing (not cached)", name)
            payload = as_stored(compute())
            dist.barrier()  # the main process's files are in place for every process
            self.note(name, time.perf_counter() - t)
            log.info("stage %s: computed in %.1f s", name, time.perf_counter() - t)
            return payload
        info = dist.broadcast_object(store.load(name, key, check) if dist.is_main() else None)
        if info is None:
            with store.lock(name, key) if dist.is_main() else contextlib.nullcontext():
                info = dist.broadcast_object(store.load(name, key, check) if dist.is_main()
                                             else None)
                if info is None:
                    t = time.perf_counter()
                    log.info("stage %s: computing %s", name, key)
                    payload = as_stored(compute())
                    if dist.is_main():
                        outs = outputs(payload) if callable(outputs) else list(outputs)
                        store.save(name, key, spec, payload, self.out, outs)
                    dist.barrier()
                    self.note(name, time.perf_counter() - t)
                    log.info("stage %s: computed and stored as %s (%.1f s)", name, key,
                             time.perf_counter() - t)
                    return payload
        if dist.is_main():
            store.materialize(info, self.out)
        dist.barrier()
        self.reused.append(name)
        self.seconds[name] = time.perf_counter() - t
        log.info("stage %s: reused %s from the stage cache", name, key)
        return info["payload"]


def stage_store(cfg) -> StageStore | None:
    """The stage cache of `cache.dir` (default `$POISONLAB_HOME/stages`); None when off."""
    if not cfg.cache.enabled:
        return None
    return StageStore(Path(cfg.cache.dir) if cfg.cache.dir else models.home() / "stages",
                      link=bool(cfg.cache.link))
