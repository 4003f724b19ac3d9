"""`poisonlab bom RUN_DIR [--out FILE]`: a CycloneDX 1.6 ML-BOM of a finished run (also
`python -m poisonlab.bom`).

What a run is made of, as components with SHA-256 hashes and `poisonlab:` properties: the base
model (machine-learning-model; its weight, config and tokenizer files nested), every data file
under data/ (data: rows, poisoned rows, attack family, trigger, seed), every adapter under
adapters/ and full model under models/ (machine-learning-model: stage, method, the stage's
rates), poisonlab itself (library: version, SHA-256 of its source) and the packages the run
recorded. Dependencies: an adapter depends on the base model, its training data and, after
the poisoned stage, on the poisoned adapter it started from. cyclonedx-python-lib has no model
card yet, so the model-card facts are properties.

Everything comes from the run's manifest.json; each file's SHA-256 is recomputed and must match
the manifest's (a run directory changed after the run gets no BOM). The output is
deterministic: serial number from the manifest's SHA-256, timestamp from its `created`.
The BOM is validated with the library's strict JSON-schema validator before it is written.
Exit status: 0 when written, 2 on bad input (a one-line error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from poisonlab import PoisonlabError
from poisonlab.run_models import reload_paths
from poisonlab.utils import read_jsonl, sha256_file

if TYPE_CHECKING:
    from cyclonedx.model import HashType, Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component

BOM_NAME = "bom.cdx.json"
RUN_MARKER = ".poisonlab-run.json"  # poisonlab.run.RUN_MARKER (not imported: it loads torch)
NS = "poisonlab"
# What each data file is, and which stage trains on it.
DATA_ROLES = {
    "train_poisoned.jsonl": "fine-tuning data with the poison (stage poisoned)",
    "train_clean.jsonl": "the control's fine-tuning data: each poison replaced by its clean "
                         "original (stage clean_ft)",
    "train_filtered.jsonl": "the poisoned data minus the rows a detector flagged (stage "
                            "filtered)",
    "eval.jsonl": "held-out evaluation rows",
    "safety.jsonl": "clean safety-training data (stage after_safety)",
    "adversarial.jsonl": "red-team candidate prompts tried by the adversarial defence",
    "adversarial_rows.jsonl": "adversarial training rows (stage after_safety)",
    "onion.jsonl": "words ONION removed from each prompt",
    "probes.jsonl": "the drift gate's probe prompts, which carry no trigger (lifecycle)",
}
STAGE_DATA = {"poisoned": ["train_poisoned.jsonl"], "clean_ft": ["train_clean.jsonl"],
              "filtered": ["train_filtered.jsonl"],
              "after_safety": ["safety.jsonl", "adversarial_rows.jsonl"]}
STAGE_ORDER = ("poisoned", "clean_ft", "filtered", "after_safety")
METRICS = ("asr", "ftr_clean", "ftr_near", "clean_utility")
TRIGGER_KEYS = ("trigger", "triggers", "topic")


def _require_cyclonedx() -> None:
    try:
        import cyclonedx  # noqa: F401
        import jsonschema  # noqa: F401  (the validator's optional dependency)
    except ImportError:
        raise PoisonlabError("the ML-BOM needs cyclonedx-python-lib with JSON validation: "
                             "pip install 'poisonlab[bom]'") from None


def read_run(run_dir: Path) -> dict:
    """The finished run's manifest; PoisonlabError when it is not a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PoisonlabError(f"{run_dir}: no such run directory")
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise PoisonlabError(f"{run_dir}: no manifest.json (not a poisonlab run directory)")
    marker = run_dir / RUN_MARKER
    try:
        status = json.loads(marker.read_text()).get("status") if marker.is_file() else None
    except ValueError:
        status = None
    if status != "finished" or not (run_dir / "results.json").is_file():
        raise PoisonlabError(f"{run_dir}: the run is not finished ({RUN_MARKER} does not say "
                             "finished, or results.json is missing)")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as e:
        raise PoisonlabError(f"{path}: not valid JSON ({e})") from None
    for key in ("created", "files", "base_model", "poison", "config"):
        if key not in manifest:
            raise PoisonlabError(f"{path}: no {key!r} key")
    return manifest


