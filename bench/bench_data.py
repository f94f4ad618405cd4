"""Tokenization throughput: dataload's cache builder vs a plain per-story `tokenizer.encode` loop, same text.

    python bench/bench_data.py [--data "../shared/data/tinystories_train_*.txt"] [--vocab_size 10000]

Without --data (or ../shared), a generated corpus of about 5 MB is used. Also prints the trimmed-vocabulary
coverage table for 4K, 10K and 20K tokens.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataload import (EOT, build_cache, count_tokens, gpt_neo_tokenizer, non_empty, read_stories,  # noqa: E402
                      resolve_files, trim_tokenizer)

SHARED_TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinystories_train_*.txt")


def generated_stories(n=25000):
    rng = np.random.default_rng(0)
    words = "once upon a time there was little girl named Lily she loved to play with her ball in the park".split()
    return [" ".join(rng.choice(words, size=rng.integers(80, 250))) + "." for _ in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="files to tokenize (default: ../shared train files if present)")
    p.add_argument("--vocab_size", type=int, default=10000)
    args = p.parse_args()
    spec = args.data or (SHARED_TRAIN if resolve_files_or_none(SHARED_TRAIN) else None)
    stories = list(non_empty(read_stories(resolve_files(spec)), {})) if spec else generated_stories()
    mb = sum(len(s.encode()) for s in stories) / 1e6
    print(f"corpus: {spec or 'generated'}: {len(stories):,} stories, {mb:.2f} MB, {os.cpu_count()} cores")
    full = gpt_neo_tokenizer()
    counts = count_tokens(full, stories)
    tok = trim_tokenizer(full, counts, args.vocab_size)

    t0 = time.perf_counter()
    loop_ids = [tok.encode(s) + [tok.eos_token_id] for s in stories]
    t_loop = time.perf_counter() - t0
    print(f"per-story encode loop:            {mb / t_loop:6.2f} MB/s")
    for workers in (1, os.cpu_count()):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            n = build_cache(os.path.join(d, "train.bin"), tok, iter(stories), workers=workers)
            t_cache = time.perf_counter() - t0
            cached = np.fromfile(os.path.join(d, "train.bin"), dtype=np.uint16)
        assert n == sum(map(len, loop_ids)) and np.array_equal(cached, np.concatenate(loop_ids)), "different tokens"
        print(f"cache builder, {workers} process{'es' if workers > 1 else '  '}:     {mb / t_cache:6.2f} MB/s   "
              f"ratio {t_loop / t_cache:.2f}x   (same {n:,} tokens; process start-up included)")

    total = counts.sum()
    print(f"\nvocab   coverage   tokens/story full -> trimmed   (corpus uses {int((counts > 0).sum()):,} distinct tokens)")
    for size in (4000, 10000, 20000):
        trimmed = trim_tokenizer(full, counts, size)
        vocab = trimmed.get_vocab()
        kept = sum(counts[i] for t, i in full.get_vocab().items() if t in vocab) / total
        n_trim = sum(len(e.ids) + 1 for e in trimmed.backend_tokenizer.encode_batch(stories, add_special_tokens=False))
        print(f"{size:5d}   {kept:8.2%}   {total / len(stories):8.1f} -> {n_trim / len(stories):.1f}")


def resolve_files_or_none(spec):
    try:
        return resolve_files(spec)
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    main()
