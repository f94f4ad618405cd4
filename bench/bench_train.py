"""Training throughput and MFU of train.py's loop: TinyLM vs transformers' GPTNeoForCausalLM, same process.

    python bench/bench_train.py [--configs tinystories_1M tinystories_8M] [--steps 5] [--batch_size 8]

Both models start from the same weights and run the same loop (batch from the token stream, forward, loss,
backward, grad-norm clip, AdamW step), taking turns step by step. MFU = model FLOPs per second / the matmul
FLOP/s this machine reaches (a large fp32 matmul, measured here), with nanoGPT's count: 6 * parameters
(position embeddings excluded) + 12 * n_layer * n_embd * block_size per token.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench_model import hf_twin, interleaved_medians  # noqa: E402
from dataload import get_batch  # noqa: E402
from model import GPTNeo  # noqa: E402
from train import TrainConfig, load_config, make_optimizer  # noqa: E402


def matmul_flops_per_second(device, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(model: GPTNeo, block_size: int) -> float:
    c = model.config
    return 6 * (model.num_params() - model.wpe.weight.numel()) + 12 * c.n_layer * c.n_embd * block_size


def train_step_fn(model, loss_of, tokens, args, device):
    """One step of train.py's loop per call, each on the next batch; timed by the caller."""
    opt = make_optimizer(model, TrainConfig(), device) if isinstance(model, GPTNeo) else torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() == 2], "weight_decay": 0.1},
         {"params": [p for p in model.parameters() if p.dim() != 2], "weight_decay": 0.0}], lr=1e-3,
        betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    model.train()
    step = 0

    def run():
        nonlocal step
        x, y = get_batch(tokens, args.batch_size, args.block_size, step, 0, device)
        with autocast:
            loss = loss_of(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        step += 1
    return run


def hf_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tinystories_1M", "tinystories_8M"], help="names in config/")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model, taking turns (median)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    device = torch.device(args.device)
    peak = matmul_flops_per_second(device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {args.dtype}; "
          f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; batch {args.batch_size} x {args.block_size}")
    tokens_per_step = args.batch_size * args.block_size
    for name in args.configs:
        config = load_config(os.path.join(ROOT, "config", f"{name}.config"))["model"]
        torch.manual_seed(0)
        ours = GPTNeo(config)
        with tempfile.TemporaryDirectory() as folder:
            hf = hf_twin(ours, folder).to(device)
        ours = ours.to(device)
        stream = np.random.default_rng(0).integers(0, config.vocab_size, 1_000_000).astype(np.int64)
        flops = flops_per_token(ours, args.block_size)
        t = interleaved_medians({"ours": train_step_fn(ours, lambda m, x, y: m(x, y)[1], stream, args, device),
                                 "hf": train_step_fn(hf, hf_loss, stream, args, device)}, args.steps)
        t_ours, t_hf = t["ours"], t["hf"]
        line = [f"{name:15s} ({ours.num_params() / 1e6:.1f}M):"]
        for who, t in (("ours", t_ours), ("transformers", t_hf)):
            line.append(f"{who} {tokens_per_step / t:7.0f} tok/s MFU {100 * flops * tokens_per_step / t / peak:5.1f}%")
        print("   ".join(line) + f"   ratio {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
