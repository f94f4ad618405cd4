"""Native code on CPU, called through ctypes: TinyLM's per-token decoding step (decode.c), its training
attention (attention.c) and its training LM head with the loss (lmhead.c).

    from tinylm.kernels.native import native_decode_step
    out = model.generate(idx, 200, temperature=0, step=native_decode_step(model))

decode.c computes what GPTNeo.decode_step computes (fp32, eval mode, any mix of local and global heads), with
no per-operation overhead: for TinyStories-1M a token costs about half of the compiled PyTorch step.
attention.c computes causal attention, global or local, forward and backward (native_attention), which
SelfAttention runs in fp32 on CPU at small head sizes; lmhead.c computes the LM head's cross-entropy and its
gradients (native_lm_head_cross_entropy), which lm_head_cross_entropy runs in fp32 on CPU at small widths. Each
file is compiled with the system's C compiler (`cc`, or $CC: gcc and clang are both tested) once per machine (about
a second) and kept in ~/.cache/tinylm ($TINYLM_CACHE moves it), keyed by the source, the compiler, the flags and the
CPU; without a compiler, PyTorch's own operations run instead. The code is built for this CPU (-march=native);
$TINYLM_MARCH names another target, e.g. x86-64-v3 (AVX2) or x86-64, which the tests build and check too. Without
OpenMP's runtime (clang without libomp) the files build without it and run on one core."""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
# Each C file and a function its library must export: decode.c (generation), attention.c and lmhead.c (training)
SOURCES = {"decode": "tinylm_decode_step", "attention": "tinylm_attention_forward", "lmhead": "tinylm_lm_head_lse"}
CACHE_ENV = "TINYLM_CACHE"  # relocates the compiled-library cache (default: ~/.cache/tinylm)
MARCH_ENV = "TINYLM_MARCH"  # the -march the C files are built for (default: native, this CPU)
BASE_FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]

TILE_ROWS = 64  # decode.c's TILE_ROWS: rows per bf16 tile of the greedy LM head
_pointers = ctypes.POINTER(ctypes.c_void_p)


class _Model(ctypes.Structure):
    """decode.c's Model, field for field."""
    _fields_ = ([(name, ctypes.c_int) for name in ("n_layer", "n_head", "n_embd", "n_inner", "vocab_size",
                                                   "window_size", "max_len", "batch_size")]
                + [("eps", ctypes.c_float), ("local_heads", ctypes.POINTER(ctypes.c_int))]
                + [(name, ctypes.c_void_p) for name in ("wte", "wpe", "lnf_w", "lnf_b")]
                + [(name, _pointers) for name in ("ln1_w", "ln1_b", "qkv_w", "out_w", "out_b", "ln2_w", "ln2_b",
                                                  "fc_w", "fc_b", "proj_w", "proj_b", "global_kv", "local_kv")]
                + [(name, ctypes.c_void_p) for name in ("scratch", "wte_bf16", "wte_norms")])


def load_library(name: str = "decode") -> ctypes.CDLL:
    """NAME.c (decode.c by default; see SOURCES) compiled and loaded, once per process; a build that failed raises
    the same RuntimeError again without trying again (generate's default backend asks on every call)."""
    library, error = build_library(name)
    if error is not None:
        raise RuntimeError(error)
    return library


@functools.cache
def build_library(name: str = "decode") -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why it could not be built). The library comes from the on-disk cache
    when a process on this machine built it before; else it is compiled (about a second) and published there."""
    source = os.path.join(HERE, f"{name}.c")
    wanted = os.environ.get("CC")
    cc = shutil.which(wanted) if wanted else shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, (f"native code compiles {name}.c and found no C compiler "
                      f"({'$CC=' + wanted if wanted else 'cc, gcc or clang'}); install one, or run without it")
    errors = ""
    base = [f"-march={os.environ.get(MARCH_ENV) or 'native'}", *BASE_FLAGS]
    # OpenMP spreads work over all cores and glibc's libmvec vectorizes exp and tanh; without them
    # (Apple clang, clang without libomp, musl) the same code builds slower
    for flags in (base + ["-fopenmp", "-DTINYLM_MVEC", "-lmvec"], base + ["-fopenmp"], base):
        library, errors = cached_build(cc, flags, source)
        if library is not None:
            library.tinylm_build = [os.path.basename(cc), *flags]  # what it was built with, for tests and reports
            library.tinylm_clang = b"clang" in toolchain(cc).split(b"\0")[1]  # `cc` may be either compiler
            return declare(library), None
    return None, f"compiling {source} with {cc} failed:\n{errors}"


def declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """The argument types of the library's functions, so ctypes passes pointers and ints as C expects."""
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    functions = {"tinylm_decode_step": [ctypes.POINTER(_Model), pointer, i64, pointer],
                 "tinylm_attention_forward": [pointer] * 5 + [i32] * 4,
                 "tinylm_attention_backward": [pointer] * 9 + [i32] * 4,
                 "tinylm_lm_head_lse": [pointer] * 2 + [i32] * 3 + [pointer],
                 "tinylm_lm_head_backward": [pointer] * 5 + [i32] * 3 + [pointer] * 2,
                 "tinylm_lse_update_bf16": [pointer] + [i32] * 3 + [pointer] * 2,
                 "tinylm_exp_bf16": [pointer] + [i32] * 3 + [pointer] * 2,
                 "tinylm_lm_head_vector_floats": []}
    for name, argtypes in functions.items():
        if hasattr(library, name):
            getattr(library, name).argtypes = argtypes
            getattr(library, name).restype = ctypes.c_int if name == "tinylm_lm_head_vector_floats" else None
    return library