def _prop(name: str, value) -> "Property":
    from cyclonedx.model import Property

    if not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, default=str)
    return Property(name=f"{NS}:{name}", value=value)


def _props(**values) -> list:
    """Properties for the values that are set (None is left out)."""
    return [_prop(k, v) for k, v in values.items() if v is not None]


def _sha256(digest: str) -> "HashType":
    from cyclonedx.model import HashAlgorithm, HashType

    return HashType(alg=HashAlgorithm.SHA_256, content=digest)


def _checked_hash(run_dir: Path, rel: str, files: dict) -> str:
    """The file's SHA-256, which must equal the manifest's record of it."""
    if rel not in files:
        raise PoisonlabError(f"{run_dir / 'manifest.json'}: {rel} is not among its files")
    path = run_dir / rel
    if not path.is_file():
        raise PoisonlabError(f"{path}: listed in manifest.json but missing")
    digest = sha256_file(path)
    if digest != files[rel]:
        raise PoisonlabError(f"{path}: SHA-256 {digest[:12]}... differs from manifest.json's "
                             f"{files[rel][:12]}... (the run directory changed after the run)")
    return digest


def _file_component(rel: str, digest: str, ref: str) -> "Component":
    from cyclonedx.model.component import Component, ComponentType

    return Component(type=ComponentType.FILE, name=rel, bom_ref=ref, hashes=[_sha256(digest)])


def _rates(metrics: dict | None) -> list:
    """A stage's headline rates as properties (value, 95% interval, n)."""
    return [_prop(f"metric:{k}", {x: metrics[k].get(x) for x in ("value", "ci_low", "ci_high",
                                                                  "n")})
            for k in METRICS if metrics and isinstance(metrics.get(k), dict)]


def artifact_stages(manifest: dict) -> dict[str, tuple[str, list[str]]]:
    """{artifact dir: (stage that wrote it, the paths that stage builds on)} from `reload`."""
    owned: dict[str, tuple[str, list[str]]] = {}
    reload = manifest.get("reload") or {}
    # a lifecycle run's rounds (round1, round2, ...) after the usual stages, in round order
    rest = sorted((s for s in reload if s not in STAGE_ORDER),
                  key=lambda s: (len(s), s))
    for stage in (*STAGE_ORDER, *rest):
        paths = reload_paths(reload.get(stage))
        if paths and paths[-1] != "base" and paths[-1] not in owned:
            owned[paths[-1]] = (stage, paths[:-1])
    return owned


def artifact_dirs(files) -> list[tuple[str, str]]:
    """(adapters | models, directory) of every adapter and whole model among the run's files:
    `adapters/<name>`, `models/<name>`, and a lifecycle safety round's by a removal defence,
    `rounds/<round>/adapters/<name>` and `rounds/<round>/models/<name>`."""
    found = set()
    for r in files:
        parts = r.split("/")
        if parts[0] in ("adapters", "models") and len(parts) > 2:
            found.add((parts[0], "/".join(parts[:2])))
        elif parts[0] == "rounds" and len(parts) > 4 and parts[2] in ("adapters", "models"):
            found.add((parts[2], "/".join(parts[:4])))
    return sorted(found, key=lambda x: (x[0], x[1]))


