"""`python -m poisonlab.report DIR...`: the same as `poisonlab report DIR...`."""

import sys

from poisonlab.report.command import main

sys.exit(main(sys.argv[1:]))
