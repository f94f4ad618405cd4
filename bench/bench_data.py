"""Tokenization throughput: dataload's cache builder vs a plain per-story `tokenizer.encode` loop, same text.

    python bench/bench_data.py [--data "../shared/data/tinystories_train_*.txt"] [--vocab_size 10000]

Without --data (or ../shared), a generated corpus of about 5 MB is used. Also prints the trimmed-vocabulary
coverage table for 4K, 10K and 20K tokens.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinylm.data.corpus import non_empty, read_stories, resolve_files  # noqa: E402
from tinylm.data.cache import PARALLEL_BYTES, build_cache, count_tokens, trim_tokenizer  # noqa: E402
from tinylm.data.tokenizer import gpt_neo_tokenizer

SHARED_TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinystories_train_*.txt")


def generated_stories(n=25000):
    rng = np.random.default_rng(0)
    words = "once upon a time there was little girl named Lily she loved to play with her ball in the park".split()
    return [" ".join(rng.choice(words, size=rng.integers(80, 250))) + "." for _ in range(n)]


def main():
    # here, not at the top: spawned cache-builder workers re-import this file, and should not import torch
    from bench_model import interleaved_medians

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="files to tokenize (default: ../shared train files if present)")
    p.add_argument("--vocab_size", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each, taking turns (median)")
    args = p.parse_args()
    spec = args.data or (SHARED_TRAIN if resolve_files_or_none(SHARED_TRAIN) else None)
    stories = list(non_empty(read_stories(resolve_files(spec)), {})) if spec else generated_stories()
    mb = sum(len(s.encode()) for s in stories) / 1e6
    print(f"corpus: {spec or 'generated'}: {len(stories):,} stories, {mb:.2f} MB, {os.cpu_count()} cores")
    full = gpt_neo_tokenizer()
    counts = count_tokens(full, stories)
    tok = trim_tokenizer(full, counts, args.vocab_size)

    results = {}

    def loop():
        results["loop"] = [tok.encode(s) + [tok.eos_token_id] for s in stories]

    def builder(workers):
        def run():
            with tempfile.TemporaryDirectory() as d:
                n = build_cache(os.path.join(d, "train.bin"), tok, iter(stories), workers=workers)
                results[workers] = n, np.fromfile(os.path.join(d, "train.bin"), dtype=np.uint16)
        return run
    # prepare_data uses one process for corpora below PARALLEL_BYTES (the tokenizer's threads still use every
    # core) and one per core above
    workers = [1] + ([os.cpu_count()] if os.cpu_count() > 1 else [])
    t = interleaved_medians({"loop": loop, **{w: builder(w) for w in workers}}, args.repeats)
    print(f"per-story encode loop:            {mb / t['loop']:6.2f} MB/s   (median of {args.repeats}, taking turns)")
    expected = np.concatenate(results["loop"])
    for w in workers:
        n, cached = results[w]
        assert n == len(expected) and np.array_equal(cached, expected), "different tokens"
        used = (w > 1) == (mb * 1e6 > PARALLEL_BYTES)
        print(f"cache builder, {w} process{'es' if w > 1 else '  '}:     {mb / t[w]:6.2f} MB/s   "
              f"ratio {t['loop'] / t[w]:.2f}x   (same {n:,} tokens; process start-up included)"
              f"{'   <- what prepare_data runs for this corpus' if used else ''}")

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
