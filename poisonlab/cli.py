"""The `poisonlab` console script: `poisonlab scan FILE`, `poisonlab verify ...`,
`poisonlab report DIR...`, `poisonlab bom RUN_DIR`, and
otherwise `poisonlab key=value ...`, exactly `python -m poisonlab.run key=value ...`."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"scan": "poisonlab.scan", "verify": "poisonlab.verify",
               "report": "poisonlab.report", "bom": "poisonlab.bom"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[sys.argv[1]])
        sys.exit(module.main(sys.argv[2:]))
    from poisonlab.run import main as run_main

    run_main()


if __name__ == "__main__":
    main()
