"""Validation loss against training tokens for several runs on one chart, and the gap between them at equal tokens.

    python bench/plot_runs.py --run out/recipe/qs_fp32 --run out/recipe/qs_bf16_tokens --out docs/precision.png

Reads each run's metrics.jsonl. Prints, at ten points along the tokens all runs reached, each run's validation loss
(interpolated between evaluations) and its difference from the first run.
"""

import argparse
import json
import os

import numpy as np


def validation_curve(run: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    points = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    tokens, losses = zip(*points)
    return np.array(tokens, dtype=float), np.array(losses)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="a run folder (train.out_dir); the first is the reference")
    p.add_argument("--label", action="append", help="one per --run (default: the folder's name)")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args()
    labels = args.label or [os.path.basename(r.rstrip("/")) for r in args.run]
    curves = [validation_curve(r) for r in args.run]
    shared = min(tokens[-1] for tokens, _ in curves)
    print(f"{'tokens':>8s} " + " ".join(f"{label[:18]:>18s}" for label in labels))
    for t in np.linspace(0.1, 1.0, 10) * shared:
        at = [np.interp(t, tokens, losses) for tokens, losses in curves]
        print(f"{t / 1e6:7.2f}M " + " ".join(f"{v:9.4f} ({v - at[0]:+.4f})" for v in at))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (tokens, losses), label in zip(curves, labels):
        ax.plot(tokens / 1e6, losses, marker="o", ms=2, lw=1, label=label)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_ylim(top=min(4.0, max(losses.max() for _, losses in curves)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
