"""Sample stories from a TinyLM checkpoint or Hugging Face GPT-Neo weights.

    python inference.py                                   # best/ of the newest run under out/, else TinyStories-1M
    python inference.py --model roneneldan/TinyStories-1M --prompt "Once upon a time" --temperature 0
    python inference.py --model out/tiny_lm_1M/best --max_new_tokens 200 --temperature 0.8 --top_k 50
    python inference.py --serve [--model A --model B] [--port 8000]   # the story playground in a browser
"""

import argparse
import contextlib
import errno
import os
import signal
import sys
import time

import torch

from tinylm.checkpoint import finished_models, load_model_and_tokenizer, newest_model, run_folder_model
from tinylm.data.tokenizer import text_stream
from tinylm.devices import pick_device
from tinylm.evaluation.scoring import evaluate_file
from tinylm.hub import resolve_pretrained
from tinylm.modeling.generation import DECODE_BACKENDS
from tinylm.wording import plural

DEFAULT_HUB_MODEL = "roneneldan/TinyStories-1M"
CHECKPOINT_ROOT = "out"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample stories from a TinyLM or Hugging Face GPT-Neo model.")
    p.add_argument("--model", action="append", default=None, help="checkpoint folder or hub id (default: best/ of "
                   f"the newest finished run under {CHECKPOINT_ROOT}/, else {DEFAULT_HUB_MODEL}); --serve takes several")
    p.add_argument("--prompt", default="Once upon a time", help="text the story starts with")
    p.add_argument("--max_new_tokens", type=int, default=200, help="at most; lowered to fit the model's context")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample from the k most likely tokens (0: no limit)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set holding this mass")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument("--no_stream", action="store_true", help="print each story when it is finished")
    p.add_argument("--backend", choices=DECODE_BACKENDS, default="auto", help="the per-token step: native (C, "
                   "decode.c: the fastest on CPU, fp32), compile (torch.compile), eager (PyTorch); auto (default): "
                   "native where it runs, else eager. All give the same tokens")
    p.add_argument("--compile", action="store_true", help="--backend compile: faster on GPUs, after a compile of "
                   "ten seconds or more (on CPU it needs a C++ compiler)")
    p.add_argument("--native", action="store_true", help="--backend native, and an error where it cannot run")
    p.add_argument("--eval_file", default=None, help="instead of sampling, score this text file (stories separated "
                   "by <|endoftext|>): loss in nats/token, perplexity and bits per UTF-8 byte")
    p.add_argument("--block_size", type=int, default=None, help="context of each scored piece with --eval_file "
                   "(default: the model's context, at most 512; train.py's data.block_size gives the same number as "
                   "its validation loss)")
    p.add_argument("--batch_size", type=int, default=8, help="pieces scored at once with --eval_file")
    p.add_argument("--serve", action="store_true", help="start the story playground, a web page on --host:--port: "
                   f"every --model and the finished runs under {CHECKPOINT_ROOT}/")
    p.add_argument("--host", default="127.0.0.1", help="--serve's address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="--serve's port (0: a free one)")
    p.add_argument("--max_streams", type=int, default=4, help="--serve: stories written at once; more are told the "
                   "server is busy (HTTP 429)")
    p.add_argument("--neuron_stories", default=None, metavar="FILE", help="--serve: held-out stories (a .txt, "
                   ".jsonl or .parquet file) in which the Inside view finds the contexts that excite each MLP neuron "
                   "most; computed once per model on first use (a few seconds), then kept")
    return p.parse_args(argv)


def resolve_model(name: str | None) -> str:
    """--model as given; without it best/ of the newest run under out/ (saying which), else TinyStories-1M."""
    if name is not None:
        return name
    local, why = newest_model(CHECKPOINT_ROOT)
    if local is not None:
        print(f"# --model not given: sampling from {local}, {why} under {CHECKPOINT_ROOT}/", file=sys.stderr)
        return local
    try:
        return resolve_pretrained(DEFAULT_HUB_MODEL)
    except OSError:
        raise ValueError(f"no checkpoint under {CHECKPOINT_ROOT}/ and {DEFAULT_HUB_MODEL} cannot be fetched (offline?): "
                         "train a model first, which offline takes a text file of stories (python train.py --config "
                         "config/quickstart.config --set data.dataset=path/to/stories.txt), or pass --model "
                         "PATH_OR_HUB_ID") from None


def encode_prompt(tokenizer, prompt: str, device):
    ids = tokenizer.encode(prompt) or [tokenizer.eos_token_id]  # an empty prompt starts a fresh story
    return torch.tensor([ids], dtype=torch.long, device=device)


def stream_story(model, tokenizer, idx, args, out=sys.stdout, step=None, backend="auto") -> tuple[list[int], list]:
    """Print the prompt and then the story as its tokens arrive; return all token ids and the time each new one
    arrived. `step`, `backend`: see GPTNeo.generate."""
    ids = idx[0].tolist()
    prompt = tokenizer.decode(ids, skip_special_tokens=True)
    out.write(prompt)
    new_text, written = text_stream(tokenizer, ids), len(prompt)
    top_k = args.top_k or None
    arrived = [time.perf_counter()]
    for token in model.generate_stream(idx, args.max_new_tokens, args.temperature, top_k, args.top_p,
                                       eos_token_id=tokenizer.eos_token_id, step=step, backend=backend):
        arrived.append(time.perf_counter())
        ids.append(token.item())
        if not args.no_stream:
            text = new_text(ids[-1])
            out.write(text)
            out.flush()
            written += len(text)
    out.write(tokenizer.decode(ids, skip_special_tokens=True)[written:] + "\n")
    out.flush()
    return ids, arrived


def speed_line(arrived: list, compiled: bool) -> str:
    """'# N tokens, R tokens/s' from the arrival times (arrived[0]: the start). A compiled step compiles on its
    first call, the second token: that time is reported apart and not counted in the rate."""
    n = len(arrived) - 1
    if n == 0:
        return "# 0 tokens"
    if not compiled or n < 3:
        return f"# {plural(n, 'token')}, {n / (arrived[-1] - arrived[0]):.0f} tokens/s"
    rate = (n - 2) / (arrived[-1] - arrived[2])
    return f"# {plural(n, 'token')}, {rate:.0f} tokens/s after the first step, which compiled in {arrived[2] - arrived[1]:.1f} s"


def fit_to_context(prompt_tokens: int, max_new_tokens: int, context: int) -> int:
    """max_new_tokens lowered (with a note) so the story fits the model's context; a prompt that leaves no room is
    an error that states the limit."""
    if prompt_tokens >= context:
        raise ValueError(f"the prompt is {plural(prompt_tokens, 'token')} and the model's context is {context} "
                         f"(max_position_embeddings): shorten the prompt to at most {context - 1} tokens")
    if max_new_tokens > context - prompt_tokens:
        print(f"# note: --max_new_tokens {max_new_tokens} lowered to {context - prompt_tokens}: the prompt is "
              f"{plural(prompt_tokens, 'token')} and the model's context {context}", file=sys.stderr)
    return min(max_new_tokens, context - prompt_tokens)


def check_args(args):
    """Every flag a number can get wrong, each named in its error, before a model is loaded."""
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top_k must be >= 0 (0: no limit), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1] (1: no limit), got {args.top_p}")
    for flag, value, least in (("--max_new_tokens", args.max_new_tokens, 0), ("--num_samples", args.num_samples, 1),
                               ("--block_size", args.block_size, 1), ("--batch_size", args.batch_size, 1)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if args.native and args.compile:
        raise ValueError("--native and --compile are two backends; pass one (or --backend)")
    if args.model and len(args.model) > 1 and not args.serve:
        raise ValueError(f"--model is given {len(args.model)} times; only --serve offers several models, sampling "
                         "takes one")
    if args.serve and not 0 <= args.port < 65536:
        raise ValueError(f"--port must be from 0 (a free one) to 65535, got {args.port}")
    if args.max_streams < 1:
        raise ValueError(f"--max_streams must be >= 1, got {args.max_streams}")
    if args.neuron_stories is not None and not os.path.isfile(args.neuron_stories):
        raise FileNotFoundError(f"--neuron_stories {args.neuron_stories}: no such file; pass held-out stories "
                                "separated by <|endoftext|> lines (.txt), or .jsonl/.parquet rows with a text field")
    if args.eval_file is not None and not os.path.isfile(args.eval_file):
        raise FileNotFoundError(f"--eval_file {args.eval_file}: no eval file there; pass a text file of stories "
                                "separated by <|endoftext|> lines")


def fit_block_size(block_size: int | None, context: int) -> int:
    """--block_size lowered to the model's context, a scored piece being no longer, with a note when the user
    asked for more; not given: the model's context, at most 512."""
    if block_size is None:
        return min(512, context)
    if block_size > context:
        print(f"# note: --block_size {block_size} lowered to {context}, the model's context (max_position_embeddings)",
              file=sys.stderr)
    return min(block_size, context)


def serve(args, device):
    """The story playground until Ctrl-C: every --model, then the finished runs under out/, newest first."""
    from tinylm.serving.playground import make_server

    given = [run_folder_model(m) for m in args.model or []]
    models = list(dict.fromkeys(given + finished_models(CHECKPOINT_ROOT))) or [resolve_model(None)]
    try:
        server = make_server(models, device, args.host, args.port, max_streams=args.max_streams,
                             neuron_stories=args.neuron_stories)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise ValueError(f"--host {args.host} --port {args.port} cannot be served ({e.strerror}): pass another "
                             "--port (0 picks a free one)") from None
        raise
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"# warning: --host {args.host} serves every machine that can reach port {port}: anyone there can "
              "use this playground and the models it offers", file=sys.stderr)
    print(f"# TinyLM playground: http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/ "
          f"({len(models)} model{'s' if len(models) > 1 else ''}: {', '.join(models[:3])}"
          f"{', ...' if len(models) > 3 else ''}); Ctrl-C stops it", flush=True)
    try:
        with sigterm_as_ctrl_c():
            server.serve_forever()
    except KeyboardInterrupt:
        open_streams = server.playground.stop()  # each open story gets its last event; generation threads end
        ended = f" ({plural(open_streams, 'open story')} ended)" if open_streams else ""
        print(f"# playground stopped{ended}", file=sys.stderr)
    finally:
        server.server_close()
    return 0


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (a service manager, `kill`) stops the playground as Ctrl-C does, ending open stories first."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        backend = "native" if args.native else "compile" if args.compile else args.backend
        device = pick_device(args.device)
        if args.serve:
            return serve(args, device)
        name = run_folder_model(resolve_model(args.model[0] if args.model else None))
        model, tokenizer = load_model_and_tokenizer(name, device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.eval_file is not None:
        try:
            block_size = fit_block_size(args.block_size, model.config.max_position_embeddings)
            r = evaluate_file(model, tokenizer, args.eval_file, args.batch_size, block_size, device)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"{args.eval_file}: {plural(r['tokens'], 'token')} scored ({plural(r['stories'], 'story')}, {plural(r['bytes'], 'byte')}) | "
              f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} bits/byte")
        return
    idx = encode_prompt(tokenizer, args.prompt, device)
    try:
        args.max_new_tokens = fit_to_context(idx.size(1), args.max_new_tokens, model.config.max_position_embeddings)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        backend = model.choose_backend(backend, batch_size=1)
        # built once, errors here
        step = model.per_token_step(backend, device, args.temperature == 0) if backend == "native" else None
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"error: --backend {backend}: {e}") from None
    print(f"# {name}: {model.num_params() / 1e6:.2f}M parameters on {device}, {backend} decoding", file=sys.stderr)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        ids, arrived = stream_story(model, tokenizer, idx, args, step=step, backend=backend)
        print(speed_line(arrived, compiled=backend == "compile" and i == 0), file=sys.stderr)


if __name__ == "__main__":
    main()
