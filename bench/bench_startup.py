"""What a user waits for, from process start to exit: fresh processes, TinyLM beside transformers, taking turns.

    python bench/bench_startup.py [--model out/quickstart/best] [--repeats 5]

Four kinds of process, each started anew every repeat (so nothing is warm but the OS file cache):
  import torch      `python -c "import torch"`, the floor every PyTorch program pays
  inference.py      `python inference.py --model MODEL --max_new_tokens 200`, end to end
  transformers      the 10-line transformers script that does the same (tokenizer, model, generate, print)
  generate 1M       in a new process, the first `generate()` of 300 greedy tokens on the TinyStories-1M shape
                    (random weights), timed inside the process: ours (default backend) and transformers'
Prints the median and range of each, and the ratios docs/speed.md reports.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HF_SCRIPT = """
import sys, torch
from transformers import GPTNeoForCausalLM, PreTrainedTokenizerFast
path = sys.argv[1]
tok = PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json")
model = GPTNeoForCausalLM.from_pretrained(path)
idx = tok("Once upon a time", return_tensors="pt").input_ids
out = model.generate(idx, max_new_tokens=200, do_sample=True, top_k=0, pad_token_id=tok.eos_token_id)
print(tok.decode(out[0]))
"""

GENERATE_OURS = """
import sys, time, torch
from model import GPTNeo
model = GPTNeo.from_pretrained(sys.argv[1])
idx = torch.zeros(1, 1, dtype=torch.long)
t0 = time.perf_counter()
out = model.generate(idx, 300, temperature=0)
print(time.perf_counter() - t0, out.size(1))
"""

GENERATE_HF = """
import sys, time, torch
from transformers import GPTNeoForCausalLM
model = GPTNeoForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager")
idx = torch.zeros(1, 1, dtype=torch.long)
t0 = time.perf_counter()
out = model.generate(idx, max_new_tokens=300, min_new_tokens=300, do_sample=False, pad_token_id=0)
print(time.perf_counter() - t0, out.size(1))
"""


def wall(cmd: list[str]) -> tuple[float, str]:
    """(seconds from start to exit, stdout) of a fresh process run from the repository root."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def one_1m_model(folder: str):
    """TinyStories-1M's shape with random weights, saved as a Hugging Face folder."""
    import torch

    sys.path.insert(0, ROOT)
    from tinylm.training.config import load_config
    from model import GPTNeo

    torch.manual_seed(0)
    GPTNeo(load_config(os.path.join(ROOT, "config", "tinystories_1M.config"))["model"]).save_pretrained(folder)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="out/quickstart/best", help="a trained checkpoint with tokenizer.json")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(ROOT, args.model, "tokenizer.json")):
        sys.exit(f"error: --model {args.model} has no tokenizer.json; train the quickstart first (README, Start)")
    py = sys.executable
    with tempfile.TemporaryDirectory() as folder:
        one_1m_model(folder)
        kinds = {
            "import torch": lambda: wall([py, "-c", "import torch"])[0],
            "inference.py": lambda: wall([py, "inference.py", "--model", args.model, "--max_new_tokens", "200"])[0],
            "transformers": lambda: wall([py, "-c", HF_SCRIPT, args.model])[0],
            "generate 1M ours": lambda: float(wall([py, "-c", GENERATE_OURS, folder])[1].split()[0]),
            "generate 1M transformers": lambda: float(wall([py, "-c", GENERATE_HF, folder])[1].split()[0]),
        }
        times = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind, run in kinds.items():
                times[kind].append(run())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.repeats} repeats, taking turns; seconds, median [min-max]")
    for kind, v in times.items():
        print(f"  {kind:26s} {med[kind]:6.2f} [{min(v):.2f}-{max(v):.2f}]")
    ratio = [i / t for i, t in zip(times["inference.py"], times["import torch"])]
    speedup = [h / o for h, o in zip(times["generate 1M transformers"], times["generate 1M ours"])]
    print(f"inference.py --max_new_tokens 200 / import torch: {statistics.median(ratio):.2f}x "
          f"[{min(ratio):.2f}-{max(ratio):.2f}] (target <= 1.5x)")
    print(f"transformers script / inference.py: {med['transformers'] / med['inference.py']:.2f}x")
    print(f"fresh-process generate(), 300 greedy tokens, 1M shape: ours {speedup and statistics.median(speedup):.1f}x "
          f"transformers [{min(speedup):.1f}-{max(speedup):.1f}] (target >= 8x)")


if __name__ == "__main__":
    main()
