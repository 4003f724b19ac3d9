"""Weights & Biases tracking of a finished run (`wandb.enabled=true`; never required).

`log_run` writes one wandb run into the run directory (`<out>/wandb/`, not the working
directory), offline by default (`wandb sync <out>/wandb/offline-run-*` uploads it later):

* summary: every rate of every stage as `<stage>/<metric>` with `_ci_low`, `_ci_high`, `_n`
  (per-kind and per-skill rates as `<stage>/<metric>/<kind>`), persistence, removal (DER,
  fidelity), utility drops, detection (AUROC, AP, ... per detector), filtering and training
  figures;
* `curves/<stage>`: the persistence curve (ASR, FTR clean, utility against clean rows seen);
* `generations`: a table of the first `wandb.n_generations` answers of each stage and split;
* each adapter (and full model) directory as a `model` artifact by reference (nothing is
  uploaded; the artifact records the files' paths and checksums).

`reinit="finish_previous"`, so that a sweep's cells, run one after another in one process,
each get their own run even when an earlier one was left open.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from poisonlab import PoisonlabError
from poisonlab.utils import read_jsonl

N_GENERATIONS = 8  # answers per stage and split in the generations table
CURVE_METRICS = ("asr", "ftr_clean", "clean_utility")
SUMMARY_KEYS = ("persistence", "removal", "utility_drop", "utility_change", "detection", "filtered", "train")


def _is_rate(v) -> bool:
    return isinstance(v, dict) and "value" in v


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None


def flatten(obj, prefix: str) -> dict[str, float]:
    """Numeric leaves of a results record as flat wandb keys; a rate {"value", "ci_low",
    "ci_high", "n"} becomes `prefix` (its value) and `prefix_ci_low`, ... Lists are skipped."""
    out: dict[str, float] = {}
    if _is_rate(obj):
        for k in ("value", "ci_low", "ci_high", "n"):
            if _number(obj.get(k)):
                out[prefix if k == "value" else f"{prefix}_{k}"] = obj[k]
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}/{k}"))
    elif _number(obj):
        out[prefix] = obj
    elif isinstance(obj, bool):
        out[prefix] = int(obj)
    return out


def summary(results: dict) -> dict[str, float]:
    """The run's figures as flat summary keys (see the module docstring)."""
    out: dict[str, float] = {}
    for stage, metrics in results.get("stages", {}).items():
        out.update(flatten(metrics, stage))
    for key in SUMMARY_KEYS:
        if key in results:
            out.update(flatten(results[key], key))
    return out


def generation_rows(results: dict, out: Path, n: int) -> list[list]:
    """[stage, split, id, prompt, response, target, correct] for the first `n` answers of each
    stage and split (`generations/<stage>_<split>.jsonl`)."""
    splits = results.get("evaluation", {}).get("split_sizes", {})
    rows = []
    for stage in results.get("stages", {}):
        for split in splits:
            path = out / "generations" / f"{stage}_{split}.jsonl"
            if not path.is_file():
                continue
            for g in read_jsonl(path)[:n]:
                rows.append([stage, split, g.get("id"), g.get("prompt"), g.get("response"),
                             g.get("target"), g.get("correct")])
    return rows


def _artifact_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def log_run(cfg: DictConfig, results: dict, out: Path) -> None:
    """Log the finished run in `out` to wandb (mode `cfg.wandb.mode`, files under `out`);
    only the main process logs when several run the pipeline (`dist`)."""
    from poisonlab import dist

    if not dist.is_main():
        return
    try:
        import wandb
    except ImportError:
        raise PoisonlabError("wandb.enabled=true needs the wandb package: pip install wandb "
                             "(or set wandb.enabled=false)") from None
    from poisonlab.bom import artifact_stages

    out = Path(out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    files = manifest.get("files", {})
    owned = artifact_stages(manifest)
    n = cfg.wandb.get("n_generations", N_GENERATIONS)
    with wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(out),
                    name=cfg.name, config=OmegaConf.to_container(cfg, resolve=True),
                    reinit="finish_previous") as run:
        run.summary.update(summary(results))
        for stage, points in (results.get("curves") or {}).items():
            keys = [m for m in CURVE_METRICS if points and m in points[0]]
            ys = [[p[m]["value"] if p.get(m) else math.nan for p in points] for m in keys]
            run.log({f"curves/{stage}": wandb.plot.line_series(
                xs=[p["rows_seen"] for p in points], ys=ys, keys=keys,
                title=f"{cfg.name}: {stage}", xname="clean rows seen")})
        rows = generation_rows(results, out, n)
        if rows:
            run.log({"generations": wandb.Table(
                columns=["stage", "split", "id", "prompt", "response", "target", "correct"],
                data=rows)})
        for top in ("adapters", "models"):
            for d in sorted(p for p in (out / top).glob("*") if p.is_dir()):
                rel = f"{top}/{d.name}"
                stage = owned.get(rel, (d.name,))[0]
                art = wandb.Artifact(
                    _artifact_name(f"{cfg.name}-{d.name}"), type="model",
                    description=f"{rel} of run {cfg.name} (stage {stage}), by reference",
                    metadata={"stage": stage, "path": rel,
                              "base_model": cfg.model.name_or_path,
                              "sha256": {k: v for k, v in files.items()
                                         if k.startswith(rel + "/")}})
                art.add_reference(d.resolve().as_uri(), name=d.name)
                run.log_artifact(art, aliases=[stage])
