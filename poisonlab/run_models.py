"""Models of finished runs, loaded in a fresh process as the run loaded them.

A run's manifest holds its model settings (`config.model`: chat template, device, dtype) and,
per model stage, how to rebuild the model (`reload.<stage>`: "base", then adapters merged in
order, the last one applied): `poisonlab verify` and `poisonlab drift` load models through
here, so that a prompt is rendered by the template the model was trained on and the weights
are held in the dtype it was evaluated in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from poisonlab import PoisonlabError


@dataclass
class Settings:
    """Where a model's base weights are and how to load them."""

    base_path: str
    model_cfg: dict = field(default_factory=dict)   # the run's config.model ({} for a dir)
    recorded_dtype: str | None = None               # the dtype the run evaluated in


def read_manifest(run: Path) -> dict:
    manifest = run / "manifest.json"
    if not manifest.is_file():
        raise PoisonlabError(f"{run}: not a poisonlab run directory (no manifest.json)")
    return json.loads(manifest.read_text())


def run_settings(run: Path, info: dict | None = None) -> Settings:
    from poisonlab import models

    info = read_manifest(run) if info is None else info
    model_cfg = (info.get("config") or {}).get("model")
    if not isinstance(model_cfg, dict):
        raise PoisonlabError(f"{run / 'manifest.json'}: no config.model (the run's model "
                             "settings), so its chat template and dtype are unknown")
    base_path = models.resolve(info["base_model"]["name_or_path"],
                               model_cfg.get("pretrain_poison"))
    return Settings(base_path, model_cfg, info["base_model"].get("dtype"))


def load_base(settings: Settings, warnings: list[str], weights: str | None = None):
    """(model, tokenizer, record) of the base weights (or of `weights`, a directory of whole
    weights with the base's tokenizer), on the run's device in its dtype."""
    import torch

    from poisonlab import models

    cfg = settings.model_cfg
    device = models.pick_device(cfg.get("device") or "auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PoisonlabError(f"the run's model.device={cfg.get('device')!r} needs a GPU, and "
                             "none is available")
    precision = models.pick_precision(cfg.get("dtype") or "auto", device)
    template = cfg.get("chat_template")
    tokenizer = models.load_tokenizer(settings.base_path, template)
    model = models.load_model(weights or settings.base_path, device, precision.weights)
    # `auto` resolves per machine: a run on a bf16 GPU reloaded on a CPU computes in float32
    recorded = settings.recorded_dtype
    if recorded is not None and recorded != str(precision.weights):
        warnings.append(f"the run's model was evaluated in {recorded}; here it is loaded in "
                        f"{precision.weights} (model.dtype={cfg.get('dtype')!r} on "
                        f"{device.type}), and its answers may differ")
    record = {"base": settings.base_path, "device": device.type,
              "dtype": str(precision.weights),
              "chat_template_source": ("run config model.chat_template" if template is not None
                                       and tokenizer.chat_template == template else "tokenizer"),
              "chat_template": tokenizer.chat_template}
    return model, tokenizer, record


def reload_paths(entry) -> list[str]:
    """Paths in a manifest `reload` entry: ["base", "merge adapters/poisoned", ...] or
    {"model": [...], ...} -> ["base", "adapters/poisoned", ...]."""
    if isinstance(entry, dict):
        entry = entry.get("model")
    paths = []
    for item in entry or []:
        item = str(item).split(" (")[0]
        paths.append(item.split(" ", 1)[1] if item.startswith("merge ") else item)
    return paths


def stage_chain(run: Path, info: dict, stage: str) -> tuple[str | None, list[str]]:
    """(whole weights directory or None for the base, adapter directories in order) of a
    stage, from the manifest's `reload.<stage>` (whole weights come first when there are)."""
    reload = info.get("reload") or {}
    paths = reload_paths(reload.get(stage))
    if not paths:
        raise PoisonlabError(f"{run}: no model stage {stage!r} in the manifest's reload "
                             f"(have: {', '.join(sorted(reload)) or 'none'})")
    weights = None if paths[0] == "base" else paths[0]
    adapters = paths[1:]
    for rel in ([weights] if weights else []) + adapters:
        if not (run / rel).is_dir():
            raise PoisonlabError(f"{run}: stage {stage!r} needs {rel}, which is missing")
    return weights, adapters


def load_stage(run: Path, stage: str, warnings: list[str]):
    """(model, tokenizer, record) of a run's model stage: its base (or whole weights), its
    adapters merged in order."""
    from peft import PeftModel

    info = read_manifest(run)
    settings = run_settings(run, info)
    weights, adapters = stage_chain(run, info, stage)
    model, tokenizer, record = load_base(settings, warnings,
                                         None if weights is None else str(run / weights))
    for rel in adapters:
        model = PeftModel.from_pretrained(model, str(run / rel)).merge_and_unload()
    model.eval()
    record.update(run=str(run), stage=stage, weights=weights, adapters=adapters)
    return model, tokenizer, record


def load_dir(path: str, adapter: str | None, warnings: list[str]):
    """(model, tokenizer, record) of a local Hugging Face model directory, with an optional
    LoRA adapter directory merged in."""
    from peft import PeftModel

    if not (Path(path) / "config.json").is_file():
        raise PoisonlabError(f"{path}: not a model directory (no config.json)")
    model, tokenizer, record = load_base(Settings(str(path)), warnings)
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise PoisonlabError(f"{adapter}: not a LoRA adapter (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    record.update(adapter=adapter)
    return model, tokenizer, record
