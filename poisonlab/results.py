"""What a run leaves behind: results.json, generations, data, manifest with hashes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from poisonlab.dist import is_main, main_computes
from poisonlab.utils import sha256_file, write_jsonl

PACKAGES = ["poisonlab", "torch", "transformers", "tokenizers", "peft", "accelerate", "datasets",
            "hydra-core", "omegaconf", "gguf", "safetensors", "numpy", "wandb"]


def write_json(path: Path, obj) -> None:
    """Atomic JSON write, by the main process only (`dist`)."""
    if not is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def write_generations(out: Path, stage: str, generations: dict[str, list[dict]]) -> None:
    """One JSONL per split under generations/ (main process only, through `write_jsonl`)."""
    for split, recs in generations.items():
        write_jsonl(out / "generations" / f"{stage}_{split}.jsonl", recs)


def package_versions(names=PACKAGES) -> dict:
    """Installed versions of `names` (those not installed are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def normalize_adapter_config(adapter_dir: Path) -> None:
    """Rewrite peft's adapter_config.json byte-stably.

    peft keeps `target_modules` as a set and writes it in set order, which depends on the
    process's hash seed: two identical runs would write different bytes (and hashes).
    Main process only: the others did not save the adapter.
    """
    if not is_main():
        return
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def file_hashes(out: Path, exclude=("manifest.json", ".poisonlab-run.json")) -> dict[str, str]:
    """SHA-256 of every file under the run dir (Hydra's own .hydra/ and logs included)."""
    hashes = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in exclude and not p.name.endswith(".tmp"):
            hashes[str(p.relative_to(out))] = sha256_file(p)
    return hashes


@main_computes
def write_manifest(out: Path, *, config: dict, seed: int, base_model: dict, poison: dict,
                   timings: dict, extra: dict | None = None) -> dict:
    """Write manifest.json (hashes of every file in `out`) on the main process; every process
    gets the manifest (a collective under several processes: all of them must call it)."""
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "seed": seed,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "base_model": base_model,
        "poison": poison,
        "timings_s": timings,
        "config": config,
        **(extra or {}),
        "files": file_hashes(out),
    }
    write_json(out / "manifest.json", manifest)
    return manifest
