"""Sample stories from a TinyLM checkpoint or Hugging Face GPT-Neo weights.

    python inference.py                                   # newest checkpoint under out/, else TinyStories-1M
    python inference.py --model roneneldan/TinyStories-1M --prompt "Once upon a time" --temperature 0
    python inference.py --model out/tiny_lm_1M/best --max_new_tokens 200 --temperature 0.8 --top_k 50
"""

import argparse
import glob
import math
import os
import sys
import time

import numpy as np
import torch

from dataload import encode_batches, iter_eval_batches, load_tokenizer, non_empty, read_stories
from model import GPTNeo, check_sampling_args, resolve_pretrained
from native import native_decode_step

DEFAULT_HUB_MODEL = "roneneldan/TinyStories-1M"
CHECKPOINT_ROOT = "out"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample stories from a TinyLM or Hugging Face GPT-Neo model.")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: newest checkpoint under "
                   f"{CHECKPOINT_ROOT}/, else {DEFAULT_HUB_MODEL})")
    p.add_argument("--prompt", default="Once upon a time", help="text the story starts with")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample from the k most likely tokens (0: no limit)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set holding this mass")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    p.add_argument("--no_stream", action="store_true", help="print each story when it is finished")
    p.add_argument("--compile", action="store_true", help="torch.compile the per-token step: faster for long or "
                   "many samples, after a compile of ten seconds or more (on CPU it needs a C++ compiler)")
    p.add_argument("--native", action="store_true", help="run the per-token step in C (decode.c, built with the "
                   "system's C compiler in about a second): the fastest sampling on CPU, fp32 models only")
    p.add_argument("--eval_file", default=None, help="instead of sampling, score this text file (stories separated "
                   "by <|endoftext|>): loss in nats/token, perplexity and bits per UTF-8 byte")
    p.add_argument("--block_size", type=int, default=512, help="context of each scored piece with --eval_file "
                   "(train.py's data.block_size gives the same number as its validation loss)")
    p.add_argument("--batch_size", type=int, default=8, help="pieces scored at once with --eval_file")
    return p.parse_args(argv)


def newest_checkpoint(root: str = CHECKPOINT_ROOT) -> str | None:
    """The most recently written checkpoint folder (one holding config.json) under root."""
    configs = glob.glob(os.path.join(root, "**", "config.json"), recursive=True)
    return os.path.dirname(max(configs, key=os.path.getmtime)) if configs else None


def resolve_model(name: str | None) -> str:
    """--model as given; without it the newest local checkpoint, else the released TinyStories-1M."""
    if name is not None:
        return name
    local = newest_checkpoint()
    if local is not None:
        return local
    try:
        return resolve_pretrained(DEFAULT_HUB_MODEL)
    except OSError:
        raise SystemExit(f"no checkpoint under {CHECKPOINT_ROOT}/ and {DEFAULT_HUB_MODEL} cannot be fetched (offline?): "
                         "train a model first (python train.py --config config/tiny_lm_1M.config) or pass "
                         "--model PATH_OR_HUB_ID") from None


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def load_model_and_tokenizer(name_or_path: str, device):
    """Model and its tokenizer: the folder's tokenizer.json if it has one, else the GPT-Neo tokenizer."""
    folder = resolve_pretrained(name_or_path)  # a hub id is fetched into the local hub cache
    model = GPTNeo.from_pretrained(folder).to(device)
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}; "
                         f"put the tokenizer.json the model was trained with into {folder}")
    return model, tokenizer


@torch.no_grad()
def evaluate_loss(model, tokens, batch_size: int, block_size: int, max_tokens: int | None = None, device="cpu",
                  shard: tuple[int, int] = (0, 1)):
    """(mean next-token loss in nats, tokens scored) over a token stream, in consecutive block_size pieces.
    shard (i, n) scores only every n-th batch from the i-th: n processes share one evaluation."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (x, y) in enumerate(iter_eval_batches(tokens, batch_size, block_size, max_tokens, device)):
        if i % shard[1] == shard[0]:
            n = int((y != -100).sum())
            total += model(x, y)[1].item() * n
            count += n
    model.train(was_training)
    return (total / count if count else 0.0), count


def evaluate_file(model, tokenizer, path: str, batch_size: int, block_size: int, device):
    """Loss, perplexity and bits per byte of a story file; bits per byte divide by the stories' UTF-8 bytes, so
    models with different tokenizers compare fairly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no eval file at {path}")
    stories = list(non_empty(read_stories([path]), {}))
    if not stories:
        raise ValueError(f"{path} holds no stories")
    tokens = np.concatenate(list(encode_batches(tokenizer, stories)))
    loss, n = evaluate_loss(model, tokens, batch_size, min(block_size, model.config.max_position_embeddings), None,
                            device)
    n_bytes = sum(len(s.encode("utf-8")) for s in stories)
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss * n / math.log(2) / n_bytes,
            "tokens": n, "stories": len(stories), "bytes": n_bytes}


def encode_prompt(tokenizer, prompt: str, device):
    ids = tokenizer.encode(prompt) or [tokenizer.eos_token_id]  # an empty prompt starts a fresh story
    return torch.tensor([ids], dtype=torch.long, device=device)


def stream_story(model, tokenizer, idx, args, out=sys.stdout, step=None) -> list[int]:
    """Print the prompt and then the story as its tokens arrive; return all token ids. `step`: see GPTNeo.generate."""
    ids = idx[0].tolist()
    printed = tokenizer.decode(ids, skip_special_tokens=True)
    out.write(printed)
    top_k = args.top_k or None
    for token in model.generate_stream(idx, args.max_new_tokens, args.temperature, top_k, args.top_p,
                                       eos_token_id=tokenizer.eos_token_id, compile=args.compile, step=step):
        ids.append(token.item())
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not args.no_stream and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write(tokenizer.decode(ids, skip_special_tokens=True)[len(printed):] + "\n")
    out.flush()
    return ids


def main(argv=None):
    args = parse_args(argv)
    try:
        check_sampling_args(args.temperature, args.top_k or None, args.top_p)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise SystemExit("--max_new_tokens must be >= 0 and --num_samples >= 1")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = pick_device(args.device)
    name = resolve_model(args.model)
    try:
        model, tokenizer = load_model_and_tokenizer(name, device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.eval_file is not None:
        try:
            r = evaluate_file(model, tokenizer, args.eval_file, args.batch_size, args.block_size, device)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"{args.eval_file}: {r['tokens']:,} tokens scored ({r['stories']:,} stories, {r['bytes']:,} bytes) | "
              f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} bits/byte")
        return
    idx = encode_prompt(tokenizer, args.prompt, device)
    room = model.config.max_position_embeddings - idx.size(1)
    if args.max_new_tokens > room:
        raise SystemExit(f"--max_new_tokens {args.max_new_tokens} does not fit: the prompt has {idx.size(1)} tokens "
                         f"and the model's context is {model.config.max_position_embeddings}; use at most {room}")
    step = None
    if args.native:
        try:
            step = native_decode_step(model)
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f"error: --native: {e}") from None
    print(f"# {name}: {model.num_params() / 1e6:.2f}M parameters on {device}", file=sys.stderr)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        t0 = time.perf_counter()
        ids = stream_story(model, tokenizer, idx, args, step=step)
        n_new = len(ids) - idx.size(1)
        print(f"# {n_new} tokens, {n_new / (time.perf_counter() - t0):.0f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    main()
