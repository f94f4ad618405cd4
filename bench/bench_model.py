"""TinyLM vs transformers GPT-Neo on the TinyStories-1M shape, same weights, same process.

    python bench/bench_model.py [--repeats 5] [--new_tokens 500] [--threads N] [--no_compile]
    python bench/bench_model.py --device cuda --gen_batch 64 --no_train

Prints (1) training-step throughput (forward + backward + AdamW, batch 8 x 512) and (2) greedy generation
tokens/s (batch --gen_batch): the default backend, eager and compile, each as ours / transformers.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPTNeo, GPTNeoConfig  # noqa: E402


def hf_twin(model: GPTNeo, folder: str):
    from transformers import GPTNeoForCausalLM

    model.save_pretrained(folder)
    return GPTNeoForCausalLM.from_pretrained(folder, attn_implementation="eager")


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median wall time of each fn, after one warm-up call each (allocator, AdamW state, thread pool, compiling).
    The fns take turns, so a slow spell of a shared machine hits all of them alike instead of one."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step_fn(model, loss_of, x, y, sync=lambda: None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile generation line")
    parser.add_argument("--no_train", action="store_true", help="skip the training-step line")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gen_batch", type=int, default=1, help="rows generated at once")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTNeoConfig(n_embd=64, n_layer=8, n_head=16, window_size=256, max_position_embeddings=2048)
    ours = GPTNeo(config)
    with tempfile.TemporaryDirectory() as folder:
        hf = hf_twin(ours, folder).to(device)
    ours.to(device)
    print(f"TinyStories-1M shape: {ours.num_params() / 1e6:.2f}M parameters, torch {torch.__version__}, "
          f"{device}, {torch.get_num_threads()} threads")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if not args.no_train:
        train_line(ours, hf, config, args, device, sync)
    generation_lines(ours, hf, config, args, device, sync)


def train_line(ours, hf, config, args, device, sync):
    """(1) one training step, ours and transformers taking turns."""
    ours.train(), hf.train()
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), device=device)
    hf_loss = lambda m, x, y: torch.nn.functional.cross_entropy(m(x).logits.flatten(0, 1), y.flatten())
    t = interleaved_medians({"ours": train_step_fn(ours, lambda m, x, y: m(x, y)[1], x, y, sync),
                             "hf": train_step_fn(hf, hf_loss, x, y, sync)}, args.repeats)
    t_ours, t_hf = t["ours"], t["hf"]
    tokens = args.batch_size * args.block_size
    print(f"train step  B={args.batch_size} T={args.block_size}: ours {tokens / t_ours:7.0f} tok/s "
          f"({t_ours * 1e3:.0f} ms)   transformers {tokens / t_hf:7.0f} tok/s ({t_hf * 1e3:.0f} ms)   "
          f"ratio {t_hf / t_ours:.2f}x")


def generation_lines(ours, hf, config, args, device, sync):
    """(2) greedy generation: ours by default (the fastest backend that runs here), ours eager, ours with the
    per-token step compiled (compile time reported apart), each against transformers' generate."""
    ours.eval(), hf.eval()
    B = args.gen_batch
    prompt = torch.randint(0, config.vocab_size, (B, 8), device=device)
    n = args.new_tokens
    outputs = {}
    with torch.inference_mode():
        def gen_hf():
            outputs["hf"] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False, pad_token_id=config.eos_token_id)
            sync()

        def gen_ours(backend):
            def run():
                outputs[backend] = ours.generate(prompt, n, temperature=0, backend=backend)
                sync()
            return run
        fns = {"hf": gen_hf, "auto": gen_ours("auto"), "eager": gen_ours("eager")}
        if not args.no_compile:
            t0 = time.perf_counter()
            gen_ours("compile")()
            first = time.perf_counter() - t0
            fns["compile"] = gen_ours("compile")
        t = interleaved_medians(fns, args.repeats)
        default = f"default (auto: {ours.choose_backend(batch_size=B)})"
        labels = {"auto": default, "eager": 'backend="eager"', "compile": 'backend="compile"'}
        for backend in [b for b in ("auto", "eager", "compile") if b in t]:
            note = f"   (first call, compiling: {first:.1f} s)" if backend == "compile" else ""
            print(f"greedy generate B={B} new={n}, {labels[backend]:<24}: ours {B * n / t[backend]:6.0f} tok/s   "
                  f"transformers {B * n / t['hf']:6.0f} tok/s   ratio {t['hf'] / t[backend]:5.2f}x   same tokens: "
                  f"{torch.equal(outputs[backend], outputs['hf'])}{note}")


if __name__ == "__main__":
    main()
