"""decode.c through native.py: the same logits as GPTNeo.decode_step, the same greedy tokens as transformers."""

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoForCausalLM

from helpers import ROOT, make_hf, sharpen_
from model import GPTNeo, GPTNeoConfig
import model as model_module
from tinylm.kernels import native
from tinylm.kernels.native import load_library, native_attention, native_decode_step, native_lm_head_cross_entropy
from tinylm.modeling import lm_head
from tinylm.modeling.generation import KVCache
from tinylm.modeling.hf_weights import hf_to_tinylm_state_dict


@pytest.fixture(autouse=True, scope="module")
def c_compiler():
    try:
        load_library()
    except RuntimeError as e:  # no C compiler on this machine: the PyTorch paths still work
        pytest.skip(str(e))


def test_native_step_gives_decode_step_logits_across_window_and_ring_wraps():
    # mixed layers (2 of 4 heads local, all global, all local, 1 local), window 6, two rows
    config = GPTNeoConfig(vocab_size=101, max_position_embeddings=64, n_layer=4, n_head=4, n_embd=32,
                          window_size=6, local_heads=[2, 0, 4, 1])
    model = sharpen_(GPTNeo(config)).eval()
    idx = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_cache, cache = KVCache(config, 2, 30), KVCache(config, 2, 30)
        model.hidden_states(idx[:, :5], ref_cache)
        model.hidden_states(idx[:, :5], cache)
        step = native_decode_step(model)
        for t in range(5, 30):  # from inside the window to 4 times around the ring
            pos = torch.tensor([t])
            ref = model.decode_step(idx[:, t:t + 1], pos, ref_cache)
            got = step(idx[:, t:t + 1], pos, cache)
            ref_cache.pos += 1
            cache.pos += 1
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("shape", ["odd_small", "tinystories_1M"])
def test_native_greedy_generation_matches_transformers(shape):
    hf: GPTNeoForCausalLM = make_hf(shape)
    ours = GPTNeo(GPTNeoConfig.from_hf_dict(hf.config.to_dict()))
    ours.load_state_dict(hf_to_tinylm_state_dict(hf.state_dict(), ours.state_dict()))
    ours.eval()
    vocab = hf.config.vocab_size
    prompt = torch.randint(1, vocab, (1, 4), generator=torch.Generator().manual_seed(5))
    n = 40 if shape == "odd_small" else 270  # both past the window
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, n, temperature=0, step=native_decode_step(ours)), ref)
    assert torch.equal(ours.generate(prompt, n, temperature=0, step=native_decode_step(ours, argmax_only=True)), ref)


def steps_side_by_side(model, idx, start, steps):
    """decode.c's logits for each position from start on: the full step's beside the argmax_only step's."""
    caches = [KVCache(model.config, idx.size(0), idx.size(1)) for _ in steps]
    with torch.inference_mode():
        for cache in caches:
            model.hidden_states(idx[:, :start], cache)
        for t in range(start, idx.size(1)):
            yield [step(idx[:, t:t + 1], torch.tensor([t]), cache) for step, cache in zip(steps, caches)]
            for cache in caches:
                cache.pos += 1


def test_argmax_only_keeps_exact_every_logit_that_could_be_the_largest():
    # 1001 rows (not a multiple of 4): 10 directions, each scaled by 1 + k * 2^-22, so every logit has ~100
    # neighbours that bf16 cannot tell apart (the same bf16 row) but fp32 can; rows 1 and 2 are equal (a tie)
    config = GPTNeoConfig(vocab_size=1001, max_position_embeddings=64, n_layer=2, n_head=4, n_embd=32, window_size=8)
    model = sharpen_(GPTNeo(config)).eval()
    with torch.no_grad():
        base = torch.randn(10, 32, generator=torch.Generator().manual_seed(2))
        k = torch.arange(1001.)
        model.wte.weight.copy_(base[k.long() % 10] * (1 + k * 2.0 ** -22)[:, None])
        model.wte.weight[2] = model.wte.weight[1]
    idx = torch.randint(0, 1001, (2, 40), generator=torch.Generator().manual_seed(3))
    steps = [native_decode_step(model), native_decode_step(model, argmax_only=True)]
    for full, pruned in steps_side_by_side(model, idx, 4, steps):
        kept = torch.isfinite(pruned)
        assert torch.equal(pruned[kept], full[kept])  # the same fp32 numbers, bit for bit
        assert torch.equal(pruned.max(-1).indices, full.max(-1).indices)  # greedy's token, ties to the first
        assert 1 <= kept.sum(-1).max() < 1001 / 2  # some rows were left out: the pruning ran
        assert (full.masked_fill(kept, float("-inf")) < full.max(-1, keepdim=True).values).all()


