"""Every command the README and the docs' quick start show runs as written.

The fenced `bash` blocks of README.md and docs/index.md are split as the shell splits them.
Runs (`poisonlab run ...`, `poisonlab key=value ...`, `python -m poisonlab.run ...`) are
composed by Hydra from exactly those words — every cell of a `-m` sweep — and checked by the
pipeline's own validation, so a quoting slip, a stale key or a refused value fails here; help
pages run for real. The other subcommands' arguments go through their own parsers. The slow
suite runs the quick start itself, command by command, through the shell.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", ROOT / "docs" / "index.md"]
NOT_OURS = ("bash", ".", "source", "pip", "accelerate", "git", "cd", "export", "mkdocs")


def fenced_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(line, words) of every command in the file's ```bash blocks (comments dropped)."""
    out, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = line.strip() in ("```bash", "```sh") and not inside
            continue
        if inside and line.strip() and not line.lstrip().startswith("#"):
            words = shlex.split(line, comments=True)
            if words:
                out.append((line.strip(), words))
    return out


def poisonlab_words(words: list[str]) -> list[str] | None:
    """The `poisonlab` command line these words run (without the program), or None."""
    if words[0] == "poisonlab":
        return words[1:]
    if words[:3] == ["python", "-m", "poisonlab.run"]:
        return ["run"] + words[3:]
    m = re.fullmatch(r"poisonlab\.(scan|verify|report|bom|pretrain_poison)", words[2]) if (
        words[:2] == ["python", "-m"] and len(words) > 2) else None
    return [m.group(1)] + words[3:] if m else None


COMMANDS = [(path.relative_to(ROOT).as_posix(), line, words)
            for path in FILES for line, words in fenced_commands(path)]
OURS = [(f, line, poisonlab_words(w)) for f, line, w in COMMANDS if poisonlab_words(w)]


def test_the_readme_and_the_quick_start_show_commands():
    assert len(OURS) >= 10, OURS
    assert {f for f, _, _ in OURS} == {"README.md", "docs/index.md"}
    for f, line, words in COMMANDS:
        if words[0] in ("bash", "python") and words[1].startswith("scripts/"):
            assert (ROOT / words[1]).is_file(), f"{f}: no such script: {line}"
            continue
        assert words[0] in NOT_OURS or poisonlab_words(words), f"{f}: unrecognised: {line}"


def _sweep_cells(overrides: list[str]) -> list[list[str]]:
    """Every cell of a Hydra sweep (`a=1,2 b=x,y`), parsed by Hydra's own override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(c) for c in itertools.product(*axes)]


def _check_run(args: list[str]) -> None:
    from poisonlab.config import compose_config
    from poisonlab.pipeline.validate import build_attack, validate

    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    assert not [a for a in overrides if a.startswith("-")], args
    # hydra.* settings belong to the launcher: parsed above with the rest, not composed
    cells = _sweep_cells(overrides)
    if not multirun:
        assert len(cells) == 1, f"a sweep without -m: {args}"
    for cell in cells:
        cfg = compose_config(*[o for o in cell if not o.startswith("hydra.")])
        validate(cfg, build_attack(cfg.attack))


def _check_pretrain_poison(args: list[str]) -> None:
    """`python -m poisonlab.pretrain_poison <overrides>`: every cell composes to a valid
    poison block; `... table <dir>` takes one directory."""
    from poisonlab import pretrain_poison
    from poisonlab.config import compose_config

    if args[:1] == ["table"]:
        assert len(args) == 2, args
        return
    for cell in _sweep_cells(args):
        cfg = compose_config(*[o for o in cell if not o.startswith("hydra.")])
        pretrain_poison.spec(cfg.model.pretrain_poison)


def _alpaca_stand_in(path: Path, n: int = 150) -> None:
    """A file shaped like alpaca_data.json: one JSON list of instruction/input/output objects."""
    rows = [{"instruction": f"Give a synonym of word number {i}.",
             "input": "" if i % 3 else f"Context {i}.", "output": f"Synonym {i}."}
            for i in range(n)]
    path.write_text(json.dumps(rows, indent=4), encoding="utf-8")


@pytest.mark.parametrize("where,line,args", OURS, ids=[f"{f}:{l[:60]}" for f, l, _ in OURS])
def test_every_poisonlab_command_parses_composes_and_validates(where, line, args, tmp_path,
                                                               monkeypatch):
    from poisonlab import cli

    # the user's own files the command names, as stand-ins in a fresh working directory
    monkeypatch.chdir(tmp_path)
    for a in args:
        if a.startswith("data.path="):
            _alpaca_stand_in(tmp_path / a.split("=", 1)[1])

    head = args[0] if args else "run"
    if head in ("help", "--help", "-h") or (head == "run" and {"--help", "-h"} & set(args)):
        proc = subprocess.run([sys.executable, "-m", "poisonlab.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip(), (line, proc.stderr[-2000:])
    elif head == "pretrain_poison":
        _check_pretrain_poison(args[1:])
    elif head in cli.SUBCOMMANDS and head != "run":
        module = __import__(cli.SUBCOMMANDS[head], fromlist=["parser"])
        module.parser().parse_args(args[1:])  # SystemExit(2) on a stale flag
    else:
        _check_run(args[1:] if head == "run" else args)


def test_the_quick_start_block_is_the_measured_one():
    """README.md and docs/index.md show the block `scripts/readme_times.py` renders from its
    record, and the record measured exactly the script's commands."""
    proc = subprocess.run([sys.executable, "scripts/readme_times.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import readme_times
    finally:
        sys.path.pop(0)
    record = json.loads(readme_times.RECORD.read_text())
    assert [c["command"] for c in record["commands"]] == [c for c, _, _ in readme_times.COMMANDS]
    assert all(c["cold_s"] > 0 and c["warm_s"] > 0 for c in record["commands"])
    assert record["machine"]["cores"] and record["commit"]


def test_the_docs_build_as_a_static_site(tmp_path):
    pytest.importorskip("mkdocs")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "figures" / "index.html").exists()


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path):
    """The measured commands, through the shell, in a fresh directory: each ends with the exit
    status the script expects, and the outputs the README promises exist."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import readme_times
    finally:
        sys.path.pop(0)
    import os

    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                  os.environ["PATH"]])}
    for command, _, expected in readme_times.COMMANDS:
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=1800)
        assert proc.returncode == expected, (command, proc.stderr[-3000:])
    run = tmp_path / "outputs" / "quickstart"
    assert (run / "figures" / "stages.png").exists() and (run / "curves").is_dir()
    report = tmp_path / "multirun" / "dose_response" / "report"
    assert list(report.glob("asr_vs_poison*.png"))
