"""The fused LM head + cross-entropy (model.lm_head_cross_entropy) against what transformers computes for it (the
logits h @ wte.T, then F.cross_entropy), forward + backward, same inputs, one process, taking turns.

    python bench/bench_lm_head.py [--tokens 4096] [--repeats 5]

Shapes: the TinyStories-1M and -8M heads (vocabulary 50257, widths 64 and 256) and the recipes' (vocabulary 4000,
widths 128 and 192), in fp32 and under bf16 autocast (train.dtype = auto on a CPU with AMX). Prints the median
milliseconds of each and their ratio.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinylm.modeling.lm_head import lm_head_cross_entropy  # noqa: E402

SHAPES = [(64, 50257), (256, 50257), (128, 4000), (192, 4000)]  # (width, vocabulary)


def fused(h, w, targets):
    return lm_head_cross_entropy(h, w, targets)


def reference(h, w, targets):
    return F.cross_entropy(h @ w.t(), targets)


def timed(loss_fn, h, w, targets, bf16: bool) -> float:
    """Milliseconds of one forward + backward."""
    h.grad = w.grad = None
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(h, w, targets)
    loss.backward()
    return (time.perf_counter() - t0) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="rows of h: batch x block_size (8 x 512)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, median of "
          f"{args.repeats}, forward + backward")
    for width, vocab in SHAPES:
        for bf16 in (False, True):
            g = torch.Generator().manual_seed(0)
            h = torch.randn(args.tokens, width, generator=g, requires_grad=True)
            w = (0.02 * torch.randn(vocab, width, generator=g)).requires_grad_()
            targets = torch.randint(0, vocab, (args.tokens,), generator=g)
            times = {"fused": [], "reference": []}
            for fn in (fused, reference):  # a warm-up each
                timed(fn, h, w, targets, bf16)
            for _ in range(args.repeats):
                times["fused"].append(timed(fused, h, w, targets, bf16))
                times["reference"].append(timed(reference, h, w, targets, bf16))
            ours, theirs = statistics.median(times["fused"]), statistics.median(times["reference"])
            print(f"width {width:3d} vocab {vocab:5d} {'bf16' if bf16 else 'fp32'}: fused {ours:7.1f} ms, "
                  f"logits + cross_entropy {theirs:7.1f} ms, ratio {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
