"""Scoring text with a model: how well it predicts a token stream or a file of stories (mean loss in nats/token,
perplexity, bits per UTF-8 byte), and how likely it finds each of several continuations of a context (summed
log-probability, lm-evaluation-harness' multiple-choice `acc`, and the same per UTF-8 byte).

    loss, n = evaluate_loss(model, tokens, batch_size=8, block_size=256)        # train.py's validation loss
    r = evaluate_file(model, tokenizer, "stories.txt", 8, 512, "cpu")           # inference.py --eval_file
    nats = continuation_logprobs(model, tokenizer, [("Tom was sad.", " He cried.")])   # evaluate.py's cloze, probes

Bits per byte divide by the text's UTF-8 bytes rather than by tokens, so models with different vocabularies
compare fairly.
"""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from tinylm.data.cache import iter_eval_batches
from tinylm.data.corpus import non_empty, read_stories
from tinylm.data.pieces import encode_batches


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
    """Loss, perplexity and bits per byte of a story file (see evaluate_stories)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no eval file at {path}")
    stories = list(non_empty(read_stories([path]), {}))
    if not stories:
        raise ValueError(f"{path} holds no stories")
    return evaluate_stories(model, tokenizer, stories, batch_size, block_size, device)


def evaluate_stories(model, tokenizer, stories: list[str], batch_size: int, block_size: int, device):
    """Loss, perplexity and bits per byte of stories, each followed by end-of-text, in block_size pieces (lowered
    to the model's context)."""
    tokens = np.concatenate(list(encode_batches(tokenizer, stories)))
    loss, n = evaluate_loss(model, tokens, batch_size, min(block_size, model.config.max_position_embeddings), None,
                            device)
    return loss_numbers(loss * n, n, stories)


def loss_numbers(nats: float, n_tokens: int, stories: list[str]) -> dict:
    """Mean loss, perplexity and bits per byte from the summed loss in nats over n_tokens predicted tokens of the
    stories; bits per byte divide by the stories' UTF-8 bytes, so models with different tokenizers compare
    fairly."""
    n_bytes = sum(len(s.encode("utf-8")) for s in stories)
    loss = nats / n_tokens if n_tokens else 0.0
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nats / math.log(2) / n_bytes,
            "tokens": n_tokens, "stories": len(stories), "bytes": n_bytes}


@torch.inference_mode()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                          device="cpu") -> list[tuple[float, int]]:
    """(summed log-probability in nats, UTF-8 bytes) of each continuation given its context, for (context,
    continuation) pairs. As in lm-evaluation-harness, the context and the continuation are tokenized apart, so a
    continuation carries its own leading space; an empty context starts after end-of-text. A context longer than
    the model's window keeps its last tokens. Pairs are scored in batches of similar length, and the LM head runs
    only where a continuation token is predicted."""
    limit = model.config.max_position_embeddings
    requests = []  # (token ids, continuation length)
    for context, continuation in pairs:
        ctx = tokenizer.encode(context) or [tokenizer.eos_token_id]
        cont = tokenizer.encode(continuation)
        if not cont:
            raise ValueError(f"the continuation {continuation!r} is empty")
        if len(cont) >= limit:
            raise ValueError(f"the continuation {continuation[:40]!r}... is {len(cont)} tokens, as long as the "
                             f"model's context of {limit}")
        requests.append(((ctx + cont)[-(limit + 1):], len(cont)))  # the last target needs no input after it
    was_training = model.training
    model.eval()
    results = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        T = max(len(requests[i][0]) for i in rows) - 1
        x = torch.full((len(rows), T), tokenizer.eos_token_id, dtype=torch.long)  # right-padded: causal, harmless
        for r, i in enumerate(rows):
            ids = requests[i][0]
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        h = model.hidden_states(x.to(device))  # (B, T, C)
        picks, targets = [], []
        for r, i in enumerate(rows):
            ids, n = requests[i]
            first = len(ids) - 1 - n  # the input position that predicts the continuation's first token
            picks.append(h[r, first:first + n])  # (n, C)
            targets.extend(ids[-n:])
        logits = F.linear(torch.cat(picks), model.wte.weight).float()  # (sum of n, vocab)
        logp = logits.log_softmax(-1).gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0]
        offset = 0
        for i in rows:
            n = requests[i][1]
            results[i] = float(logp[offset:offset + n].sum())
            offset += n
    model.train(was_training)
    return [(nats, len(continuation.encode("utf-8"))) for nats, (_, continuation) in zip(results, pairs)]


@torch.inference_mode()
def token_view(model, tokenizer, text: str, top: int = 5, device="cpu") -> list[dict]:
    """Each token of a text (after an end-of-text start) with its loss in nats and the model's `top` most likely
    tokens at that point: [{"token": " cat", "id": 3797, "loss": 2.1, "top": [[" dog", 0.31], ...]}, ...]. A text
    longer than the model's context is cut to it."""
    ids = ([tokenizer.eos_token_id] + tokenizer.encode(text))[:model.config.max_position_embeddings + 1]
    was_training = model.training
    model.eval()
    logits = model(torch.tensor([ids[:-1]], device=device))[0][0].float()  # (T, vocab)
    model.train(was_training)
    logp = logits.log_softmax(-1)
    best = logp.topk(top, dim=-1)
    view = []
    for t, token in enumerate(ids[1:]):
        candidates = [[tokenizer.decode([i]), round(math.exp(p), 4)]
                      for p, i in zip(best.values[t].tolist(), best.indices[t].tolist())]
        view.append({"token": tokenizer.decode([token]), "id": token, "loss": -float(logp[t, token]),
                     "top": candidates})
    return view