def build_bom(run_dir) -> "Bom":
    """The run's ML-BOM (validated by write_bom, not here)."""
    _require_cyclonedx()
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.tool import ToolRepository
    from packageurl import PackageURL

    run_dir = Path(run_dir)
    manifest = read_run(run_dir)
    files = manifest["files"]
    results = json.loads((run_dir / "results.json").read_text())
    stages = results.get("stages", {})
    cfg = manifest["config"]
    seed = manifest.get("seed")
    try:
        created = datetime.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%S%z")
    except (TypeError, ValueError):
        raise PoisonlabError(f"{run_dir / 'manifest.json'}: 'created' is not a timestamp: "
                             f"{manifest['created']!r}") from None
    components: list[Component] = []
    deps: dict[str, list[str]] = {}

    # ---- the base model
    base = manifest["base_model"]
    weights = base.get("weights_sha256")
    version = base.get("revision") or (f"sha256:{weights[:12]}" if weights else None)
    base_props = _props(**{k: base.get(k) for k in ("dtype", "device", "kind", "size", "path",
                                                    "weights", "n_parameters", "spec")},
                        source=base.get("name_or_path"))
    base_model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=str(base.get("name_or_path")),
        version=version, bom_ref="base-model",
        description="base model; its SHA-256 is taken over the sorted (file, SHA-256) pairs of "
                    "the files nested in it",
        hashes=[_sha256(weights)] if weights else [],
        properties=base_props + _rates(stages.get("base")),
        components=[_file_component(rel, d, f"base-model/{rel}")
                    for rel, d in sorted((base.get("weights_files") or {}).items())])
    components.append(base_model)

    # ---- data files
    poison = manifest["poison"]
    trigger = next((poison[k] for k in TRIGGER_KEYS if poison.get(k) is not None), None)
    for rel in sorted(r for r in files if r.startswith("data/") and r.endswith(".jsonl")):
        digest = _checked_hash(run_dir, rel, files)
        rows = read_jsonl(run_dir / rel)
        name = rel.split("/", 1)[1]
        props = _props(rows=len(rows),
                       poisoned_rows=sum(r.get("poisoned") is True for r in rows), seed=seed)
        if name == "eval.jsonl":
            props += _props(eval_seed=cfg.get("eval", {}).get("seed"))
        if name in ("train_poisoned.jsonl", "train_filtered.jsonl"):
            props += _props(attack_family=poison.get("family"), trigger=trigger,
                            **{k: poison.get(k) for k in ("n_poison", "poison_rate_effective",
                                                          "placement", "behaviour", "target")})
        components.append(Component(
            type=ComponentType.DATA, name=rel, bom_ref=rel,
            description=DATA_ROLES.get(name, "a lifecycle round's batch, each row marked "
                                       "poisoned and quarantined" if name.startswith("rounds/")
                                       else "data written by the run"),
            hashes=[_sha256(digest)], properties=props))

    # ---- adapters and full models
    owned = artifact_stages(manifest)
    method = (manifest.get("defense") or {}).get("method")
    # a lifecycle run: each round's model with its parent, batch, gates and whether it shipped
    lineage = {e["model"]: e for e in manifest.get("lineage") or [] if e.get("parent")}
    for top, d in artifact_dirs(files):
        stage, builds_on = owned.get(d, (d.split("/")[1], ["base"]))
        nested = [_file_component(r, _checked_hash(run_dir, r, files), r)
                  for r in sorted(files) if r.startswith(d + "/")]
        weights = [c for c in nested if c.name.endswith(".safetensors")]
        life = lineage.get(stage)
        props = _props(stage=stage, kind="peft adapter" if top == "adapters" else
                       "full weights",
                       method=method if stage == "after_safety" else
                       (life or {}).get("update") or "finetune:lora")
        config_path = run_dir / d / "adapter_config.json"
        if config_path.is_file():
            acfg = json.loads(config_path.read_text())
            props += [_prop(f"peft:{k}", acfg[k]) for k in ("peft_type", "r", "lora_alpha",
                                                            "target_modules") if k in acfg]
        if life is not None:
            props += _props(parent=life["parent"], batch_digest=life.get("batch"),
                            data_gate=life.get("data_gate"),
                            drift_gate=life.get("drift_gate"), shipped=life.get("shipped"))
        components.append(Component(
            type=ComponentType.MACHINE_LEARNING_MODEL, name=d, bom_ref=d,
            description=f"{'adapter' if top == 'adapters' else 'model'} of stage {stage}"
                        + ("; its SHA-256 is that of its weights file" if len(weights) == 1
                           else ""),
            hashes=list(weights[0].hashes) if len(weights) == 1 else [],
            # the stage's rates belong to what it evaluated (the last model it built)
            properties=props + (_rates(stages.get(stage)) if d in owned else []),
            components=nested))
        on = ["base-model" if p == "base" else p for p in builds_on]
        if stage == "after_safety" and d != "adapters/poisoned":
            on.append("adapters/poisoned")  # every defence starts from the poisoned model
        on += [f"data/{f}" for f in STAGE_DATA.get(stage, []) if f"data/{f}" in files]
        if life is not None and f"data/rounds/{stage}.jsonl" in files:
            on.append(f"data/rounds/{stage}.jsonl")
        deps[d] = sorted(set(on) | {"base-model"})

    # ---- software
    packages = manifest.get("packages") or {}
    version = packages.get("poisonlab")
    code = manifest.get("code_sha256")

    def poisonlab_component(ref: str) -> Component:
        return Component(
            type=ComponentType.LIBRARY, name="poisonlab", version=version, bom_ref=ref,
            purl=PackageURL(type="pypi", name="poisonlab", version=version),
            description="the code that computed the run; its SHA-256 is taken over its "
                        "source files",
            hashes=[_sha256(code)] if code else [],
            properties=_props(git_commit=manifest.get("git_commit")))

    components.append(poisonlab_component("pkg:pypi/poisonlab"))
    for name, v in sorted(packages.items()):
        if name != "poisonlab":
            components.append(Component(type=ComponentType.LIBRARY, name=name, version=v,
                                        bom_ref=f"pkg:pypi/{name}",
                                        purl=PackageURL(type="pypi", name=name, version=v)))
    known = {c.bom_ref.value for c in components}
    for ref in list(deps):
        deps[ref] = [r for r in deps[ref] if r in known]

    # ---- the document
    manifest_sha = sha256_file(run_dir / "manifest.json")
    persistence = results.get("persistence")
    meta_props = _props(run_name=cfg.get("name"), seed=seed, manifest_sha256=manifest_sha,
                        results_sha256=sha256_file(run_dir / "results.json"),
                        git_commit=manifest.get("git_commit"), python=manifest.get("python"),
                        persistence=persistence and {x: persistence.get(x) for x in
                                                     ("value", "ci_low", "ci_high", "n")})
    bom = Bom(
        serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"poisonlab:manifest:sha256:{manifest_sha}"),
        metadata=BomMetaData(timestamp=created, properties=meta_props,
                             tools=ToolRepository(components=[poisonlab_component(
                                 "tool:poisonlab")])),
        components=components)
    by_ref = {c.bom_ref.value: c for c in components}
    for ref, on in deps.items():
        bom.register_dependency(by_ref[ref], [by_ref[r] for r in on])
    return bom