def test_argmax_only_finds_the_fp32_maximum_where_bf16_ranks_it_second():
    # h = (1, 1, 0, ...) whatever the input (ln_f's weight 0, its bias h). With u = 2^-7, bf16's spacing at 1:
    # row 5 = (1 + 0.49u, 1 + 0.49u) rounds to (1, 1): bf16 logit 2, fp32 2 + 0.98u;
    # row 600 = (1 + 0.51u, 1 - 0.4u) rounds to (1 + u, 1 - u/2): bf16 2 + 0.5u, fp32 2 + 0.11u; row 700 = row 5
    config = GPTNeoConfig(vocab_size=1001, max_position_embeddings=16, n_layer=1, n_head=2, n_embd=32)
    model = GPTNeo(config).eval()
    u = 2.0 ** -7
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()[:2] = 1
        model.wte.weight.mul_(0.1)
        model.wte.weight[[5, 600, 700], 2:] = 0
        model.wte.weight[5, :2] = model.wte.weight[700, :2] = 1 + 0.49 * u
        model.wte.weight[600, :2] = torch.tensor([1 + 0.51 * u, 1 - 0.4 * u])
    assert model.wte.weight[:, :2].bfloat16().float().sum(-1).argmax() == 600  # bf16 alone would pick row 600
    idx = torch.randint(0, 1001, (2, 6), generator=torch.Generator().manual_seed(0))
    steps = [native_decode_step(model), native_decode_step(model, argmax_only=True)]
    for full, pruned in steps_side_by_side(model, idx, 2, steps):
        assert (full.max(-1).indices == 5).all() and (pruned.max(-1).indices == 5).all()
        assert torch.equal(pruned[:, [5, 600, 700]], full[:, [5, 600, 700]])


def test_argmax_only_gives_the_full_logits_where_wte_is_not_finite():
    config = GPTNeoConfig(vocab_size=50, max_position_embeddings=16, n_layer=1, n_head=2, n_embd=16)
    model = GPTNeo(config).eval()
    with torch.no_grad():
        model.wte.weight[7, 3] = float("inf")
    idx = torch.randint(0, 7, (1, 10), generator=torch.Generator().manual_seed(0))
    steps = [native_decode_step(model), native_decode_step(model, argmax_only=True)]
    for full, pruned in steps_side_by_side(model, idx, 2, steps):
        torch.testing.assert_close(pruned, full, rtol=0, atol=0, equal_nan=True)


def test_native_sampling_with_eos_and_a_second_call():
    config = GPTNeoConfig(vocab_size=50, max_position_embeddings=64, n_layer=2, n_head=2, n_embd=16, window_size=5)
    model = sharpen_(GPTNeo(config)).eval()
    prompt = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(0))
    step = native_decode_step(model)
    for n in (20, 12):  # one step function serves generate calls with new caches
        eager = model.generate(prompt, n, temperature=0.7, top_k=10, eos_token_id=7,
                               generator=torch.Generator().manual_seed(4))
        native = model.generate(prompt, n, temperature=0.7, top_k=10, eos_token_id=7,
                                generator=torch.Generator().manual_seed(4), step=step)
        assert torch.equal(native, eager)


