"""Build (or reuse) the trimmed tokenizer and the token caches of a stories corpus, ahead of training.

    python dataload.py --data "path/to/stories_*.txt" --vocab_size 10000 --out data/ts10k

Stories are separated by <|endoftext|> (the released TinyStories .txt format), or are the `text` field of
.jsonl / .parquet rows or of a `datasets` hub dataset (default roneneldan/TinyStories). train.py builds the same
caches itself when they are missing; this command does it ahead of time and prints what it built as JSON. The
library behind it is tinylm/data/ (cache.py: the caches and batches; tokenizer.py; corpus.py; pieces.py).
"""

import argparse
import json
import sys

from tinylm.data.cache import prepare_data
from tinylm.data.corpus import HUB_DATASET, TINYSTORIES_V2
from tinylm.data.tokenizer import FULL_VOCAB


def main(argv=None):
    p = argparse.ArgumentParser(description="Build (or reuse) the tokenizer and token caches for training.")
    p.add_argument("--data", default=HUB_DATASET, help="file, folder or glob of .txt/.jsonl/.parquet, or a hub dataset")
    p.add_argument("--val_data", default=None, help="validation files (default: val_fraction of --data)")
    p.add_argument("--val_fraction", type=float, default=0.01)
    p.add_argument("--vocab_size", type=int, default=FULL_VOCAB, help="50257 = the full GPT-Neo vocabulary")
    p.add_argument("--tokenizer", choices=["trimmed", "gpt-neo"], default="trimmed",
                   help="gpt-neo: the full vocabulary whatever --vocab_size says (what the HF TinyStories weights use)")
    p.add_argument("--out", default="data", help="folder for tokenizer.json and the caches")
    p.add_argument("--hub_files", default=None, help=f"hub dataset: read its PREFIX-train.txt and PREFIX-valid.txt "
                   f"instead of its parquet splits; {TINYSTORIES_V2} is TinyStories V2 (GPT-4 stories only)")
    p.add_argument("--streaming", action="store_true", help="hub dataset: tokenize the stories as they download, "
                   "keeping no copy of the text")
    args = p.parse_args(argv)
    try:
        vocab_size = FULL_VOCAB if args.tokenizer == "gpt-neo" else args.vocab_size
        tokenizer, splits, report = prepare_data(args.data, vocab_size, args.out, args.val_data, args.val_fraction,
                                                 hub_files=args.hub_files, streaming=args.streaming)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
