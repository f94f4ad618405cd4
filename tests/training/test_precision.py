"""training/precision.py: train.dtype = auto measures which precision trains the run's model faster on this CPU,
and whether each C kernel its rules take is the faster side, once per machine and shape, and says what it found."""

import json
import os

import pytest
import torch

from model import GPTNeo, GPTNeoConfig
from tinylm.training import precision
from tinylm.training.precision import pick_precision, step_seconds

CPU = torch.device("cpu")


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = GPTNeo(GPTNeoConfig(vocab_size=50, max_position_embeddings=16, n_layer=2, n_head=2, n_embd=8,
                                window_size=4))
    model.c_kernels = lambda: []  # whether this machine's builds run any is not what these tests are about
    return model


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "avx512_bf16")
    return tmp_path / "cache" / "precision.json"


def timer(float32: float, bfloat16: float, calls: list, **without: float):
    """A measure() giving these seconds: float32 (with the C kernels), bfloat16, and without=seconds with that
    kernel left out (1.2 x float32's where not given: the kernel wins)."""
    def measure(model, rows, block_size, ways, clock=None):
        calls.append((rows, block_size))
        seconds = {"float32": float32, "bfloat16": bfloat16}
        seconds.update({precision.without(k): without.get(k, 1.2 * float32) for k in ("attention", "lmhead")})
        return {way: seconds[way] for way in ways}
    return measure


@pytest.mark.parametrize("float32, bfloat16, expected", [
    (1.5, 1.0, "bfloat16"),   # an AMD EPYC with avx512_bf16: bf16 mixed precision 1.37-1.50x fp32
    (1.0, 1.28, "float32"),   # a Xeon kept to avx512_bf16 (no AMX): 0.78x, where the flag rule took bf16
    (1.03, 1.0, "float32"),   # within 5%: fp32, the exact one
])
def test_auto_takes_the_precision_measured_faster(model, float32, bfloat16, expected):
    calls = []
    got, kernels_off, why = pick_precision("auto", CPU, model, 4, 16, measure=timer(float32, bfloat16, calls))
    assert got == expected and kernels_off == () and calls == [(4, 16)]
    assert why.startswith(f"bf16 mixed precision trains this model at {float32 / bfloat16:.2f}x fp32's speed on "
                          "this CPU (avx512_bf16); measured now, remembered in ")


def test_auto_leaves_out_a_c_kernel_measured_slower_here(model):
    # the size rules were measured on one CPU's builds: where this machine's build of lmhead.c loses, PyTorch runs
    # the LM head; bf16 is then weighed against the faster fp32 way
    model.c_kernels = lambda: ["attention", "lmhead"]
    ways = []
    measure = timer(1.0, 1.5, [], attention=1.2, lmhead=0.9)
    got, kernels_off, why = pick_precision("auto", CPU, model, 4, 16, measure=lambda *a, **k: ways.extend(a[3]) or
                                           measure(*a, **k))
    assert ways == ["float32", "float32 without attention.c", "float32 without lmhead.c", "bfloat16"]
    assert (got, kernels_off) == ("float32", ("lmhead",))
    assert why.startswith("bf16 mixed precision trains this model at 0.60x fp32's speed on this CPU (avx512_bf16); "
                          "attention.c runs a fp32 step at 1.20x PyTorch's speed; lmhead.c runs a fp32 step at 0.90x "
                          "PyTorch's speed, so PyTorch runs it; measured now")
    got, kernels_off, _ = pick_precision("auto", CPU, model, 4, 8, measure=timer(1.0, 0.5, [], lmhead=0.9))
    assert (got, kernels_off) == ("bfloat16", ("lmhead",))  # bf16 runs no C kernel; fp32 would keep lmhead.c off
    ways.clear()
    got, kernels_off, why = pick_precision("auto", CPU, model, 4, 4, measure=lambda *a, **k: ways.extend(a[3]) or
                                           measure(*a, **k), compiled=True)
    assert ways == ["float32", "bfloat16"] and kernels_off == () and ".c runs" not in why  # train.compile: no C call


def test_a_cpu_without_bf16_instructions_measures_only_its_c_kernels(model, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: None)  # an AVX2 laptop, ARM
    model.c_kernels = lambda: ["attention"]
    ways = []
    measure = timer(1.0, 0.5, [], attention=0.8)
    got, kernels_off, why = pick_precision("auto", CPU, model, 4, 16, measure=lambda *a, **k: ways.extend(a[3]) or
                                           measure(*a, **k))
    assert ways == ["float32", "float32 without attention.c"] and (got, kernels_off) == ("float32", ("attention",))
    assert why.startswith("this CPU has no bf16 instructions (AMX or avx512_bf16); attention.c runs a fp32 step at "
                          "0.80x PyTorch's speed, so PyTorch runs it; measured now")


