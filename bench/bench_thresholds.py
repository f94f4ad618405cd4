"""The size rules of the C kernels, re-measured on this machine: where attention.c and lmhead.c run instead of
PyTorch in fp32 training on CPU, and whether the rule picks the faster side at each size.

    python bench/bench_thresholds.py [--repeats 5]

- attention.c runs heads up to model.NATIVE_ATTENTION_MAX_HEAD_DIM wide: a 2-layer model (width 128, batch 8 x
  512), forward + backward, with attention.c and with PyTorch's attention, at head sizes 4, 8, 16 and 32.
- lmhead.c runs widths that are multiples of 64 up to lm_head.NATIVE_LM_HEAD_MAX_WIDTH: the LM head and loss of
  4096 tokens, forward + backward, by lmhead.c and by the blocked PyTorch path, at widths 64-256 and vocabularies
  50257 (the released models) and 4000 (the recipes).

Each line: the two sides' median milliseconds (taking turns), C's speed-up, what the rule picks (the size rule and
native.faster_here, the build's: OpenMP, and 16-float vectors for lmhead.c), and "ok" where that is the faster side
or within 5% of it. The header names the CPU, its flags and how each file was built. To see another build on this
machine: CC=clang, TINYLM_MARCH=x86-64-v3; to keep PyTorch to AVX2 as well, as on an AVX2 laptop:
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as model_module  # noqa: E402
from bench_model import interleaved_medians  # noqa: E402
from model import GPTNeo, GPTNeoConfig  # noqa: E402
from tinylm.devices import cpu_description  # noqa: E402
from tinylm.kernels import native  # noqa: E402
from tinylm.modeling import lm_head  # noqa: E402


def verdict(native_ms: float, torch_ms: float, rule_picks_native: bool) -> str:
    faster_is_native = native_ms < torch_ms
    picked, other = (native_ms, torch_ms) if rule_picks_native else (torch_ms, native_ms)
    ok = rule_picks_native == faster_is_native or picked <= 1.05 * other
    return f"rule: {'C' if rule_picks_native else 'PyTorch'}  {'ok' if ok else 'WRONG SIDE'}"


def c_against_pytorch(module, limit_name: str, run, repeats: int) -> dict:
    """Median seconds of run() with module.LIMIT_NAME lifted (the C kernel runs) and at 0 (PyTorch runs), taking
    turns; the limit is put back afterwards."""
    rule = getattr(module, limit_name)

    def side(limit):
        def timed():
            setattr(module, limit_name, limit)
            run()
        return timed
    try:
        return interleaved_medians({"C": side(10 ** 6), "PyTorch": side(0)}, repeats)
    finally:
        setattr(module, limit_name, rule)


def result(t: dict, rule_picks_native: bool) -> str:
    """The two sides' times, C's speed-up and the verdict on the rule, for one line."""
    return (f"C {1000 * t['C']:7.1f} ms  PyTorch {1000 * t['PyTorch']:7.1f} ms  "
            f"speed-up {t['PyTorch'] / t['C']:4.2f}x  {verdict(t['C'], t['PyTorch'], rule_picks_native)}")


def attention_lines(repeats: int):
    rule = model_module.NATIVE_ATTENTION_MAX_HEAD_DIM
    build_wins = native.faster_here("attention", native.load_library("attention"))
    for head_dim in (4, 8, 16, 32):
        torch.manual_seed(0)
        net = GPTNeo(GPTNeoConfig(vocab_size=4000, max_position_embeddings=512, n_layer=2, n_head=128 // head_dim,
                                  n_embd=128, window_size=256))
        x = torch.randint(0, 4000, (8, 512))

        def step():
            net.zero_grad(set_to_none=True)
            net(x, x)[1].backward()
        t = c_against_pytorch(model_module, "NATIVE_ATTENTION_MAX_HEAD_DIM", step, repeats)
        print(f"attention.c  head size {head_dim:3d}: {result(t, head_dim <= rule and build_wins)}", flush=True)


def lm_head_lines(repeats: int):
    rule = lm_head.NATIVE_LM_HEAD_MAX_WIDTH
    build_wins = native.faster_here("lmhead", native.load_library("lmhead"))
    for vocab in (50257, 4000):
        for width in (64, 128, 192, 256):
            torch.manual_seed(0)
            h = torch.randn(4096, width, requires_grad=True)
            weight = (0.02 * torch.randn(vocab, width)).requires_grad_()
            targets = torch.randint(0, vocab, (4096,))

            def step():
                h.grad = weight.grad = None
                lm_head.lm_head_cross_entropy(h, weight, targets).backward()
            t = c_against_pytorch(lm_head, "NATIVE_LM_HEAD_MAX_WIDTH", step, repeats)
            print(f"lmhead.c     width {width:3d} vocab {vocab:5d}: {result(t, width <= rule and build_wins)}",
                  flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"{cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; rules: attention.c "
          f"up to head size {model_module.NATIVE_ATTENTION_MAX_HEAD_DIM}, lmhead.c up to width "
          f"{lm_head.NATIVE_LM_HEAD_MAX_WIDTH}", flush=True)
    for name in ("attention", "lmhead"):
        library = native.load_library(name)
        vectors = f", {native.vector_floats(library)}-float vectors" if name == "lmhead" else ""
        print(f"{name}.c built with {' '.join(library.tinylm_build)}{vectors}: "
              f"{'runs' if native.faster_here(name, library) else 'does not run'} in training here", flush=True)
    attention_lines(args.repeats)
    lm_head_lines(args.repeats)


if __name__ == "__main__":
    main()
