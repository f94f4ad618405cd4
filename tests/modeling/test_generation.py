"""generation.py: KV-cache decoding equals the full forward, every per-token step gives the same tokens, and greedy
decoding and the sampling filters match transformers' generate."""

import copy
import io

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from conftest import DEVICE
from helpers import assert_logits_close, make_hf, sharpen_
from model import GPTNeo, GPTNeoConfig
from tinylm.modeling.generation import KVCache, filter_logits, sample_next_token
from tinylm.modeling.hf_weights import hf_to_tinylm_state_dict


def cache_test_model(heads: dict, length: int):
    """(config, model, idx (2, length), full-forward logits) of a 4-layer model with a window of 6."""
    config = GPTNeoConfig(vocab_size=101, max_position_embeddings=64, n_layer=4, n_head=4, n_embd=32,
                          window_size=6, **heads)
    model = sharpen_(GPTNeo(config)).eval().to(DEVICE)
    idx = torch.randint(0, 101, (2, length), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        return config, model, idx, model(idx)[0]


@pytest.mark.parametrize("heads", [dict(attention_types="local,global"), dict(local_heads=[2, 0, 4, 1]),
                                   dict(local_heads=4)])
def test_kv_cache_decoding_equals_full_forward(heads):
    config, model, idx, full = cache_test_model(heads, 40)
    with torch.no_grad():
        cache = KVCache(config, batch_size=2, max_len=40, device=DEVICE)
        # a prompt, single tokens across the window edge, a multi-token step into a warm cache, more singles
        steps = [0, 5] + list(range(6, 20)) + [27] + list(range(28, 41))
        pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in zip(steps, steps[1:])]
    assert cache.pos == 40
    for ring in (r for r in cache.local_kv if r is not None):
        assert ring.size(3) == config.window_size  # local heads never cache more than their window
    assert_logits_close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("heads", [dict(attention_types="local,global"), dict(local_heads=[2, 0, 4, 1])])
def test_decode_step_equals_full_forward(heads):
    # generate's per-token step: static shapes, positions as a tensor, not-yet-seen cache slots masked
    config, model, idx, full = cache_test_model(heads, 30)
    with torch.no_grad():
        cache = KVCache(config, batch_size=2, max_len=30, device=DEVICE)
        pieces = [model(idx[:, :3], kv_cache=cache)[0]]
        for p in range(3, 30):  # crosses the window edge at 6 and wraps the ring several times
            pieces.append(model.decode_step(idx[:, p:p + 1], torch.tensor([p], device=DEVICE), cache)[:, None])
            cache.pos += 1
    assert_logits_close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_stream_with_logits_gives_the_distribution_each_token_was_drawn_from(backend):
    # what the playground colours tokens by: the logits before temperature and filtering, at every position
    config, model, idx, _ = cache_test_model(dict(local_heads=[2, 0, 4, 1]), 4)
    prompt = idx[:1].cpu() if backend == "auto" else idx[:1]
    got = list(model.generate_stream(prompt, 20, temperature=0.7, top_k=10, output_logits=True, backend=backend,
                                     generator=torch.Generator(prompt.device).manual_seed(0)))
    tokens = torch.cat([t for t, _ in got], dim=1)
    assert torch.equal(tokens, model.generate(prompt, 20, temperature=0.7, top_k=10, backend=backend,
                                              generator=torch.Generator(prompt.device).manual_seed(0))[:, 4:])
    with torch.no_grad():
        full = model(torch.cat([prompt, tokens], dim=1))[0][:, 3:-1]  # (1, 20, vocab): the logits before each token
    assert_logits_close(torch.stack([logits for _, logits in got], dim=1), full)


def test_compiled_generation_gives_the_same_tokens():
    config = GPTNeoConfig(vocab_size=101, max_position_embeddings=64, n_layer=3, n_head=4, n_embd=32,
                          window_size=6, local_heads=[2, 4, 0])
    model = sharpen_(GPTNeo(config)).eval().to(DEVICE)
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    eager = model.generate(prompt, 30, temperature=0, backend="eager")
    assert torch.equal(model.generate(prompt, 30, temperature=0, compile=True), eager)
    # one compiled graph serves a second call of another length (the cache shapes become dynamic, not a
    # recompile per step)
    assert torch.equal(model.generate(prompt, 20, temperature=0, compile=True), eager[:, :25])
    # the compiled step is bound to this model: copies must not share it (they would run these weights)
    twin = copy.deepcopy(model)
    assert "_compiled_decode_steps" not in twin.__dict__ and torch.equal(twin.generate(prompt, 30, temperature=0), eager)
    torch.save(model, io.BytesIO())


