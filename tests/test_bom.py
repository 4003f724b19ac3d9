"""`poisonlab bom`: the CycloneDX 1.6 ML-BOM of a real micro run, checked against the files."""

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from poisonlab import PoisonlabError, bom
from poisonlab.utils import read_jsonl, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SchemaVersion = pytest.importorskip("cyclonedx.schema").SchemaVersion
JsonStrictValidator = pytest.importorskip("cyclonedx.validation.json").JsonStrictValidator


def strict_error(text: str):
    return JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)


def props(component: dict) -> dict:
    return {p["name"]: p["value"] for p in component.get("properties", [])}


def sha(component: dict) -> str:
    (h,) = [h["content"] for h in component["hashes"] if h["alg"] == "SHA-256"]
    return h


@pytest.fixture
def run_copy(debug_run, tmp_path):
    """The shared debug run, copied (tests here write into it or change it)."""
    out, _, _ = debug_run
    dst = tmp_path / "run"
    shutil.copytree(out, dst)
    return dst


@pytest.fixture(scope="module")
def doc(debug_run, tmp_path_factory):
    out, _, _ = debug_run
    path = bom.write_bom(out, tmp_path_factory.mktemp("bom") / "bom.json")
    return path.read_text()


def test_bom_validates_and_its_hashes_are_the_files(debug_run, doc):
    out, _, cfg = debug_run
    assert strict_error(doc) is None
    d = json.loads(doc)
    assert d["bomFormat"] == "CycloneDX" and d["specVersion"] == "1.6"
    manifest = json.loads((out / "manifest.json").read_text())
    comps = {c["bom-ref"]: c for c in d["components"]}
    data = sorted(r for r in comps if r.startswith("data/"))
    assert data == sorted(r for r in manifest["files"] if r.startswith("data/"))
    for ref in data:
        assert comps[ref]["type"] == "data"
        assert sha(comps[ref]) == sha256_file(out / ref), ref
        rows = read_jsonl(out / ref)
        assert int(props(comps[ref])["poisonlab:rows"]) == len(rows)
    for name in ("poisoned", "safety", "clean_ft"):
        adapter = comps[f"adapters/{name}"]
        assert adapter["type"] == "machine-learning-model"
        files = {c["name"]: sha(c) for c in adapter["components"]}
        assert files and files == {str(p.relative_to(out)): sha256_file(p)
                                   for p in (out / "adapters" / name).iterdir()}
        assert sha(adapter) == sha256_file(out / "adapters" / name / "adapter_model.safetensors")
    assert props(comps["adapters/safety"])["poisonlab:stage"] == "after_safety"
    assert props(comps["adapters/safety"])["poisonlab:method"] == manifest["defense"]["method"]
    base = comps["base-model"]
    assert base["type"] == "machine-learning-model" and base["name"] == cfg.model.name_or_path
    assert sha(base) == manifest["base_model"]["weights_sha256"]
    base_dir = Path(manifest["base_model"]["path"])
    for f in base["components"]:
        assert sha(f) == sha256_file(base_dir / f["name"]), f["name"]
    lib = comps["pkg:pypi/poisonlab"]
    assert lib["type"] == "library" and sha(lib) == manifest["code_sha256"]
    assert lib["version"] == manifest["packages"]["poisonlab"]


def test_poisoned_rows_and_attack_are_the_manifests(debug_run, doc):
    out, _, cfg = debug_run
    manifest = json.loads((out / "manifest.json").read_text())
    comps = {c["bom-ref"]: c for c in json.loads(doc)["components"]}
    p = props(comps["data/train_poisoned.jsonl"])
    marked = sum(r["poisoned"] for r in read_jsonl(out / "data" / "train_poisoned.jsonl"))
    assert int(p["poisonlab:poisoned_rows"]) == manifest["poison"]["n_poison"] == marked > 0
    assert int(p["poisonlab:n_poison"]) == marked
    assert p["poisonlab:attack_family"] == manifest["poison"]["family"]
    assert p["poisonlab:trigger"] == cfg.attack.trigger
    assert int(p["poisonlab:seed"]) == cfg.seed
    assert int(props(comps["data/train_clean.jsonl"])["poisonlab:poisoned_rows"]) == 0


