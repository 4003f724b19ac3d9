"""The run directory: where a run writes, and when a directory already holds it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from poisonlab import PoisonlabError, __version__
from poisonlab.pipeline.keys import code_digest, file_digest, local_inputs
from poisonlab.results import write_json

log = logging.getLogger(__name__)
RUN_MARKER = ".poisonlab-run.json"


def output_dir(cfg: DictConfig, out_dir) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise PoisonlabError("output_dir: not running under Hydra; pass output_dir=<dir>")


def code_identity() -> str:
    """SHA-256 over all of poisonlab's own source files: the code that computes a run."""
    return code_digest("**/*.py")


def run_identity(cfg: DictConfig) -> str:
    """What makes two runs the same: the resolved config, the content of the local files it
    reads (data files, a local model directory) and the code that runs it."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("output_dir", None)
    inputs = {"data": local_inputs(cfg.data)}
    for key in ("attack.poisoned_path", "eval.clean_path", "eval.triggered_path"):
        path = OmegaConf.select(cfg, key)
        if isinstance(path, str) and os.path.isfile(path):
            inputs[key] = file_digest(path)
    model_dir = os.path.expanduser(str(cfg.model.name_or_path))
    if os.path.isdir(model_dir):
        inputs["model"] = file_digest(model_dir)
    blob = json.dumps({"config": config, "poisonlab": __version__, "code": code_identity(),
                       "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def hydra_files(out: Path) -> set[str]:
    """Entries Hydra itself wrote into `out` for this job (kept when a stale run is cleaned)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    if Path(HydraConfig.get().runtime.output_dir).resolve() != out.resolve():
        return set()
    return {".hydra"} | {p.name for p in out.glob("*.log")}


def clear(out: Path, keep: set[str]) -> None:
    """Remove everything in `out` but the entries named in `keep`."""
    for p in out.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def prepare_output_dir(out: Path, identity: str) -> dict | None:
    """Make `out` ready for this run; return the finished results when it already holds them.

    A run never mixes its files with another's: a directory that holds anything but Hydra's
    own files and is not a poisonlab run is refused; an unfinished run, or a finished run of
    another config or another version of the code, is removed; a finished run of this very
    config and code is left alone and its results are returned.
    """
    marker = out / RUN_MARKER
    own = hydra_files(out)
    if out.exists():
        entries = [p for p in out.iterdir() if p.name not in own]
        if entries and not marker.exists():
            names = ", ".join(sorted(p.name for p in entries)[:4])
            raise PoisonlabError(f"output directory {out} is not empty and holds no poisonlab "
                                 f"run ({names}); choose another output_dir")
        if marker.exists():
            info = json.loads(marker.read_text())
            if (info.get("status") == "finished" and info.get("identity") == identity
                    and (out / "results.json").exists()):
                log.info("%s: a finished run of the same config; left as it is", out)
                return json.loads((out / "results.json").read_text())
            log.info("%s: removing the files of an earlier run", out)
            clear(out, own)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"status": "running", "identity": identity})
    return None
