"""One row of the recipe study: train a config for a wall-clock budget on the shared TinyStories text, then score
its best/ in bits per byte on the valid split (what we tune on) and the test split (reported, never tuned on).

    python bench/bench_recipe.py --config config/quickstart.config --minutes 5 --name lr4e-3 --set train.lr=4e-3

Each run trains into out/recipe/NAME (replacing an earlier run of that name), prints one line and appends it, with
the command that reproduces it, to out/recipe/results.jsonl. Bits per byte divide by the text's UTF-8 bytes, so
models with different vocabularies compare fairly.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--minutes", type=float, required=True, help="train.max_minutes")
    p.add_argument("--name", required=True, help="out/recipe/NAME")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--data", default=os.path.join(DATA, "tinystories_train_*.txt"))
    args = p.parse_args()
    import torch

    from tinylm.checkpoint import load_model_and_tokenizer
    from tinylm.evaluation.scoring import evaluate_file

    out_dir = os.path.join("out", "recipe", args.name)
    sets = [f"data.dataset={args.data}", f"train.max_minutes={args.minutes:g}", f"train.out_dir={out_dir}", *args.set]
    cmd = ["python", "train.py", "--config", args.config] + [w for s in sets for w in ("--set", s)] + ["--overwrite"]
    t0 = time.time()
    done = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{args.name}: train.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    state = json.load(open(os.path.join(ROOT, out_dir, "last", "metrics.json")))
    model, tokenizer = load_model_and_tokenizer(os.path.join(ROOT, out_dir, "best"), torch.device("cpu"))
    block = model.config.max_position_embeddings
    scores = {split: evaluate_file(model, tokenizer, os.path.join(DATA, f"tinystories_{split}.txt"), 8,
                                   min(512, block), "cpu") for split in ("valid", "test")}
    row = {"name": args.name, "config": args.config, "minutes": args.minutes, "set": args.set,
           "params_M": round(model.num_params() / 1e6, 3), "steps": state["step"], "tokens": state["tokens"],
           "wall_s": round(time.time() - t0), "val_bpb": round(scores["valid"]["bits_per_byte"], 4),
           "test_bpb": round(scores["test"]["bits_per_byte"], 4),
           "val_nats": round(scores["valid"]["loss"], 4), "command": shlex.join(cmd)}
    print(f"{args.name:<24} {row['params_M']:.2f}M {row['steps']:6d} steps {row['tokens'] / 1e6:6.2f}M tokens | "
          f"valid {row['val_bpb']:.4f} bpb | test {row['test_bpb']:.4f} bpb | {' '.join(args.set)}", flush=True)
    with open(os.path.join(ROOT, "out", "recipe", "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
