#!/usr/bin/env bash
# How TinyLM's speed choices fare on this machine, in one run, for a bug report or the README's by-machine table:
# the CPU and its flags, what train.dtype = auto measures and takes against both precisions (3 runs, each measuring
# afresh; TinyStories-1M's small heads and width also weigh the C kernels), whether the C training kernels' rules
# pick the faster side, and, given TinyStories text, the 5-minute quickstart's test bits per byte
# (bench/bench_recipe.py; it reads ../shared/data or --data's files).
#   bash bench/machine_report.sh [--recipe] [--data 'path/to/tinystories_train_*.txt']
# (about 13 minutes; 19 with --recipe: 2-core Xeon)
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
recipe=0
data=()
while [ $# -gt 0 ]; do
    case "$1" in
        --recipe) recipe=1 ;;
        --data) data=(--data "$2"); shift ;;
        *) echo "error: unknown argument $1; use --recipe and --data PATTERN" >&2; exit 2 ;;
    esac
    shift
done
echo "# $(lscpu 2> /dev/null | grep -m1 'Model name' | sed 's/  */ /g'); $(nproc) cores; $(date -u +%F)"
for run in 1 2 3; do  # each run measures auto afresh, in a cache of its own
    echo "# bench_train run $run"
    TINYLM_CACHE=$(mktemp -d) "$python" bench/bench_train.py --configs laptop quickstart tinystories_1M --batch_size 16 \
        --block_size 256 --dtype auto float32 bfloat16 --hf_attn none --steps 8 | grep -v "^torch "
done
"$python" bench/bench_thresholds.py --repeats 3
if [ "$recipe" = 1 ]; then
    "$python" bench/bench_recipe.py --config config/quickstart.config --minutes 5 --name "machine_report" "${data[@]}"
fi
