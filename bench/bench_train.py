"""Training throughput and MFU of train.py's loop: TinyLM vs transformers' GPTNeoForCausalLM, same process.

    python bench/bench_train.py [--configs tinystories_1M tinystories_8M] [--steps 5] [--batch_size 8]
    python bench/bench_train.py --device cuda --dtype bfloat16 --compile --hf_attn eager flash_attention_2
    python bench/bench_train.py --configs laptop quickstart --batch_size 16 --block_size 256 --dtype float32 auto

Both models start from the same weights and run the same loop (batch from the token stream, forward, loss,
backward, grad-norm clip, AdamW step), taking turns step by step; with several --dtype, every model runs in each
(auto: what train.py picks for that model here, measured at its shapes on a CPU, and a line says so; a line of its
own where it leaves a C kernel out) and a line per dtype gives its speed against the first; with auto, float32 and
bfloat16 all given, a last line says what auto took and how fast that is against the faster of the two. The header
names the CPU and the features its speed depends on (AMX, avx512_bf16, AVX-512, AVX2). MFU = model FLOPs per
second / the matmul FLOP/s this machine reaches in the dtype that runs the matmuls (a large matmul, measured here;
a GPU's is always its bf16 peak, what its FLOPs are quoted in), with nanoGPT's count: 6 * parameters
(position embeddings excluded) + 12 * n_layer * n_embd * block_size per token. --compile runs both models through
torch.compile; --hf_attn lists transformers' attention implementations to time (one line each; flash_attention_2
only where the flash_attn package is installed; none: TinyLM alone).
"""

import argparse
import copy
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench_model import interleaved_medians  # noqa: E402
from tinylm.training.config import TrainConfig, load_config  # noqa: E402
from tinylm.data.cache import get_batch  # noqa: E402
from tinylm.devices import cpu_description  # noqa: E402
from model import GPTNeo  # noqa: E402
from tinylm.training.optimizers import make_optimizer  # noqa: E402
from tinylm.training.precision import pick_precision  # noqa: E402


def matmul_flops_per_second(device, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    n = n if device.type == "cpu" else 8192  # a GPU needs a large product to reach its peak
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
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


def train_step_fn(model, loss_of, tokens, args, device, dtype: str):
    """One step of train.py's loop per call, each on the next batch; timed by the caller."""
    opt = make_optimizer(model, TrainConfig(), device) if isinstance(model, GPTNeo) else torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.dim() == 2], "weight_decay": 0.1},
         {"params": [p for p in model.parameters() if p.dim() != 2], "weight_decay": 0.0}], lr=1e-3,
        betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))  # the implementation train.py's AdamW uses
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
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


def hf_model(ours: GPTNeo, folder: str, attn: str):
    """transformers' twin of ours with the given attention implementation."""
    from transformers import GPTNeoForCausalLM

    ours.save_pretrained(folder)
    return GPTNeoForCausalLM.from_pretrained(folder, attn_implementation=attn)