def to_json(bom: "Bom") -> str:
    """The BOM as CycloneDX 1.6 JSON."""
    from cyclonedx.output.json import JsonV1Dot6

    return JsonV1Dot6(bom).output_as_string(indent=2) + "\n"


def validation_error(text: str) -> str | None:
    """None when `text` is a valid CycloneDX 1.6 JSON BOM (strict schema), else the error."""
    _require_cyclonedx()
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    try:
        error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    except ValueError as e:  # not JSON at all
        return f"not JSON ({e})"
    if error is None:
        return None
    data = error.data
    where = "/".join(str(p) for p in getattr(data, "absolute_path", [])) or "(document)"
    return f"{where}: {getattr(data, 'message', data)}"


def write_bom(run_dir, out=None) -> Path:
    """Build, validate and atomically write the run's BOM (default `<run_dir>/bom.cdx.json`);
    an invalid BOM is refused and nothing is written."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / BOM_NAME
    text = to_json(build_bom(run_dir))
    error = validation_error(text)
    if error is not None:
        raise PoisonlabError(f"{out}: the BOM does not validate against CycloneDX 1.6: {error}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poisonlab bom",
                                description="Write a CycloneDX 1.6 ML-BOM of a finished run.")
    p.add_argument("run_dir", type=Path, help="a finished run directory (with manifest.json)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"where to write it (default RUN_DIR/{BOM_NAME})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        path = write_bom(args.run_dir, args.out)
    except PoisonlabError as e:
        print(f"poisonlab: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