def test_the_answer_is_remembered_per_machine_and_shape(model, own_cache, monkeypatch):
    calls = []
    measure = timer(1.5, 1.0, calls)
    pick_precision("auto", CPU, model, 4, 16, measure=measure)
    got, _, why = pick_precision("auto", CPU, model, 4, 16, measure=timer(1.0, 2.0, calls))
    assert got == "bfloat16" and len(calls) == 1  # the second run reads the first one's answer
    assert f"remembered in {own_cache}" in why and "measured now" not in why
    entry = next(iter(json.loads(own_cache.read_text()).values()))
    assert (entry["float32"], entry["bfloat16"]) == (1.5, 1.0) and "batch=4x16" in entry["what"]
    pick_precision("auto", CPU, model, 4, 8, measure=measure)  # another block size: measured again
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # oneDNN kept from AMX: another machine
    pick_precision("auto", CPU, model, 4, 16, measure=measure)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    pick_precision("auto", CPU, model, 4, 16, measure=measure)
    model.c_kernels = lambda: ["attention"]  # a build that runs attention.c here now (CC=gcc after clang): the
    pick_precision("auto", CPU, model, 4, 16, measure=measure)  # remembered fp32 time had it off, so measured again
    pick_precision("auto", CPU, model, 4, 16, measure=measure)
    model.c_kernels = lambda: []  # back to no kernel (a compiled run, say): the answer without them is still there
    pick_precision("auto", CPU, model, 4, 16, measure=measure)
    assert calls == [(4, 16), (4, 8), (4, 16), (4, 16), (4, 16)]
    assert len(json.loads(own_cache.read_text())) == 5


def test_a_large_batch_is_timed_on_fewer_rows(model):
    calls = []
    pick_precision("auto", CPU, model, 64, 512, measure=timer(1.5, 1.0, calls))
    pick_precision("auto", CPU, model, 2, 8192, measure=timer(1.5, 1.0, calls))
    assert calls == [(8, 512), (1, 8192)]  # 4096 tokens, at least a row


def test_a_damaged_or_unwritable_cache_is_measured_again(model, own_cache, monkeypatch):
    own_cache.parent.mkdir(parents=True)
    own_cache.write_text('{"cut short')
    calls = []
    assert pick_precision("auto", CPU, model, 4, 16, measure=timer(1.5, 1.0, calls))[0] == "bfloat16"
    assert len(calls) == 1 and len(json.loads(own_cache.read_text())) == 1  # rewritten whole
    monkeypatch.setenv("TINYLM_CACHE", os.devnull + "/nowhere")  # not a folder anyone can make
    got, _, why = pick_precision("auto", CPU, model, 4, 16, measure=timer(1.5, 1.0, calls))
    assert got == "bfloat16" and len(calls) == 2 and "not writable: measured again next run" in why


def test_what_needs_no_measurement_is_not_measured(model, monkeypatch):
    calls = []
    measure = timer(1.5, 1.0, calls)
    assert pick_precision("float32", CPU, model, 4, 16, measure=measure) == ("float32", (), "set by train.dtype")
    assert pick_precision("bfloat16", CPU, model, 4, 16, measure=measure) == ("bfloat16", (), "set by train.dtype")
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: None)  # AVX2 laptops: bf16 is emulated, far slower
    assert pick_precision("auto", CPU, model, 4, 16, measure=measure) == \
        ("float32", (), "this CPU has no bf16 instructions (AMX or avx512_bf16)")  # and no C kernel to weigh
    assert calls == []


def test_the_measurement_leaves_the_model_and_the_random_stream_as_they_were(model):
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    random_state = torch.get_rng_state()
    ticks, allowed = iter(range(100)), []

    def clock():
        allowed.append(model.allowed_c_kernels)
        return next(ticks)
    ways = ["float32", "float32 without attention.c", "bfloat16"]
    seconds = step_seconds(model, 2, 16, ways, rounds=2, clock=clock)
    assert seconds == {way: 1 for way in ways}  # the fastest timed pass of each, read off the clock
    assert next(ticks) == 18  # (a warm-up + 2 timed rounds) x 3 ways x (a start, an end): nothing else
    both, lmhead = ("attention", "lmhead"), ("lmhead",)
    assert allowed == [both, both, lmhead, lmhead, both, both] * 3  # attention.c left out in its way's passes
    assert model.allowed_c_kernels == both
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), random_state)
