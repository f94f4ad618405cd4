"""Generation: the KV cache, the one-token-at-a-time twin of each module's forward, the choice of per-token step
(decode.c through native.py, torch.compile, or eager PyTorch) and sampling (temperature, top-k, top-p).

GPTNeo inherits GenerationMixin, so `model.generate(idx, max_new_tokens, temperature=0.8, top_k=50)` and
`model.generate_stream(...)` are model methods, as in transformers. The architecture itself is model.py.
"""

import contextlib

import torch
import torch.nn.functional as F

from tinylm.wording import plural

DECODE_BACKENDS = ("auto", "native", "compile", "eager")  # see GenerationMixin.choose_backend
# decode.c computes one batch row after another, re-reading the weights for each: measured against the eager
# step's batched matmuls on 2 cores it wins up to about this many rows x width (TinyStories-1M: 12 rows)
NATIVE_MAX_ROWS_X_WIDTH = 768


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding (one per generate call).

    Global heads write into a buffer preallocated to `max_len`. Local heads keep a ring buffer of
    window_size slots (position p lives in slot p % window_size), so their memory never grows past the window.
    """

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=None):
        hd, W = config.n_embd // config.n_head, config.window_size
        self.pos = 0  # tokens already in the cache
        self.max_len, self.window_size = max_len, W
        self.global_kv = [torch.zeros(2, batch_size, config.n_head - nl, max_len, hd, device=device, dtype=dtype)
                          if nl < config.n_head else None for nl in config.local_heads]
        self.local_kv = [torch.zeros(2, batch_size, nl, min(W, max_len), hd, device=device, dtype=dtype)
                         if nl else None for nl in config.local_heads]
        # position of each global slot, slot of each local one: decode_step masks the slots not yet visible
        self.global_slots = torch.arange(max_len, device=device).view(1, 1, 1, max_len)
        self.local_slots = torch.arange(min(W, max_len), device=device).view(1, 1, 1, min(W, max_len))

    def update_global(self, layer: int, kv):
        """Store kv (2, B, nh, T, hd) of the next T positions; return all of this layer's (2, B, nh, pos+T, hd)."""
        end = self.pos + kv.size(3)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot add {kv.size(3)} after {self.pos}")
        cache = self.global_kv[layer]
        cache[:, :, :, self.pos:end] = kv
        return cache[:, :, :, :end]

    def update_local(self, layer: int, kv):
        """Store kv (2, B, nh, T, hd); return the keys/values the new queries may see: for T > 1 the last
        min(pos, window_size - 1) + T positions in order, for T == 1 the filled slots in ring order (a single
        query's attention does not depend on the order of its keys)."""
        ring, W, T = self.local_kv[layer], self.window_size, kv.size(3)
        if T == 1:
            ring[:, :, :, self.pos % W] = kv[:, :, :, 0]
            return ring[:, :, :, :min(self.pos + 1, W)]
        n_past = min(self.pos, W - 1)
        if n_past:
            order = torch.arange(self.pos - n_past, self.pos, device=kv.device) % W
            kv = torch.cat([ring.index_select(3, order), kv], dim=3)  # (2, B, nh, n_past + T, hd)
        keep = min(kv.size(3), W)
        slots = torch.arange(self.pos + T - keep, self.pos + T, device=kv.device) % W
        ring.index_copy_(3, slots, kv[:, :, :, -keep:])
        return kv


