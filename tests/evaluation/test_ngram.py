"""ngram.py: interpolated Kneser-Ney gives the probabilities worked out by hand, and every history's sum to one."""

import math
import random

import pytest

from tinylm.evaluation.ngram import NGram, continuation_logprobs, stream_logprob


def test_kneser_ney_by_hand():
    # a b a b a c as 0 1 0 1 0 2, bigrams: (0,1) twice, (1,0) twice, (0,2) once; V = 3
    lm = NGram.fit([0, 1, 0, 1, 0, 2], order=2, vocab_size=3)
    assert lm.discounts == [1.0, pytest.approx(0.2)]  # n1 / (n1 + 2 n2): unigram continuation counts 1, 1, 1
    # unigrams: each token follows one distinct token, so (max(1 - 1, 0) + 1 * 3 / 3) / 3 = 1/3
    assert [math.exp(lm.logprob((), w)) for w in range(3)] == pytest.approx([1 / 3] * 3)
    # after 0: c(0 1) = 2, c(0 2) = 1, two distinct followers: (max(c - 0.2, 0) + 0.2 * 2 * 1/3) / 3
    assert [math.exp(lm.logprob((0,), w)) for w in range(3)] == pytest.approx(
        [(0.4 / 3) / 3, (1.8 + 0.4 / 3) / 3, (0.8 + 0.4 / 3) / 3])
    assert math.exp(lm.logprob((2,), 0)) == pytest.approx(1 / 3)  # a history never seen backs off whole


def test_every_history_sums_to_one_and_streams_score_each_token_once():
    rng = random.Random(0)
    tokens = [rng.randrange(30) for _ in range(5000)]
    lm = NGram.fit(tokens, order=4, vocab_size=40)
    for history in [tuple(tokens[10:13]), (1, 2), (39, 39, 39), ()]:
        assert sum(math.exp(lm.logprob(history, w)) for w in range(40)) == pytest.approx(1.0)
    nats, n = stream_logprob(lm, tokens[:100])
    assert n == 99 and nats == pytest.approx(sum(lm.logprob(tuple(tokens[max(0, i - 3):i]), tokens[i])
                                                  for i in range(1, 100)))


def test_continuations_are_scored_after_their_context(full):
    lm = NGram.fit(full.encode("Tom had a red ball. Tom had a blue kite. " * 20), order=3)
    (red, red_bytes), (green, _) = continuation_logprobs(lm, full, [("Tom had a", " red ball"), ("Tom had a", " green ball")])
    assert red_bytes == len(" red ball") and red > green