def test_native_refuses_what_it_cannot_run():
    model = GPTNeo(GPTNeoConfig(vocab_size=50, max_position_embeddings=16, n_layer=1, n_head=2, n_embd=8,
                                dropout=0.1))
    with pytest.raises(ValueError, match="model.eval()"):
        native_decode_step(model)  # training mode with dropout
    with pytest.raises(ValueError, match="fp32 models on CPU"):
        native_decode_step(model.eval().double())


def test_the_compiled_library_is_cached_per_machine(tmp_path):
    # a compiler wrapper that logs every compile: a second process must not compile, two processes at once both
    # work, a damaged file is built again, and an unwritable cache falls back to a temporary folder
    import glob
    import os
    import shutil
    import subprocess
    import sys
    log, wrapper, cache = tmp_path / "compiles.log", tmp_path / "cc", tmp_path / "cache"
    real = shutil.which(os.environ.get("CC", "")) or shutil.which("cc") or shutil.which("gcc")
    wrapper.write_text(f'#!/bin/sh\ncase "$1" in --version) ;; *) echo compile >> {log} ;; esac\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    root = ROOT
    env = {**os.environ, "CC": str(wrapper), "TINYLM_CACHE": str(cache)}
    program = ["-c", "from tinylm.kernels import native; native.load_library(); print('ok')"]

    def start():
        return subprocess.Popen([sys.executable, *program], cwd=root, env=env, stdout=subprocess.PIPE, text=True)

    def compiles():
        return len(log.read_text().splitlines()) if log.exists() else 0
    both = [start(), start()]  # an empty cache, two processes at once
    assert [p.communicate(timeout=120)[0] for p in both] == ["ok\n", "ok\n"]
    libraries = glob.glob(str(cache / "decode-*.so"))
    assert len(libraries) == 1 and os.listdir(cache) == [os.path.basename(libraries[0])]  # no temporary left
    before = compiles()
    assert start().communicate(timeout=120)[0] == "ok\n" and compiles() == before  # cached: no compile
    with open(libraries[0], "r+b") as f:  # damaged: cut short
        f.truncate(100)
    assert start().communicate(timeout=120)[0] == "ok\n" and compiles() > before
    assert os.path.getsize(libraries[0]) > 100
    (tmp_path / "a_file").write_text("not a folder")
    env["TINYLM_CACHE"] = str(tmp_path / "a_file")  # a cache that cannot be made: built in a temporary folder
    assert start().communicate(timeout=120)[0] == "ok\n"


def sdpa_attention(q, k, v, window):
    i = torch.arange(q.size(2))
    sees = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sees, scale=1.0)


@pytest.mark.parametrize("B, nh, T, hd, window", [(2, 3, 37, 4, 0), (2, 3, 37, 4, 8), (1, 2, 70, 24, 16),
                                                   (2, 1, 50, 7, 100), (1, 2, 9, 64, 1)])
def test_native_attention_gives_sdpa_outputs_and_gradients(B, nh, T, hd, window):
    gen = torch.Generator().manual_seed(T + hd)
    q, k, v = (torch.randn(B, nh, T, hd, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(B, nh, T, hd, generator=gen)
    ours = native_attention(q, k, v, window)
    ref = sdpa_attention(q.double(), k.double(), v.double(), window)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.double())
    for got, want in zip(torch.autograd.grad(ours, (q, k, v), grad), ref_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item()))


def model_loss_and_grads(model, idx):
    """[the loss of predicting idx from itself, then every parameter's gradient]"""
    model.zero_grad()
    loss = model(idx, idx)[1]
    loss.backward()
    return [loss] + [p.grad.clone() for p in model.parameters()]