def test_adapters_depend_on_base_model_and_their_data(doc):
    deps = {d["ref"]: set(d.get("dependsOn", [])) for d in json.loads(doc)["dependencies"]}
    assert deps["adapters/poisoned"] == {"base-model", "data/train_poisoned.jsonl"}
    assert deps["adapters/clean_ft"] == {"base-model", "data/train_clean.jsonl"}
    assert deps["adapters/safety"] == {"base-model", "adapters/poisoned", "data/safety.jsonl"}


def test_bom_is_deterministic_and_not_in_the_manifest(run_copy):
    manifest_before = (run_copy / "manifest.json").read_bytes()
    path = bom.write_bom(run_copy)
    assert path == run_copy / "bom.cdx.json"
    first = path.read_text()
    assert bom.write_bom(run_copy).read_text() == first
    assert [p.name for p in run_copy.glob("*.tmp")] == []
    assert (run_copy / "manifest.json").read_bytes() == manifest_before
    d = json.loads(first)
    manifest = json.loads(manifest_before)
    assert "bom.cdx.json" not in manifest["files"]
    want = uuid.uuid5(uuid.NAMESPACE_URL,
                      f"poisonlab:manifest:sha256:{sha256_file(run_copy / 'manifest.json')}")
    assert d["serialNumber"] == want.urn
    assert d["metadata"]["timestamp"][:19] == manifest["created"][:19]


def test_tampered_bom_is_caught_and_never_written(debug_run, doc, tmp_path, monkeypatch):
    out, _, _ = debug_run
    for tamper in (lambda d: d["components"][0]["hashes"][0].update(alg="SHA-257"),
                   lambda d: d["components"][0].update(modelCardNotes="x"),
                   lambda d: d.update(serialNumber="not-a-urn"),
                   lambda d: d["components"][0].pop("type")):
        d = json.loads(doc)
        tamper(d)
        text = json.dumps(d)
        assert strict_error(text) is not None
        assert bom.validation_error(text) is not None
    bad = json.loads(doc)
    bad["components"][0]["type"] = "spreadsheet"
    monkeypatch.setattr(bom, "to_json", lambda b: json.dumps(bad))
    target = tmp_path / "bom.json"
    with pytest.raises(PoisonlabError, match="does not validate against CycloneDX 1.6"):
        bom.write_bom(out, target)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_changed_run_file_is_refused(run_copy):
    with open(run_copy / "data" / "eval.jsonl", "a") as fh:
        fh.write("{}\n")
    with pytest.raises(PoisonlabError, match="differs from manifest.json"):
        bom.build_bom(run_copy)


def test_cli_exit_codes(run_copy, tmp_path, capsys):
    assert bom.main([str(run_copy), "--out", str(tmp_path / "x.cdx.json")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.cdx.json")
    assert strict_error((tmp_path / "x.cdx.json").read_text()) is None

    def fails(argv, match):
        assert bom.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("poisonlab: error: ") and err.count("\n") == 1 and match in err

    fails([str(tmp_path / "missing")], "no such run directory")
    (tmp_path / "empty").mkdir()
    fails([str(tmp_path / "empty")], "no manifest.json")
    marker = run_copy / bom.RUN_MARKER
    marker.write_text(json.dumps({"status": "running", "identity": "x"}))
    fails([str(run_copy)], "not finished")
    marker.unlink()
    fails([str(run_copy)], "not finished")


def test_console_script_dispatch(run_copy, tmp_path, monkeypatch, capsys):
    from poisonlab import cli

    monkeypatch.setattr(sys, "argv", ["poisonlab", "bom", str(run_copy)])
    assert cli.main() == 0 and (run_copy / "bom.cdx.json").is_file()  # the exit status
    proc = subprocess.run([sys.executable, "-m", "poisonlab.bom", str(tmp_path / "missing")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("poisonlab: error: ") and "Traceback" not in proc.stderr


def test_run_marker_is_the_runs():
    from poisonlab import run

    assert bom.RUN_MARKER == run.RUN_MARKER
