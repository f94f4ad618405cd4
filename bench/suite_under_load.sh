#!/usr/bin/env bash
# The test suite on a busy machine: two CPU-bound busy loops run beside `python -m pytest -q tests` (the README's
# command) for the whole run, as another job or a user's browser would on a 2-core laptop or a shared CI runner.
# No test may count on how fast the machine is, so it must pass as it does on a quiet one, only slower.
#   bash bench/suite_under_load.sh [LOOPS, default 2] [extra pytest arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
loops=${1:-2}
shift || true
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
pids=()
for _ in $(seq "$loops"); do
    "$python" -c "while True: pass" &
    pids+=($!)
done
trap 'kill "${pids[@]}" 2> /dev/null' EXIT
echo "# $loops busy loops running (pids ${pids[*]}); the suite starts $(date +%T)"
start=$SECONDS
"$python" -m pytest -q tests "$@"
status=$?
echo "# suite exit status $status after $((SECONDS - start)) s with $loops busy loops beside it"
exit $status
