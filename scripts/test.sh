#!/usr/bin/env bash
# The test command: set up .venv (see scripts/setup_env.sh), then run the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
POISONLAB_EXTRAS="${POISONLAB_EXTRAS:-dev}" . "$root/scripts/setup_env.sh"
cd "$root"
# The default suite runs in two worker processes of one thread each (pytest-xdist, a test
# file per worker at a time): the micro models' ops are small, so two processes keep 2 cores
# busier than one process with two threads. One process instead with
# POISONLAB_TEST_WORKERS=1, with OMP_NUM_THREADS above 1 (threads of two workers would
# oversubscribe the cores), with `-s` (prints would be lost in workers) and with `-m ...` (the
# slow and GPU suites are sized for one process).
workers="${POISONLAB_TEST_WORKERS:-2}"
if [ "${OMP_NUM_THREADS:-1}" != "1" ]; then
  workers=1
fi
for arg in "$@"; do
  case "$arg" in -s|--capture=no|-m|-m*) workers=1 ;; esac
done
parallel=()
if [ "$workers" -gt 1 ] && python -c "import xdist" 2>/dev/null; then
  export OMP_NUM_THREADS=1
  parallel=(-n "$workers" --dist loadfile)
fi
set +e
python -m pytest -q ${parallel[@]+"${parallel[@]}"} "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
