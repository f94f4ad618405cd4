"""scoring.py: the summed log-probability of a continuation equals a direct computation with transformers."""

import math

import pytest
import torch

from helpers import small_gpt_neo
from model import GPTNeo
from tinylm.evaluation.scoring import continuation_logprobs


def test_continuation_logprobs_match_transformers_summed_over_the_continuation(tmp_path, full):
    hf = small_gpt_neo(context=40, window=7)
    hf.save_pretrained(tmp_path)
    ours = GPTNeo.from_pretrained(str(tmp_path))
    long_context = "Once upon a time there was a girl named Lily who loved to play in the big green park. " * 3
    pairs = [("Tom had a red ball.", " He threw it to Sue."), ("Lily said,", " \"Hello!\""), ("", " Once upon a time"),
             (long_context, " She was happy."), ("The cat", " sat"), ("The cat", " slept on the warm mat all day.")]

    def direct(context, continuation):  # the continuation's tokens after the context's, from transformers' logits
        ctx, cont = full.encode(context) or [full.eos_token_id], full.encode(continuation)
        ids = (ctx + cont)[-41:]  # a context longer than the model's 40 positions keeps its last tokens
        with torch.no_grad():
            logp = hf(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
        return sum(logp[len(ids) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont))
    expected = [direct(*pair) for pair in pairs]
    assert len(full.encode(long_context)) > 40
    for batch_size in (1, 4):  # one at a time, and right-padded batches of mixed lengths
        scores = continuation_logprobs(ours, full, pairs, batch_size=batch_size)
        assert [size for _, size in scores] == [len(c.encode()) for _, c in pairs]
        assert [nats for nats, _ in scores] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert all(math.isfinite(e) and e < 0 for e in expected)
    with pytest.raises(ValueError, match="is empty"):
        continuation_logprobs(ours, full, [("Tom", "")])