def cache_folder() -> str:
    """Where compiled libraries are kept: $TINYLM_CACHE, else tinylm/ in the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(CACHE_ENV) or os.path.join(base, "tinylm")


def build_key(cc: str, flags: list[str], source: str) -> str:
    """What the compiled library depends on: the source, the compiler and its version, the flags, and the machine
    (its architecture and CPU features: -march=native code may not run on another CPU sharing the home folder)."""
    with open(source, "rb") as f:
        text = f.read()
    return hashlib.sha256(text + b"\0" + toolchain(cc) + b"\0" + " ".join(flags).encode()).hexdigest()[:16]


@functools.cache
def toolchain(cc: str) -> bytes:
    """The compiler, its version and the machine, asked once per process whatever file and flags are built."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    cpu = ""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    return b"\0".join([cc.encode(), version.encode(), platform.machine().encode(), cpu.encode()])


def cached_build(cc: str, flags: list[str], source: str) -> tuple[ctypes.CDLL | None, str]:
    """(library, "") from the cache, or compiled and published there whole (os.replace of a file of this
    process's own, so processes building at once each publish a complete file); (None, compiler errors) when
    these flags do not build. A cached file that does not load is built again; a cache that cannot be written
    is skipped for a temporary folder."""
    folder = cache_folder()
    name = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(folder, f"{name}-{build_key(cc, flags, source)}.so")
    if os.path.isfile(path):
        try:
            return checked(ctypes.CDLL(path), name), ""
        except (OSError, AttributeError):
            pass  # damaged (cut short, overwritten): build it again
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=os.path.basename(path) + ".tmp", delete=False).name
    except OSError:  # an unwritable cache: build in a temporary folder, as without a cache
        folder = tempfile.mkdtemp(prefix="tinylm-native-")
        path = tmp = os.path.join(folder, f"{name}.so")
    try:
        result = subprocess.run([cc, *flags, source, "-o", tmp, "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            return None, result.stderr
        try:
            library = checked(ctypes.CDLL(tmp), name)  # e.g. a vector function this glibc lacks: a library links anyway
        except (OSError, AttributeError) as e:
            return None, str(e)
        if tmp != path:
            os.replace(tmp, path)  # loaded: the mapping stays valid under the new name
        return library, ""
    finally:
        if os.path.exists(tmp) and tmp != path:
            os.remove(tmp)
        if path == tmp:
            shutil.rmtree(folder, ignore_errors=True)


def checked(library: ctypes.CDLL, name: str) -> ctypes.CDLL:
    getattr(library, SOURCES[name])  # AttributeError when the file is not NAME.c's library
    return library


def trains_natively(name: str, *tensors) -> bool:
    """Whether NAME.c (a training kernel, see SOURCES) can take these tensors and is the faster side here: all fp32
    on CPU, not under torch.compile (which cannot trace a C call), the file builds (once per machine), and the
    build is one that beats PyTorch (faster_here)."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) or torch.compiler.is_compiling():
        return False
    library = build_library(name)[0]
    return library is not None and faster_here(name, library)


def faster_here(name: str, library: ctypes.CDLL) -> bool:
    """Whether this build of a training kernel (attention.c, lmhead.c) beats PyTorch's operations, by what it was
    built with. bench/bench_thresholds.py on a 2-core Xeon, the C files built each way (docs/speed.md):
    - built by clang they lost at the sizes gcc's builds win at (attention.c 0.60-0.66x at head sizes 4 and 8,
      lmhead.c 0.80x at vocab 4000; with OpenMP), so only gcc's builds run;
    - built without OpenMP they run on one core and lost to PyTorch's two threads at every size (0.44-0.88x), so
      they run only where PyTorch has one thread;
    - lmhead.c's tiles want AVX-512's 32 registers: built for AVX2 (x86-64-v3) it ran at 0.41-0.52x PyTorch's
      speed (PyTorch kept to AVX2 too), so it runs only in builds with 16-float vectors.
    attention.c held its size rule at both levels (1.15-1.38x at head sizes 4 and 8 with AVX2)."""
    if library.tinylm_clang:
        return False
    if "-fopenmp" not in library.tinylm_build and torch.get_num_threads() > 1:
        return False
    return name != "lmhead" or vector_floats(library) >= 16


def vector_floats(library: ctypes.CDLL) -> int:
    """The floats per vector lmhead.c was built with: 16 with AVX-512, 8 with AVX2, 4 with SSE2 or NEON."""
    if not hasattr(library, "tinylm_vector_floats"):
        library.tinylm_vector_floats = library.tinylm_lm_head_vector_floats()
    return library.tinylm_vector_floats


def native_decode_step(model, argmax_only: bool = False):
    """A step function for model.generate / generate_stream (`step=`): the decode_step interface, run by decode.c.

    On its first call for a KV cache it copies the cache (filled by the prompt) into decode.c's layout, which
    later calls extend; the KVCache object itself then stays as the prompt left it.

    argmax_only, for greedy decoding: each step's logits are decode.c's fp32 ones wherever they could be the
    largest and -inf elsewhere, so their argmax is the same token. The LM head then reads a bf16 copy of wte (half
    the bytes) and computes in fp32 only the rows that bf16's rounding leaves in doubt: a TinyStories-1M token
    costs about 30% less.
    """
    params = list(model.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        raise ValueError("native decoding runs fp32 models on CPU; use model.float().cpu(), or compile=True")
    if model.training and model.config.has_dropout:
        raise ValueError("native decoding has no dropout; call model.eval() first")
    library = load_library()
    state = {}
    candidates = bf16_copy(model.wte.weight.detach()) if argmax_only else None

    def step(token, pos, kv_cache):
        if state.get("kv_cache") is not kv_cache:
            state.clear()
            state.update(kv_cache=kv_cache, **native_state(model, kv_cache, token.size(0), candidates))
        tokens = token[:, 0].contiguous()  # (B,) int64
        logits = torch.empty(token.size(0), model.config.vocab_size)
        library.tinylm_decode_step(ctypes.byref(state["model"]), tokens.data_ptr(), kv_cache.pos, logits.data_ptr())
        return logits
    return step


def bf16_copy(wte) -> tuple | None:
    """(wte's first V - V % 64 rows rounded to bf16 as (n_embd, 64) tiles, the L2 norms of all V rows in fp32) for
    decode.c's greedy LM head; None where wte holds a NaN or inf, which only the fp32 logits show as they are."""
    norms = wte.norm(dim=1)
    if not bool(torch.isfinite(norms).all()):
        return None
    vocab, width = wte.shape
    tiled = vocab - vocab % TILE_ROWS
    tiles = wte[:tiled].to(torch.bfloat16).view(tiled // TILE_ROWS, TILE_ROWS, width).transpose(1, 2)
    return tiles.contiguous().view(torch.int16), norms


def native_state(model, kv_cache, batch_size: int, candidates: tuple | None = None) -> dict:
    """decode.c's Model for `model` and a copy of kv_cache, plus every tensor and array it points into (kept
    alive with it). candidates: bf16_copy's answer, for logits that only greedy decoding may use."""
    c, blocks = model.config, model.h
    keep = []

    def address(t):
        if t is None:
            return None
        t = t.detach().contiguous()
        keep.append(t)
        return t.data_ptr()

    def addresses(tensors):
        array = (ctypes.c_void_p * len(tensors))(*map(address, tensors))
        keep.append(array)
        return ctypes.cast(array, _pointers)

    def positions_along_rows(kv):  # (2, B, heads, S, hd) -> (2, B, heads, hd, S)
        return None if kv is None else kv.transpose(-1, -2).contiguous()

    n_inner = blocks[0].mlp.c_fc.out_features
    local_heads = (ctypes.c_int * c.n_layer)(*c.local_heads)
    keep.append(local_heads)
    scratch = torch.empty(7 * c.n_embd + n_inner + kv_cache.max_len + batch_size * c.n_embd)
    native = _Model(
        c.n_layer, c.n_head, c.n_embd, n_inner, c.vocab_size, c.window_size, kv_cache.max_len, batch_size,
        c.layer_norm_epsilon, local_heads,
        address(model.wte.weight), address(model.wpe.weight), address(model.ln_f.weight), address(model.ln_f.bias),
        addresses([b.ln_1.weight for b in blocks]), addresses([b.ln_1.bias for b in blocks]),
        addresses([b.attn.qkv_weight() for b in blocks]),
        addresses([b.attn.out_proj.weight for b in blocks]), addresses([b.attn.out_proj.bias for b in blocks]),
        addresses([b.ln_2.weight for b in blocks]), addresses([b.ln_2.bias for b in blocks]),
        addresses([b.mlp.c_fc.weight for b in blocks]), addresses([b.mlp.c_fc.bias for b in blocks]),
        addresses([b.mlp.c_proj.weight for b in blocks]), addresses([b.mlp.c_proj.bias for b in blocks]),
        addresses([positions_along_rows(kv) for kv in kv_cache.global_kv]),
        addresses([positions_along_rows(kv) for kv in kv_cache.local_kv]),
        address(scratch), *(map(address, candidates) if candidates else (None, None)))
    return {"model": native, "keep": keep}


def native_attention(q, k, v, window: int = 0):
    """GPT-Neo's causal attention of q, k, v (B, nh, T, hd), fp32 on CPU, by attention.c, forward and backward:
    F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0), or with window > 0 what a local head sees
    (each query the last `window` keys). RuntimeError where attention.c cannot be built."""
    return _Attention.apply(q, k, v, window)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window):
        library = load_library("attention")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, nh, T, hd = q.shape
        out, lse = torch.empty_like(q), q.new_empty(B, nh, T)  # lse: each query's log-sum-exp, for backward
        library.tinylm_attention_forward(*_addresses(q, k, v, out, lse), B * nh, T, hd, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        B, nh, T, hd = q.shape
        load_library("attention").tinylm_attention_backward(*_addresses(q, k, v, out, lse, grad_out, dq, dk, dv),
                                                            B * nh, T, hd, ctx.window)
        return dq, dk, dv, None


def native_lm_head_cross_entropy(h, weight, targets):
    """(loss, d loss / d h, d loss / d weight) of cross_entropy(h @ weight.T, targets, ignore_index=-100) for h (N,
    C) and weight (V, C), fp32 on CPU with C a multiple of 64, by lmhead.c: each tile of logits is made and used in
    registers and L1 cache, never written out. RuntimeError where lmhead.c cannot be built."""
    library = load_library("lmhead")
    N, C = h.shape
    pad = -N % 8  # lmhead.c's tiles are 8 rows; padded rows have weight 0
    h, weight = F.pad(h.contiguous(), (0, 0, 0, pad)), weight.contiguous()
    valid = F.pad(targets != -100, (0, pad))
    scale = valid / valid.sum().clamp(min=1)  # (N,) each row's weight in the mean
    tiles = -(-weight.size(0) // 16)  # weight's rows sixteen at a time, transposed: (tiles, C, 16)
    wt = F.pad(weight, (0, 0, 0, 16 * tiles - weight.size(0))).view(tiles, 16, C).transpose(1, 2).contiguous()
    lse = h.new_empty(N + pad)
    library.tinylm_lm_head_lse(*_addresses(h, wt), N + pad, C, weight.size(0), lse.data_ptr())
    target = F.pad(targets, (0, pad)).clamp(min=0)
    target_w = weight[target]  # (N + pad, C)
    loss = (scale * (lse - (h * target_w).sum(dim=1))).sum()
    grad_h, grad_w = torch.zeros_like(h), torch.empty_like(weight)
    library.tinylm_lm_head_backward(*_addresses(h, weight, wt, lse, scale), N + pad, C, weight.size(0),
                                    *_addresses(grad_h, grad_w))
    # the targets' terms: d/d logit_rt = -scale_r
    grad_h -= scale[:, None] * target_w
    grad_w.index_add_(0, target, -scale[:, None] * h)
    return loss, grad_h[:N], grad_w


class _Bf16Softmax:
    """lmhead.c's passes over a bf16 block of logits (n, vb), contiguous, with fp32 row statistics (n, 1)."""

    def __init__(self, library):
        self.library = library

    def lse_update(self, logits, row_max, row_sum):
        """row_max and row_sum (running max, sum of exp(logit - max)) take in the block, in place."""
        n, vb = logits.shape
        self.library.tinylm_lse_update_bf16(logits.data_ptr(), n, vb, vb, *_addresses(row_max, row_sum))

    def exp_(self, logits, row_max):
        """exp(logits - row_max) rounded to bf16, in place; returns logits."""
        n, vb = logits.shape
        self.library.tinylm_exp_bf16(logits.data_ptr(), n, vb, vb, row_max.data_ptr(), logits.data_ptr())
        return logits


def bf16_softmax_kernels() -> _Bf16Softmax | None:
    """lmhead.c's bf16 softmax passes, or None where it cannot be built (PyTorch's operations run instead)."""
    library = build_library("lmhead")[0]
    return None if library is None else _Bf16Softmax(library)


def _addresses(*tensors):
    return [t.data_ptr() for t in tensors]