def test_greedy_generate_matches_transformers_past_window():
    hf = make_hf("odd_small")
    ours = GPTNeo(GPTNeoConfig.from_hf_dict(hf.config.to_dict()))
    ours.load_state_dict(hf_to_tinylm_state_dict(hf.state_dict(), ours.state_dict()))
    hf.to(DEVICE), ours.to(DEVICE)
    prompt = torch.randint(1, 97, (1, 4), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, min_new_tokens=40,
                      do_sample=False, pad_token_id=0)
    out = ours.generate(prompt, 40, temperature=0)
    assert out.shape == (1, 44)
    assert torch.equal(out, ref)


def test_generate_batch_eos_and_limits():
    model = sharpen_(GPTNeo(GPTNeoConfig(vocab_size=50, max_position_embeddings=32, n_layer=2, n_head=2, n_embd=16,
                                         window_size=4))).eval().to(DEVICE)
    prompt = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    both = model.generate(prompt, 10, temperature=0)
    for row in range(2):  # batching does not change a row's greedy continuation
        assert torch.equal(model.generate(prompt[row:row + 1], 10, temperature=0)[0], both[row])
    eos = both[0, 3].item()  # row 0's first new token
    stopped = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    assert stopped[0, 3] == eos and (stopped[0, 3:] == eos).all()  # finished rows are padded with eos
    if (both[1, 3:] != eos).all():
        assert torch.equal(stopped[1], both[1])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(prompt, 30)  # 3 + 30 > 32
    with pytest.raises(ValueError) as e:  # a prompt that fills the context: no max_new_tokens fits
        model.generate(torch.zeros(1, 32, dtype=torch.long, device=DEVICE), 1)
    assert str(e.value) == ("cannot generate 1 token after a 32-token prompt: the model's context is 32 tokens "
                            "(max_position_embeddings); shorten the prompt to at most 31 tokens")
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate(prompt, 2, **bad)


def test_sampling_is_seedable_and_filters_match_transformers():
    model = GPTNeo(GPTNeoConfig(vocab_size=50, max_position_embeddings=32, n_layer=1, n_head=2, n_embd=16))
    model.eval().to(DEVICE)
    prompt = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    a = model.generate(prompt, 20, top_k=10, generator=torch.Generator(DEVICE).manual_seed(7))
    b = model.generate(prompt, 20, top_k=10, generator=torch.Generator(DEVICE).manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 20, top_k=1), model.generate(prompt, 20, temperature=0))

    logits = 3 * torch.randn(4, 1000, generator=torch.Generator().manual_seed(8))
    for top_p in (0.1, 0.5, 0.9):
        ref = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(filter_logits(logits, 1.0, None, top_p).isinf(), ref.isinf())
    assert torch.equal(filter_logits(logits, 0.7, 20, None).isinf(), TopKLogitsWarper(20)(None, logits.clone()).isinf())
    samples = sample_next_token(logits[:1].expand(2000, -1), 1.0, 5, None, torch.Generator().manual_seed(9))
    assert set(samples.flatten().tolist()) <= set(logits[0].topk(5).indices.tolist())


def test_greedy_takes_the_first_of_tied_maxima_as_argmax_does():
    # greedy picks by max's index (faster on CPU than argmax): the same token as transformers' argmax, ties included
    logits = torch.randn(64, 50257, generator=torch.Generator().manual_seed(3))
    for row in range(64):
        tied = torch.randperm(50257, generator=torch.Generator().manual_seed(row))[:1 + row % 4]
        logits[row, tied] = 9.0 + row % 2 * float("inf")  # finite ties, and ties of +inf
    logits[5, 17] = float("nan")  # argmax takes a NaN as the maximum
    greedy = sample_next_token(logits, temperature=0)
    assert greedy.shape == (64, 1) and torch.equal(greedy[:, 0], logits.argmax(dim=-1))
    assert greedy[5].item() == 17
