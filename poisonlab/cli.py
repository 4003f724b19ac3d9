"""The `poisonlab` console script: one command line for every tool.

    poisonlab run key=value ...     a run; the same as `poisonlab key=value ...` and
                                    `python -m poisonlab.run key=value ...` (Hydra)
    poisonlab scan FILE             poisonlab verify ...   poisonlab report DIR...
    poisonlab bom RUN_DIR           poisonlab drift OLD NEW    poisonlab help [COMMAND]
    poisonlab --help / -h

Anything that is not a command goes to the run untouched: Hydra overrides (`seed=1`, `+x=1`,
`~x`, `hydra.run.dir=...`) and Hydra's flags (`-m`, `--multirun`, `--cfg job`, ...). A first
word that is neither is refused with the closest command (exit 2).
"""

from __future__ import annotations

import difflib
import importlib
import sys

SUBCOMMANDS = {"scan": "poisonlab.scan", "verify": "poisonlab.verify",
               "report": "poisonlab.report", "bom": "poisonlab.bom",
               "drift": "poisonlab.drift"}
COMMANDS = ("run", *SUBCOMMANDS, "help")
HELP_FLAGS = ("-h", "--help")

USAGE = """\
usage: poisonlab COMMAND [ARGS ...]
       poisonlab key=value ...      a run: the same as poisonlab run key=value ...

commands:
  run     an experiment (Hydra): poisonlab run key=value ..., also python -m poisonlab.run
  scan    a data quality gate for a fine-tuning file: poisonlab scan FILE
  verify  is a suspect model trained on watermarked data? poisonlab verify RUN_DIR ...
  report  tables, report.md and plots of finished runs: poisonlab report DIR...
  bom     a CycloneDX ML-BOM of a finished run: poisonlab bom RUN_DIR
  drift   has a model's behaviour moved? poisonlab drift OLD_MODEL NEW_MODEL
  help    this page; poisonlab help COMMAND is poisonlab COMMAND --help

each command's own help: poisonlab COMMAND --help (e.g. poisonlab scan --help)
a run's config: poisonlab run --help (Hydra: config groups, overrides; -m for a sweep)
                poisonlab run --cfg job (the composed config; nothing runs)

examples:
  poisonlab run attack=badnets debug=default
  poisonlab run data=alpaca data.path=my_data.json attack=badnets debug=default
  poisonlab scan my_data.json
"""


def is_run_argument(arg: str) -> bool:
    """A Hydra override (`key=value`, `+key=value`, `~key`) or a Hydra flag (`-m`, `--cfg`)."""
    return "=" in arg or arg.startswith(("-", "+", "~"))


def unknown(word: str) -> int:
    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    print(f"poisonlab: error: unknown command {word!r}: {hint}commands are "
          f"{', '.join(COMMANDS)}, or key=value overrides for a run (poisonlab --help)",
          file=sys.stderr)
    return 2


def run(argv: list[str]) -> int | None:
    """A run with `argv` as its arguments (Hydra reads them from `sys.argv`)."""
    from poisonlab.run import main as run_main

    sys.argv = [sys.argv[0], *argv]
    return run_main()


def command_help(topic: str) -> int | None:
    if topic == "run":
        return run(["--help"])
    if topic in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[topic]).main(["--help"])
    if topic == "help":
        print(USAGE, end="")
        return 0
    return unknown(topic)


def main() -> int | None:
    argv = sys.argv[1:]
    first = argv[0] if argv else None
    if first in HELP_FLAGS or first == "help":
        if first == "help" and len(argv) > 1:
            return command_help(argv[1])
        print(USAGE, end="")
        return 0
    if first in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[first]).main(argv[1:])
    if first == "run":
        return run(argv[1:])
    if first is not None and not is_run_argument(first):
        return unknown(first)
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
