#!/usr/bin/env bash
# The test command: set up .venv (see scripts/setup_env.sh), then run the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POISONLAB_EXTRAS="${POISONLAB_EXTRAS:-dev}" . "$root/scripts/setup_env.sh"
cd "$root"
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
