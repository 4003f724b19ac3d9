"""The `poisonlab` command line: one help page naming every command, `run` as the explicit
form of a run, and a one-line refusal for a mistyped command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from poisonlab import cli


def call(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["poisonlab", *args])
    return cli.main()


@pytest.mark.parametrize("args", [("--help",), ("-h",), ("help",)])
def test_help_lists_every_command_on_a_short_page(monkeypatch, capsys, args):
    assert call(monkeypatch, *args) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 25
    for command in ("run", "scan", "verify", "report", "bom", "drift"):
        assert any(line.startswith(f"  {command} ") for line in out.splitlines()), command
    assert "poisonlab scan --help" in out and "poisonlab run --help" in out
    assert "poisonlab run --cfg job" in out and "python -m poisonlab.run" in out


def test_help_command_is_the_commands_own_help(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        call(monkeypatch, "help", "scan")
    assert e.value.code == 0
    via_help = capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        call(monkeypatch, "scan", "--help")
    assert e.value.code == 0
    assert capsys.readouterr().out == via_help
    assert via_help.startswith("usage: poisonlab scan")


@pytest.mark.parametrize("word,close", [("scna", "scan"), ("reprot", "report"), ("rnu", "run")])
def test_a_mistyped_command_is_refused_with_the_closest_one(monkeypatch, capsys, word, close):
    assert call(monkeypatch, word) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"poisonlab: error: unknown command {word!r}: did you mean {close!r}?")


def test_an_unknown_word_without_a_close_command_is_refused(monkeypatch, capsys):
    assert call(monkeypatch, "zzzz") == 2
    err = capsys.readouterr().err
    assert "unknown command 'zzzz'" in err and "did you mean" not in err


@pytest.mark.parametrize("args", [
    ("run", "seed=1", "attack=badnets"),     # `run` is stripped ...
    ("seed=1", "attack=badnets"),            # ... and the bare form is the same run
    ("+x=1",), ("~wandb",), ("-m", "seed=1,2"), ("--multirun", "seed=1"), ("--cfg", "job"),
    ("hydra.run.dir=out",), ("run",), (),
])
def test_run_arguments_reach_hydra_untouched(monkeypatch, args):
    seen = {}
    import poisonlab.run

    monkeypatch.setattr(poisonlab.run, "main", lambda: seen.setdefault("argv", list(sys.argv)))
    call(monkeypatch, *args)
    expected = list(args[1:] if args[:1] == ("run",) else args)
    assert seen["argv"] == ["poisonlab", *expected]


def test_run_help_is_hydras(monkeypatch):
    import poisonlab.run

    seen = {}
    monkeypatch.setattr(poisonlab.run, "main", lambda: seen.setdefault("argv", list(sys.argv)))
    call(monkeypatch, "run", "--help")
    assert seen["argv"] == ["poisonlab", "--help"]
    seen.clear()
    call(monkeypatch, "help", "run")
    assert seen["argv"] == ["poisonlab", "--help"]


def test_subcommands_get_their_arguments(monkeypatch):
    import poisonlab.bom

    monkeypatch.setattr(poisonlab.bom, "main", lambda argv: ("bom", argv))
    assert call(monkeypatch, "bom", "RUN", "--out", "x.json") == ("bom", ["RUN", "--out", "x.json"])


def test_python_m_poisonlab_cli_help_exits_0():
    res = subprocess.run([sys.executable, "-m", "poisonlab.cli", "help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "scan" in res.stdout and "bom" in res.stdout
    res = subprocess.run([sys.executable, "-m", "poisonlab.cli", "scna"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "did you mean 'scan'?" in res.stderr
