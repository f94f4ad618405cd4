"""Quality per wall-clock budget: TinyLM's recipe against transformers' GPTNeoForCausalLM trained with the released
TinyStories recipe, one after the other in one run, on the same tokenizer, train files and budget.

    python bench/bench_quality.py --minutes 5 [--config config/quickstart.config] [--data "../shared/data/...*.txt"]

TinyLM: train.py with the config, stopped by train.max_minutes. transformers: the hub model card's recipe (AdamW,
lr 5e-4 constant, weight decay 0.1, betas 0.9/0.95, context 512, batch 16 here), the config's model shape with a
512-token context, a plain loop over random 512-token windows. Both are scored on the same validation split
during training and on the test split at the end, in bits per byte. The token ratio is how many training tokens
TinyLM needed to reach the transformers run's final validation loss, over the tokens that run trained on.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data")
OUT = os.path.join(ROOT, "out", "quality")


def train_tinylm(config: str, data: str, minutes: float) -> list[tuple[int, float]]:
    """Run train.py for the budget; (tokens, validation loss) at each evaluation."""
    out_dir = os.path.join(OUT, "tinylm")
    cmd = [sys.executable, "train.py", "--config", config, "--set", f"data.dataset={data}",
           "--set", f"train.max_minutes={minutes:g}", "--set", "train.max_steps=100000000", "--set",
           f"train.out_dir={out_dir}", "--overwrite"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"train.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]


def train_transformers(model_config, splits, minutes: float, batch_size: int, eval_every_s: float, eval_tokens: int,
                       eval_block: int) -> tuple[object, list[tuple[int, float]]]:
    """The released recipe in a plain loop, evaluating (in eval_block pieces, as train.py does) every
    eval_every_s seconds and at the end."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from tinylm.data.cache import get_batch
    from tinylm.evaluation.scoring import evaluate_loss

    block = 512
    hf_config = GPTNeoConfig(**{**model_config.to_hf_dict(), "max_position_embeddings": max(
        block, model_config.max_position_embeddings)})
    torch.manual_seed(1337)
    model = GPTNeoForCausalLM(hf_config)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n and "wpe" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "wte" not in n and "wpe" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=5e-4, betas=(0.9, 0.95))

    class Scored(torch.nn.Module):  # evaluate_loss's interface: model(x, y) -> (logits, mean loss)
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, y):
            logits = self.m(x).logits
            return None, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)

    scored, curve, tokens, step = Scored(model), [], 0, 0
    start = last_eval = time.time()
    curve.append((0, evaluate_loss(scored, splits["val"], batch_size, eval_block, eval_tokens)[0]))
    while time.time() - start < 60 * minutes:
        model.train()
        x, y = get_batch(splits["train"], batch_size, block, step, seed=1337)
        loss = scored(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + batch_size * block
        if time.time() - last_eval >= eval_every_s:
            curve.append((tokens, evaluate_loss(scored, splits["val"], batch_size, eval_block, eval_tokens)[0]))
            last_eval = time.time()
    curve.append((tokens, evaluate_loss(scored, splits["val"], batch_size, eval_block, eval_tokens)[0]))
    return model, curve


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Training tokens at which a validation curve first reaches `target` (linear between evaluations)."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of each side")
    p.add_argument("--config", default="config/quickstart.config", help="TinyLM's recipe (and the model shape)")
    p.add_argument("--data", default=os.path.join(DATA, "tinystories_train_*.txt"))
    p.add_argument("--test", default=os.path.join(DATA, "tinystories_test.txt"))
    p.add_argument("--hf_batch_size", type=int, default=16)
    args = p.parse_args()
    if not glob.glob(args.data):
        sys.exit(f"no training text at {args.data}")
    import torch

    from tinylm.training.config import load_config
    from tinylm.data.cache import prepare_data
    from tinylm.checkpoint import load_model_and_tokenizer
    from tinylm.evaluation.scoring import evaluate_file

    config = load_config(os.path.join(ROOT, args.config), [f"data.dataset={args.data}"])
    m, d, t = config["model"], config["data"], config["train"]
    os.chdir(ROOT)
    tokenizer, splits, _ = prepare_data(d.dataset, m.vocab_size, d.cache_dir, d.val_dataset, d.val_fraction,
                                        log=lambda *a: None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.config}, vocab {len(tokenizer)}, "
          f"{args.minutes:g} minutes each, one after the other")

    ours_curve = train_tinylm(args.config, args.data, args.minutes)
    shape = dataclasses.replace(m, vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    hf, hf_curve = train_transformers(shape, splits, args.minutes, args.hf_batch_size, eval_every_s=30,
                                      eval_tokens=t.eval_tokens, eval_block=d.block_size)
    hf_dir = os.path.join(OUT, "transformers")
    hf.save_pretrained(hf_dir)
    tokenizer.backend_tokenizer.save(os.path.join(hf_dir, "tokenizer.json"))

    results = {}  # both scored in pieces of the shorter context
    for name, folder in (("TinyLM", os.path.join(OUT, "tinylm", "best")), ("transformers", hf_dir)):
        model, tok = load_model_and_tokenizer(folder, torch.device("cpu"))
        results[name] = evaluate_file(model, tok, args.test, 8, min(512, m.max_position_embeddings), "cpu")
    for name, curve in (("TinyLM", ours_curve), ("transformers", hf_curve)):
        r = results[name]
        print(f"{name:<13} {curve[-1][0] / 1e6:6.2f}M train tokens | final val {min(v for _, v in curve):.4f} "
              f"nats/token | test {r['loss']:.4f} nats/token, {r['bits_per_byte']:.4f} bits/byte")
    target = hf_curve[-1][1]
    needed = tokens_to_reach(ours_curve, target)
    ratio = "not reached" if needed is None else f"{needed / hf_curve[-1][0]:.3f}"
    print(f"tokens TinyLM needs to reach transformers' final val loss {target:.4f}: "
          f"{'-' if needed is None else f'{needed / 1e6:.2f}M'} of transformers' {hf_curve[-1][0] / 1e6:.2f}M: "
          f"ratio {ratio}; test bits/byte ratio (transformers / TinyLM) "
          f"{results['transformers']['bits_per_byte'] / results['TinyLM']['bits_per_byte']:.3f}")
    if math.isnan(target):
        print("note: the transformers run diverged")


if __name__ == "__main__":
    main()