def decode_attention(attn, x, pos, slot, masks, kv_cache: KVCache):
    """SelfAttention.forward for one token per row, x (B, 1, C) at position `pos` (a (1,) tensor): every shape is fixed for the
    whole generation, so torch.compile builds one graph for all steps. Keys of the cache that the query
    may not see yet are masked instead of sliced away."""
    B, _, C = x.size()
    nh, nl = attn.n_head, attn.n_local
    qkv = matvec(x, attn.qkv_weight()).view(B, 3, nh, 1, C // nh).transpose(0, 1)  # (3, B, nh, 1, hd)
    q, kv = qkv[0], qkv[1:]
    dropout = attn.attention_dropout if attn.training else 0.0
    parts = []
    if nl:
        ring = kv_cache.local_kv[attn.layer]
        ring.index_copy_(3, slot, kv[:, :, :nl])
        parts.append(F.scaled_dot_product_attention(q[:, :nl], ring[0], ring[1], attn_mask=masks[1],
                                                    dropout_p=dropout, scale=1.0))
    if nl < nh:
        cache = kv_cache.global_kv[attn.layer]
        cache.index_copy_(3, pos, kv[:, :, nl:])
        parts.append(F.scaled_dot_product_attention(q[:, nl:], cache[0], cache[1], attn_mask=masks[0],
                                                    dropout_p=dropout, scale=1.0))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    y = matvec(y.reshape(B, 1, C), attn.out_proj.weight, attn.out_proj.bias)  # (B, nh, 1, hd) -> (B, 1, C)
    return attn.resid_dropout(y)


def decode_mlp(mlp, x):
    """MLP.forward for one token per row (matvec: see its docstring)."""
    return mlp.dropout(matvec(F.gelu(matvec(x, mlp.c_fc.weight, mlp.c_fc.bias), approximate="tanh"),
                               mlp.c_proj.weight, mlp.c_proj.bias))


def decode_block(block, x, pos, slot, masks, kv_cache: KVCache):
    """Block.forward for one token per row."""
    x = x + decode_attention(block.attn, block.ln_1(x), pos, slot, masks, kv_cache)
    return x + decode_mlp(block.mlp, block.ln_2(x))


class GenerationMixin:
    """generate, generate_stream and the per-token steps they run, for GPTNeo (model.py)."""

    def decode_step(self, token, pos, kv_cache: KVCache):
        """Logits (B, vocab) after token (B, 1) at position pos (a (1,) tensor), kv_cache holding every earlier
        position; the caller advances kv_cache.pos. All shapes stay the same from one step to the next, so
        torch.compile traces it once for a whole generation."""
        x = self.wte(token) + self.wpe(pos)  # (B, 1, C)
        slot = pos % self.config.window_size  # local heads: position p lives in ring slot p % window_size
        masks = (kv_cache.global_slots <= pos, kv_cache.local_slots <= pos)
        for block in self.h:
            x = decode_block(block, x, pos, slot, masks, kv_cache)
        return matvec(self.ln_f(x[:, 0]), self.wte.weight)

    def __getstate__(self):
        # compiled steps are bound to this instance: a copy or an unpickled model compiles its own
        return {k: v for k, v in super().__getstate__().items() if k != "_compiled_decode_steps"}

    def _compiled_decode_step(self, device):
        compiled = self.__dict__.setdefault("_compiled_decode_steps", {})
        if device.type not in compiled:
            # On CPU the per-kernel Python overhead is what a decode step costs; a C++ wrapper cuts it ~30%.
            # Realizing every computed value (rather than recomputing cheap ones inside the loops that use
            # them) keeps the final LayerNorm from being redone for each of the vocab's rows: -0.1 ms a token.
            options = {"cpp_wrapper": True, "realize_cpu_opcount_threshold": 1} if device.type == "cpu" else None
            compiled[device.type] = torch.compile(self.decode_step, options=options)
        return compiled[device.type]

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, compile: bool = False, step=None, backend: str = "auto"):
        """Return idx (B, T) with up to max_new_tokens sampled tokens appended.

        temperature 0 is greedy. Sampling draws from torch's global RNG, or from `generator`. Rows that
        reach eos_token_id are padded with it; generation stops early once every row has. `backend` picks the
        per-token step (see choose_backend): by default the fastest that runs here, the same tokens either way.
        compile=True is backend="compile": the first call pays for compiling, later ones run faster.
        `step` replaces the per-token step (decode_step's interface), e.g. native.native_decode_step(model).
        """
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
                                        compile, step, backend))
        return torch.cat([idx, *new], dim=1)

    def choose_backend(self, backend: str = "auto", batch_size: int = 1) -> str:
        """The per-token step generate runs for `backend`: "native" (decode.c through native.py, the fastest on
        CPU), "compile" (torch.compile), "eager" (plain PyTorch, any device and dtype). "auto" is "native" where
        it runs and pays (CPU, fp32, no dropout in use, batch x width <= NATIVE_MAX_ROWS_X_WIDTH, a C compiler
        to build it), else "eager"."""
        if backend not in DECODE_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(DECODE_BACKENDS)}, got {backend!r}")
        if backend != "auto":
            return backend
        weight = self.wte.weight
        if (weight.device.type != "cpu" or weight.dtype != torch.float32 or (self.training and self.config.has_dropout)
                or batch_size * self.config.n_embd > NATIVE_MAX_ROWS_X_WIDTH):
            return "eager"
        try:
            from tinylm.kernels.native import load_library  # builds decode.c once per process

            load_library()
            return "native"
        except (ImportError, RuntimeError):
            return "eager"

    def per_token_step(self, backend: str, device, argmax_only: bool = False):
        """The step function of a backend choose_backend named (decode_step's interface). argmax_only: only the
        logits' argmax will be used (greedy decoding), which the native step finds faster (native_decode_step)."""
        if backend == "native":
            from tinylm.kernels.native import native_decode_step

            return native_decode_step(self, argmax_only)
        return self._compiled_decode_step(device) if backend == "compile" else self.decode_step

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, eos_token_id: int | None = None,
                        generator: torch.Generator | None = None, compile: bool = False, step=None,
                        backend: str = "auto", output_logits: bool = False):
        """Yield the next tokens (B, 1) one step at a time, as `generate` appends them; with output_logits,
        (token, logits): the (B, vocab) logits it was drawn from, before temperature and filtering, valid until
        the next token is asked for (a step may reuse their memory)."""
        check_sampling_args(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be a (batch, tokens) tensor with at least one token, got shape {tuple(idx.shape)}")
        B, T = idx.size()
        backend = self.choose_backend("compile" if compile else backend, B) if step is None else "step"
        limit = self.config.max_position_embeddings
        if T + max_new_tokens > limit:
            fix = (f"shorten the prompt to at most {limit - 1} tokens" if T >= limit else
                   f"lower max_new_tokens to {limit - T} or shorten the prompt")
            raise ValueError(f"cannot generate {plural(max_new_tokens, 'token')} after a {T}-token prompt: the "
                             f"model's context is {limit} tokens (max_position_embeddings); {fix}")
        if max_new_tokens == 0:
            return
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.wte.weight.dtype)
        logits = F.linear(self.hidden_states(idx, cache)[:, -1], self.wte.weight)  # (B, vocab)
        compiled = backend == "compile"
        step = step or self.per_token_step(backend, idx.device, argmax_only=temperature == 0 and not output_logits)
        pos = torch.tensor([T], device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            x = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_token_id is not None:
                x = x.masked_fill(done[:, None], eos_token_id)
                done |= x[:, 0] == eos_token_id
            yield (x, logits) if output_logits else x
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                return
            # Every step of one generation passes the same model, cache and shapes: after the first has
            # checked torch.compile's guards (recompiling if needed), the rest skip them (0.1 ms a token).
            # set_stance imports torch._dynamo (0.8 s), which the native and eager steps never need.
            stance = torch.compiler.set_stance(skip_guard_eval_unsafe=i > 0) if compiled else contextlib.nullcontext()
            with stance:
                logits = step(x, pos, cache)
            pos += 1
            cache.pos += 1


def matvec(x, weight, bias=None):
    """F.linear for one token per row. Under torch.compile it is a broadcast multiply and sum, which Inductor
    turns into vectorized loops fused with their neighbours: on CPU the LM head's (1, C) x (C, vocab) GEMV,
    half of a small model's time per token, runs 2x faster that way than through MKL (0.13 vs 0.29 ms for
    TinyStories-1M on 2 threads), and the layers' small GEMVs lose their call overhead."""
    if not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    y = (x.unsqueeze(-2) * weight).sum(dim=-1)
    return y if bias is None else y + bias


def check_sampling_args(temperature, top_k, top_p):
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Scale (B, vocab) logits by temperature, then keep the top_k and the top_p nucleus (others -inf),
    in the order transformers applies them."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the more likely ones already hold top_p of the mass; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, vocab) logits -> (B, 1) token ids; temperature 0 is greedy."""
    if temperature == 0:
        # argmax's answer (the first maximum, as transformers' greedy search takes it): on CPU max's index runs
        # 3x faster than argmax over GPT-Neo's 50257 logits (27 vs 78 us, a sixth of a 1M model's token)
        return logits.max(dim=-1, keepdim=True).indices
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)

