"""Data loading and training at full TinyStories scale, on synthetic corpora from bench/make_corpus.py.

    python bench/bench_scale.py --sizes 60MB,600MB,2GB --work /tmp/tinylm-scale

For each size: a fresh `dataload.py --vocab_size 10000` build (wall time, MB/s of text, peak resident memory of
the whole process tree, disk of the caches, and the trimmed vocabulary's coverage: the share of GPT-Neo tokens
that keep their token, in the text it was counted on and in the validation split it never saw). Then train.py on
the largest cache and on the smallest, taking turns: start-up (launch to the first training step, on a ready
cache) and tokens/s. Corpora are generated once into --work and reused. Peak memory is sampled from /proc (Linux
only) every 0.2 s, so the sampler takes little of the 2 cores it measures.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
from make_corpus import parse_size, seed_stories, write_corpus  # noqa: E402

SEED_TEXT = os.path.join(ROOT, "..", "shared", "data", "tinystories_train_*.txt")
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root_pid: int) -> int:
    """Resident bytes of a process and all its descendants (found through /proc/PID/task/TID/children)."""
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except (OSError, ValueError, IndexError):
            pass  # the process ended meanwhile
    return total


def run_measured(cmd: list[str], on_line=None) -> dict:
    """Run cmd; wall seconds, peak tree RSS, stdout, and the time each stdout line arrived."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak, lines = [0], []

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append((time.time() - t0, line.rstrip("\n")))
    proc.wait()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n" + "\n".join(line for _, line in lines[-30:]))
    return {"seconds": time.time() - t0, "peak_rss": peak[0], "lines": lines}


def held_out_coverage(corpus: str, cache: str) -> float:
    """Share of the validation split's GPT-Neo tokens that the trimmed vocabulary (counted on train text) keeps."""
    from tinylm.data.corpus import split_sources
    from tinylm.data.cache import count_tokens, coverage
    from tinylm.data.tokenizer import gpt_neo_tokenizer, tokenizer_from_file

    full = gpt_neo_tokenizer()
    counts = count_tokens(full, split_sources(corpus, None, 0.01)["val"][1]({}))
    return coverage(full, tokenizer_from_file(os.path.join(cache, "tokenizer.json")), counts)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="60MB,600MB,2GB")
    p.add_argument("--work", default="/tmp/tinylm-scale", help="corpora, caches and runs go here")
    p.add_argument("--vocab_size", type=int, default=10000)
    p.add_argument("--seed_text", default=SEED_TEXT)
    p.add_argument("--train_steps", type=int, default=100, help="steps per train.py run (0: skip training)")
    p.add_argument("--repeats", type=int, default=2, help="train.py runs per corpus, taking turns")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    sizes = [(s, parse_size(s)) for s in args.sizes.split(",")]
    stories = None
    print(f"{os.cpu_count()} cores; vocabulary {args.vocab_size} trimmed")
    print("corpus     MB      build s   MB/s   peak RSS MB   cache MB   tokens        coverage counted / held out")
    caches = {}
    for name, size in sizes:
        corpus = os.path.join(args.work, f"ts-{name}.txt")
        if not os.path.exists(corpus):
            stories = stories or seed_stories(args.seed_text)
            t0 = time.time()
            write_corpus(corpus, size, stories, log=lambda *a: None)
            print(f"  (generated {corpus} in {time.time() - t0:.0f} s)")
        cache = os.path.join(args.work, f"cache-{name}")
        shutil.rmtree(cache, ignore_errors=True)
        r = run_measured([sys.executable, "dataload.py", "--data", corpus, "--vocab_size", str(args.vocab_size),
                          "--out", cache])
        text = [line for _, line in r["lines"]]
        report = json.loads("\n".join(text[text.index("{"):]))  # dataload.py ends with its report as JSON
        mb = os.path.getsize(corpus) / 1e6
        caches[name] = (corpus, cache, report)
        print(f"{name:<8} {mb:7.0f}  {r['seconds']:9.1f}  {mb / r['seconds']:5.1f}  {r['peak_rss'] / 1e6:11.0f}  "
              f"{folder_bytes(cache) / 1e6:9.0f}   {report['train_tokens'] + report['val_tokens']:>12,}  "
              f"{report['coverage']:8.3%} / {held_out_coverage(corpus, cache):.3%}", flush=True)
    if args.train_steps <= 0 or len(sizes) < 2:
        return
    print(f"\ntrain.py, config/quickstart.config at vocabulary {args.vocab_size}, {args.train_steps} steps, "
          "ready cache")
    results = {name: [] for name in (sizes[0][0], sizes[-1][0])}
    for rep in range(args.repeats):
        for name in list(results)[::1 if rep % 2 == 0 else -1]:  # each goes first in turn
            corpus, cache, _ = caches[name]
            out = os.path.join(args.work, f"run-{name}")
            r = run_measured([sys.executable, "train.py", "--config", "config/quickstart.config",
                              "--set", f"data.dataset={corpus}", "--set", f"data.cache_dir={cache}",
                              "--set", "data.val_fraction=0.01",  # dataload.py's default, so the caches are reused
                              "--set", f"model.vocab_size={args.vocab_size}", "--set", "train.max_minutes=none",
                              "--set", f"train.max_steps={args.train_steps}", "--set", f"train.out_dir={out}",
                              "--set", f"train.eval_interval={args.train_steps}", "--overwrite"])
            if not any(line.startswith("train: reusing") for _, line in r["lines"]):
                sys.exit(f"train.py rebuilt the cache in {cache} instead of reusing it; start-up would not be measured")
            started = next(t for t, line in r["lines"] if line.startswith("# ") and "parameters" in line)
            rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
            tok_s = float(np.median([row["tok_s"] for row in rows if "tok_s" in row][5:]))
            results[name].append((started, tok_s))
            print(f"  {name:<8} start-up {started:5.1f} s   {tok_s:8,.0f} tokens/s   peak RSS "
                  f"{r['peak_rss'] / 1e6:,.0f} MB", flush=True)
    small, large = (np.array(results[name]) for name in results)
    ratio = large[:, 1] / small[:, 1]
    print(f"range over {args.repeats} runs: start-up {large[:, 0].min():.1f}-{large[:, 0].max():.1f} s on "
          f"{sizes[-1][0]} vs {small[:, 0].min():.1f}-{small[:, 0].max():.1f} s on {sizes[0][0]}; tokens/s ratio "
          f"{sizes[-1][0]}/{sizes[0][0]} {ratio.min():.3f}-{ratio.max():.3f}")


if __name__ == "__main__":
    main()
