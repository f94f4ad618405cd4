"""A counting baseline: an interpolated Kneser-Ney n-gram model over GPT-Neo tokens (Chen & Goodman 1998), what
evaluate.py --baseline ngram scores beside the transformers, so the report shows what they know beyond counting.

    lm = NGram.fit(token_ids, order=4)           # token_ids: stories joined, each ending with <|endoftext|>
    lm.logprob((464, 3797, 373), 257)            # ln P(token | the tokens before it), the last order - 1 used

P(w | h) = max(c(h w) - D, 0) / c(h) + D * N1+(h .) / c(h) * P(w | h without its first token), with raw counts at
the highest order and continuation counts (how many distinct tokens precede) below it, one discount
D = n1 / (n1 + 2 n2) per order, and the uniform 1/V at the bottom. A history never seen backs off whole.
"""

import math
from collections import Counter


class NGram:
    def __init__(self, counts: list[dict], totals: list[dict], followers: list[dict], discounts: list[float],
                 vocab_size: int, order: int):
        # per order k (index k - 1): counts of k-grams (raw at the top order, continuation counts below), and per
        # history of k - 1 tokens the sum of those counts and how many distinct tokens follow it
        self.counts, self.totals, self.followers = counts, totals, followers
        self.discounts, self.vocab_size, self.order = discounts, vocab_size, order

    @classmethod
    def fit(cls, tokens, order: int = 4, vocab_size: int = 50257) -> "NGram":
        tokens = [int(t) for t in tokens]
        raw = Counter(tuple(tokens[i:i + order]) for i in range(len(tokens) - order + 1))
        counts = [None] * order
        counts[order - 1] = raw
        for k in range(order - 1, 0, -1):  # continuation count of a k-gram: distinct tokens seen before it
            counts[k - 1] = Counter(gram[1:] for gram in counts[k])
        totals, followers, discounts = [], [], []
        for table in counts:
            total, follow = Counter(), Counter()
            for gram, c in table.items():
                total[gram[:-1]] += c
                follow[gram[:-1]] += 1
            of = Counter(table.values())
            totals.append(total)
            followers.append(follow)
            discounts.append(of[1] / (of[1] + 2 * of[2]) if of[1] else 0.5)
        return cls(counts, totals, followers, discounts, vocab_size, order)

    def logprob(self, history: tuple, token: int) -> float:
        """ln P(token | history); only the last order - 1 tokens of history count."""
        p = 1.0 / self.vocab_size
        history = tuple(history[-(self.order - 1):]) if self.order > 1 else ()
        for k in range(1, self.order + 1):
            if k - 1 > len(history):
                break
            context = history[len(history) - (k - 1):] if k > 1 else ()
            total = self.totals[k - 1].get(context)
            if not total:
                continue  # a history never seen: this order adds nothing
            d = self.discounts[k - 1]
            c = self.counts[k - 1].get(context + (token,), 0)
            p = (max(c - d, 0) + d * self.followers[k - 1][context] * p) / total
        return math.log(p)


def stream_logprob(lm: NGram, tokens) -> tuple[float, int]:
    """(summed ln-probability, count) of tokens[1:], each given the tokens before it: evaluate_loss's targets."""
    tokens = [int(t) for t in tokens]
    return sum(lm.logprob(tuple(tokens[max(0, i - lm.order + 1):i]), tokens[i]) for i in range(1, len(tokens))), \
        len(tokens) - 1


def continuation_logprobs(lm: NGram, tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """scoring.continuation_logprobs for the n-gram model: (nats, UTF-8 bytes) of each continuation."""
    results = []
    for context, continuation in pairs:
        ctx = tokenizer.encode(context) or [tokenizer.eos_token_id]
        ids = ctx + tokenizer.encode(continuation)
        nats = sum(lm.logprob(tuple(ids[max(0, i - lm.order + 1):i]), ids[i]) for i in range(len(ctx), len(ids)))
        results.append((nats, len(continuation.encode("utf-8"))))
    return results