def test_a_model_trains_the_same_with_native_attention_and_without(monkeypatch):
    # every layer kind: global, local (window 5 of 24 tokens), and both in one layer; head size 4. Whatever this
    # build's speed (faster_here), the C path is taken: the results are what this checks
    monkeypatch.setattr(native, "faster_here", lambda name, library: True)
    config = GPTNeoConfig(vocab_size=60, max_position_embeddings=24, n_layer=3, n_head=4, n_embd=16, window_size=5,
                          local_heads=[0, 4, 2])
    model = GPTNeo(config)
    idx = torch.randint(0, 60, (3, 24), generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(native, "native_attention", lambda *a: calls.append(1) or native_attention(*a))

    def loss_and_grads():
        return model_loss_and_grads(model, idx)
    assert model.c_kernels() == ["attention"]  # width 16: no lmhead.c
    with_native = loss_and_grads()
    assert len(calls) == 4  # one global, one local, both kinds in the third layer
    model.allow_c_kernels(["lmhead"])  # what train.dtype = auto does where attention.c measured slower
    assert model.c_kernels() == []
    left_out = loss_and_grads()
    assert len(calls) == 4
    model.allow_c_kernels()
    monkeypatch.setattr(model_module, "NATIVE_ATTENTION_MAX_HEAD_DIM", 0)
    without = loss_and_grads()
    assert len(calls) == 4
    for a, b, c in zip(with_native, without, left_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=0, atol=0)
    monkeypatch.setattr(model_module, "NATIVE_ATTENTION_MAX_HEAD_DIM", 64)
    monkeypatch.setattr(native, "build_library", lambda name="decode": (None, "no C compiler"))
    torch.testing.assert_close(loss_and_grads()[0], without[0])  # no compiler: scaled_dot_product_attention
    assert len(calls) == 4


@pytest.mark.parametrize("N, C, V, spread", [(37, 64, 1000, 1.0), (64, 128, 300, 1.0), (5, 64, 17, 1.0),
                                             (40, 64, 700, 40.0)])
def test_native_lm_head_gives_the_loss_and_gradients_of_cross_entropy(N, C, V, spread):
    # rows not a multiple of lmhead.c's 8, vocabularies not a multiple of its 16 or 256, ignored targets; spread 40
    # puts logits in the hundreds, whose row maxima rise from block to block (the running sum's rescaling)
    gen = torch.Generator().manual_seed(N + V)
    h, w = torch.randn(N, C, generator=gen), torch.randn(V, C, generator=gen) * spread / C ** 0.5
    w[V // 2:] *= 2  # later blocks hold the larger logits
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::3] = -100
    loss, grad_h, grad_w = native.native_lm_head_cross_entropy(h, w, targets)
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(hd @ wd.t(), targets)
    ref.backward()
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    fp32 = F.cross_entropy(hf @ wf.t(), targets)  # the yardstick: PyTorch's fp32 error against fp64
    fp32.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for got, plain, want in ((grad_h, hf.grad, hd.grad), (grad_w, wf.grad, wd.grad)):
        error, plain_error = ((got.double() - want).abs().max().item(), (plain.double() - want).abs().max().item())
        assert error <= 2 * plain_error + 1e-7 * want.abs().max().item()
    loss, grad_h, grad_w = native.native_lm_head_cross_entropy(h, w, torch.full((N,), -100))
    assert loss.item() == 0 and not grad_h.any() and not grad_w.any()  # nothing to predict


def test_a_model_trains_the_same_with_the_native_lm_head_and_without(monkeypatch):
    monkeypatch.setattr(native, "faster_here", lambda name, library: True)  # this build, fast here or not
    config = GPTNeoConfig(vocab_size=300, max_position_embeddings=24, n_layer=1, n_head=4, n_embd=64)
    model = GPTNeo(config)
    idx = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(native, "native_lm_head_cross_entropy",
                        lambda *a: calls.append(1) or native_lm_head_cross_entropy(*a))

    def loss_and_grads():
        return model_loss_and_grads(model, idx)
    assert model.c_kernels() == ["lmhead"]  # head size 16: no attention.c
    with_native = loss_and_grads()
    assert len(calls) == 1
    model.allow_c_kernels(["attention"])  # what train.dtype = auto does where lmhead.c measured slower
    assert model.c_kernels() == []
    left_out = loss_and_grads()
    assert len(calls) == 1
    model.allow_c_kernels()
    monkeypatch.setattr(lm_head, "NATIVE_LM_HEAD_MAX_WIDTH", 0)
    without = loss_and_grads()
    for a, b, c in zip(with_native, without, left_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=0, atol=0)
    monkeypatch.setattr(lm_head, "NATIVE_LM_HEAD_MAX_WIDTH", 64)
    monkeypatch.setattr(native, "build_library", lambda name="decode": (None, "no C compiler"))
    torch.testing.assert_close(loss_and_grads()[0], without[0])  # no compiler: the blocked PyTorch path
    assert len(calls) == 1


class FakeBuild:
    def __init__(self, flags, floats, clang=False):
        self.tinylm_build, self.floats, self.tinylm_clang = ["cc", "-march=native", *flags], floats, clang

    def tinylm_lm_head_vector_floats(self):
        return self.floats


@pytest.mark.parametrize("flags, floats, threads, attention, lm_head_runs", [
    (["-fopenmp"], 16, 2, True, True),   # gcc with OpenMP, AVX-512: both run
    (["-fopenmp"], 8, 2, True, False),   # built for AVX2: lmhead.c ran at 0.41-0.52x PyTorch's speed
    (["-fopenmp"], 4, 2, True, False),   # SSE2 or NEON
    ([], 16, 2, False, False),           # no OpenMP (clang without libomp): one core against PyTorch's two
    ([], 16, 1, True, True),             # ...unless PyTorch has one thread too
    (["-fopenmp", "clang"], 16, 2, False, False),  # clang's builds: attention.c 0.60-0.66x, lmhead.c 0.80-1.12x
])
def test_the_training_kernels_run_only_in_builds_that_beat_pytorch(monkeypatch, flags, floats, threads, attention,
                                                                   lm_head_runs):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    build = FakeBuild([f for f in flags if f != "clang"], floats, clang="clang" in flags)
    assert native.faster_here("attention", build) == attention
    assert native.faster_here("lmhead", build) == lm_head_runs
    monkeypatch.setattr(native, "build_library", lambda name="decode": (build, None))
    assert lm_head.native_lm_head_runs(torch.randn(8, 64), torch.randn(10, 64)) == lm_head_runs


def test_lmhead_c_computes_in_the_widest_vectors_of_its_build():
    library = native.load_library("lmhead")
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    march = os.environ.get("TINYLM_MARCH") or "native"
    expected = {"x86-64-v3": 8, "x86-64": 4}.get(march)
    if expected is None and march == "native" and "avx2" in flags:  # an x86-64 CPU, by its flags
        expected = 16 if "avx512f" in flags else 8
    if expected is None:
        pytest.skip(f"no expectation for -march={march} on this CPU")
    assert native.vector_floats(library) == expected


def test_bf16_softmax_passes_give_what_pytorch_operations_give(monkeypatch):
    # mixed precision with recomputed blocks (large vocabularies): lmhead.c's passes over the bf16 logits against
    # PyTorch's convert, max, exp and sum; logits in the tens, whose maxima rise from block to block
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(50, 32, generator=gen).requires_grad_()
    w = (torch.randn(300, 32, generator=gen) * torch.linspace(0.5, 3, 300)[:, None]).requires_grad_()
    targets = torch.randint(0, 300, (50,), generator=gen)
    targets[::4] = -100
    calls = []
    monkeypatch.setattr(native, "bf16_softmax_kernels", lambda k=native.bf16_softmax_kernels: calls.append(1) or k())

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_head._LMHeadCrossEntropy.apply(h, w, targets, 16, 64, torch.bfloat16, True)
        return [loss, *torch.autograd.grad(loss, (h, w))]
    with_native = loss_and_grads()
    assert calls
    monkeypatch.setattr(native, "bf16_softmax_kernels", lambda: None)
    for got, want in zip(with_native, loss_and_grads()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