def hf_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tinystories_1M", "tinystories_8M"], help="names in config/")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model, taking turns (median)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["auto", "float32", "bfloat16"],
                   help="train.dtype values to run, side by side")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--hf_attn", nargs="+", default=["eager"],
                   help="transformers attention implementations, or none")
    args = p.parse_args()
    device = torch.device(args.device)
    # auto is decided per model (measured at its shapes on a CPU with bf16 instructions): either may run
    candidates = {"auto": ["float32", "bfloat16"] if device.type == "cpu" else [pick_precision("auto", device)[0]]}
    peak_dtypes = list(dict.fromkeys(d for requested in args.dtype for d in candidates.get(requested, [requested])))
    # MFU against the GPU's bf16 matmul peak (what its FLOPs are quoted in), or the CPU's in the run's dtype
    peaks = {d: matmul_flops_per_second(device, dtype=getattr(torch, "bfloat16" if device.type == "cuda" else d))
             for d in peak_dtypes}
    peak_names = ", ".join(f"{'bfloat16' if device.type == 'cuda' else d} {peak / 1e12:.2f} TFLOP/s"
                           for d, peak in peaks.items())
    print(cpu_description() if device.type == "cpu" else torch.cuda.get_device_name(device))
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads"
          f"{', compiled' if args.compile else ''}; measured matmul peak {peak_names}; "
          f"batch {args.batch_size} x {args.block_size}")
    attns = [a for a in args.hf_attn if a != "none" and (a != "flash_attention_2" or importlib.util.find_spec("flash_attn"))]
    if "flash_attention_2" in args.hf_attn and "flash_attention_2" not in attns:
        print("(no flash_attention_2 line: the flash_attn package is not installed)")
    tokens_per_step = args.batch_size * args.block_size
    for name in args.configs:
        config = load_config(os.path.join(ROOT, "config", f"{name}.config"))["model"]
        torch.manual_seed(0)
        ours = GPTNeo(config)
        with tempfile.TemporaryDirectory() as folder:
            hfs = {attn: hf_model(ours, folder, attn).to(device) for attn in attns}
        ours = ours.to(device)
        stream = np.random.default_rng(0).integers(0, config.vocab_size, 1_000_000).astype(np.int64)
        flops = flops_per_token(ours, args.block_size)
        auto, kernels_off, why = pick_precision("auto", device, ours, args.batch_size, args.block_size,
                                                compiled=args.compile)
        if "auto" in args.dtype:
            print(f"{name:15s} train.dtype = auto takes {auto}: {why}")
        # auto is a line of its own where it left a C kernel out (its precision's line runs them all)
        auto_way = "auto" if kernels_off and auto == "float32" else auto
        dtypes = list(dict.fromkeys(auto_way if d == "auto" else d for d in args.dtype))
        precision_of = {d: auto if d == "auto" else d for d in dtypes}
        compiled = torch.compile if args.compile else (lambda m: m)
        fns = {}
        for dtype in dtypes:  # each model a copy per dtype: their optimizers step apart
            mine = copy.deepcopy(ours)
            if dtype == "auto":
                mine.allow_c_kernels([k for k in mine.allowed_c_kernels if k not in kernels_off])
            fns[("ours", dtype)] = train_step_fn(mine, lambda m, x, y, c=compiled(mine): c(x, y)[1], stream, args,
                                                 device, precision_of[dtype])
            for attn, hf in hfs.items() if dtype != "auto" else ():
                theirs = copy.deepcopy(hf)
                fns[(attn, dtype)] = train_step_fn(theirs, lambda m, x, y, c=compiled(theirs): hf_loss(c, x, y),
                                                   stream, args, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = interleaved_medians(fns, args.steps)
        for dtype in dtypes:
            line = [f"{name:15s} ({ours.num_params() / 1e6:.1f}M) {dtype:8s}:"]
            for (who, d), seconds in t.items():
                if d == dtype:
                    label = "ours" if who == "ours" else f"transformers[{who}]"
                    line.append(f"{label} {tokens_per_step / seconds:7.0f} tok/s MFU "
                                f"{100 * flops * tokens_per_step / seconds / peaks[precision_of[dtype]]:5.1f}%")
            ratios = [f"{t[(a, dtype)] / t[('ours', dtype)]:.2f}x vs {a}" for a in hfs if (a, dtype) in t]
            if dtype != dtypes[0]:
                ratios.append(f"{t[('ours', dtypes[0])] / t[('ours', dtype)]:.2f}x vs ours {dtypes[0]}")
            memory = f"   peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (all models)" \
                if device.type == "cuda" else ""
            print("   ".join(line) + (f"   ratio {', '.join(ratios)}" if ratios else "") + memory)
        if "auto" in args.dtype and {"float32", "bfloat16"} <= set(dtypes):
            faster = min(("float32", "bfloat16"), key=lambda d: t[("ours", d)])
            without = f" without {', '.join(k + '.c' for k in kernels_off)}" if auto_way == "auto" else ""
            print(f"{name:15s} auto = {auto}{without}: {t[('ours', faster)] / t[('ours', auto_way)]:.2f}x the "
                  f"faster precision here ({faster})")


if __name__ == "__main__":
    main()
