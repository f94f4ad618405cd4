"""GPT-Neo, as used by TinyStories (Eldan & Li 2023, arXiv 2305.07759).

Computes exactly what Hugging Face's `transformers.GPTNeoForCausalLM` computes (reference:
transformers/models/gpt_neo/modeling_gpt_neo.py): learned positions, pre-LayerNorm blocks, attention
WITHOUT 1/sqrt(head_dim) scaling, gelu_new MLP, LM head tied to the token embedding. On top of GPT-Neo's
per-layer choice of local (sliding window) or global attention, a layer may mix both: its first
`local_heads` heads are local, the rest global.
"""

import contextlib
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from storage import atomic_write, write_text

ATTENTION_TYPES = ("global", "local", "mixed")
DECODE_BACKENDS = ("auto", "native", "compile", "eager")  # see GPTNeo.choose_backend
# decode.c computes one batch row after another, re-reading the weights for each: measured against the eager
# step's batched matmuls on 2 cores it wins up to about this many rows x width (TinyStories-1M: 12 rows)
NATIVE_MAX_ROWS_X_WIDTH = 768
CPU_QUERY_CHUNK = 64  # see SelfAttention._attend


@dataclass
class GPTNeoConfig:
    vocab_size: int = 50257  # the full GPT-Neo BPE; a trimmed tokenizer makes it smaller
    max_position_embeddings: int = 2048  # context length: rows of the learned position table
    n_layer: int = 8  # transformer blocks
    n_head: int = 16  # attention heads per block
    n_embd: int = 64  # residual stream width
    window_size: int = 256  # a local head sees this many keys, itself included
    # Which heads are local, either form: `attention_types` per layer ("global"/"local"/"mixed") or `local_heads`
    # (how many heads are local: one int for every layer, or one per layer). A list is a pattern repeated over the
    # layers and cut at n_layer, so changing n_layer alone resizes a model.
    # Neither given: GPT-Neo's global,local alternation. After __post_init__ both hold one entry per layer.
    attention_types: list | tuple | None = None
    local_heads: int | list | tuple | None = None
    intermediate_size: int | None = None  # MLP inner width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # embedding, attention and residual dropout (GPT-Neo's three, tied together)
    bos_token_id: int = 50256  # <|endoftext|> in GPT-Neo's vocabulary
    eos_token_id: int = 50256

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"invalid model config: {msg}")

        for name in ("vocab_size", "max_position_embeddings", "n_layer", "n_head", "n_embd", "window_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            fail(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            fail(f"intermediate_size must be positive or None, got {self.intermediate_size}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")

        types = self._expand("attention_types", self.attention_types)
        heads = self._expand("local_heads", self.local_heads)
        for t in types or ():
            if t not in ATTENTION_TYPES:
                fail(f"attention_types entries must be one of {ATTENTION_TYPES}, got {t!r}")
        for h in heads or ():
            if not isinstance(h, int) or not 0 <= h <= self.n_head:
                fail(f"local_heads entries must be integers in [0, n_head={self.n_head}], got {h!r}")
        if heads is None:
            types = types or ["global", "local"] * (self.n_layer // 2) + ["global"] * (self.n_layer % 2)
            if "mixed" in types:
                fail("attention_types 'mixed' needs local_heads to say how many heads of the layer are local")
            heads = [self.n_head if t == "local" else 0 for t in types]
        derived = ["global" if h == 0 else "local" if h == self.n_head else "mixed" for h in heads]
        if types is not None and types != derived:
            fail(f"attention_types {types} disagrees with local_heads {heads}; set only one of them "
                 "(attention_types = none to use local_heads)")
        self.attention_types, self.local_heads = tuple(derived), tuple(heads)

    def _expand(self, name, value):
        """A scalar, a comma string, or a list -> one entry per layer: the list repeated and cut at n_layer
        (global,local over 3 layers is global,local,global)."""
        if value is None:
            return None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if not value:
            raise ValueError(f"invalid model config: {name} is empty; give one entry per layer or a pattern")
        # a pattern repeated over the layers and cut at n_layer: resizing a model is editing n_layer alone
        return (list(value) * -(-self.n_layer // len(value)))[:self.n_layer]

    @property
    def gpt_neo_compatible(self) -> bool:
        """True when every layer is all-local or all-global, so transformers' GPT-Neo can run it."""
        return "mixed" not in self.attention_types

    def to_hf_dict(self) -> dict:
        """config.json in transformers' GPT-Neo format (plus `local_heads`, which GPT-Neo ignores)."""
        types = list(self.attention_types)
        period = next(p for p in range(1, len(types) + 1) if len(types) % p == 0
                      and types == types[:p] * (len(types) // p))
        return {
            "architectures": ["GPTNeoForCausalLM"],
            "model_type": "gpt_neo",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_size": self.n_embd,
            "num_layers": self.n_layer,
            "num_heads": self.n_head,
            # A "mixed" entry makes transformers refuse the model instead of loading a different one.
            "attention_types": [[types[:period], len(types) // period]],
            "attention_layers": types,
            "local_heads": list(self.local_heads),
            "window_size": self.window_size,
            "intermediate_size": self.intermediate_size,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "embed_dropout": self.dropout,
            "attention_dropout": self.dropout,
            "resid_dropout": self.dropout,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GPTNeoConfig":
        """Read a transformers GPT-Neo config.json (or one we wrote)."""
        if d.get("model_type") != "gpt_neo":
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}; only GPT-Neo ('gpt_neo') "
                             "checkpoints can be loaded")
        if d.get("activation_function", "gelu_new") != "gelu_new":
            raise ValueError(f"activation_function {d['activation_function']!r} is not supported (only gelu_new)")
        if not d.get("tie_word_embeddings", True):
            raise ValueError("untied LM heads are not supported: TinyLM ties lm_head to wte as GPT-Neo does")
        types = d.get("attention_layers")
        if types is None and d.get("attention_types") is not None:
            types = [t for pattern, repeat in d["attention_types"] for _ in range(repeat) for t in pattern]
        dropouts = {float(d.get(k, 0.0) or 0.0) for k in ("embed_dropout", "attention_dropout", "resid_dropout")}
        return cls(
            vocab_size=d["vocab_size"], max_position_embeddings=d["max_position_embeddings"],
            n_layer=d["num_layers"], n_head=d["num_heads"], n_embd=d["hidden_size"],
            window_size=d.get("window_size", 256), attention_types=types if "local_heads" not in d else None,
            local_heads=d.get("local_heads"), intermediate_size=d.get("intermediate_size"),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5), dropout=max(dropouts),
            bos_token_id=d.get("bos_token_id", 50256), eos_token_id=d.get("eos_token_id", 50256),
        )


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding (one per generate call).

    Global heads write into a buffer preallocated to `max_len`. Local heads keep a ring buffer of
    window_size slots (position p lives in slot p % window_size), so their memory never grows past the window.
    """

    def __init__(self, config: GPTNeoConfig, batch_size: int, max_len: int, device=None, dtype=None):
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


class SelfAttention(nn.Module):
    def __init__(self, config: GPTNeoConfig, layer: int):
        super().__init__()
        self.layer, self.n_head = layer, config.n_head
        self.n_local = config.local_heads[layer]
        self.window_size = config.window_size
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=True)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, masks, kv_cache: KVCache | None = None):
        B, T, C = x.size()
        nh, nl = self.n_head, self.n_local
        qkv = F.linear(x, self.qkv_weight())
        qkv = qkv.view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd)
        q, kv = qkv[0], qkv[1:]
        start = kv_cache.pos if kv_cache is not None else 0
        parts = []
        if nl:
            kvl = kv[:, :, :nl] if kv_cache is None else kv_cache.update_local(self.layer, kv[:, :, :nl])
            parts.append(self._attend(q[:, :nl], kvl[0], kvl[1], start, masks, local=True))
        if nl < nh:
            kvg = kv[:, :, nl:] if kv_cache is None else kv_cache.update_global(self.layer, kv[:, :, nl:])
            parts.append(self._attend(q[:, nl:], kvg[0], kvg[1], start, masks, local=False))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hd) -> (B, T, C)
        return self.resid_dropout(self.out_proj(y))

    def qkv_weight(self):
        # One matmul for q, k and v: decoding a token is bound by the number of ops, not their size.
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    def decode(self, x, pos, slot, masks, kv_cache: "KVCache"):
        """One token per row, x (B, 1, C) at position `pos` (a (1,) tensor): every shape is fixed for the
        whole generation, so torch.compile builds one graph for all steps. Keys of the cache that the query
        may not see yet are masked instead of sliced away."""
        B, _, C = x.size()
        nh, nl = self.n_head, self.n_local
        qkv = matvec(x, self.qkv_weight()).view(B, 3, nh, 1, C // nh).transpose(0, 1)  # (3, B, nh, 1, hd)
        q, kv = qkv[0], qkv[1:]
        dropout = self.dropout if self.training else 0.0
        parts = []
        if nl:
            ring = kv_cache.local_kv[self.layer]
            ring.index_copy_(3, slot, kv[:, :, :nl])
            parts.append(F.scaled_dot_product_attention(q[:, :nl], ring[0], ring[1], attn_mask=masks[1],
                                                        dropout_p=dropout, scale=1.0))
        if nl < nh:
            cache = kv_cache.global_kv[self.layer]
            cache.index_copy_(3, pos, kv[:, :, nl:])
            parts.append(F.scaled_dot_product_attention(q[:, nl:], cache[0], cache[1], attn_mask=masks[0],
                                                        dropout_p=dropout, scale=1.0))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        y = matvec(y.reshape(B, 1, C), self.out_proj.weight, self.out_proj.bias)  # (B, nh, 1, hd) -> (B, 1, C)
        return self.resid_dropout(y)

    def _attend(self, q, k, v, start, masks, local):
        """q (B, nh, T, hd) holds positions start..start+T-1; k, v hold the S positions ending at the same place."""
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU mixed precision: PyTorch's CPU flash-attention backward runs ~4x slower in bf16 than in fp32
            # (torch 2.13, head_dim 16-24), and attention is a small share of the FLOPs: keep it in fp32.
            with torch.autocast("cpu", enabled=False):
                return self._attend(q.float(), k.float(), v.float(), start, masks, local)
        T, S = q.size(2), k.size(2)
        dropout = self.dropout if self.training else 0.0
        if T == 1:  # decoding: the cache handed over exactly the keys this query may see
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=1.0)
        key_start, end = start + T - S, start + T
        # PyTorch's CPU flash kernel computes masked scores anyway within its 512-key blocks, so below ~1K
        # tokens causal costs as much as full attention; query chunks that see only keys up to their own end
        # (and, for local heads, back to their window) cut training's attention time 40-50%.
        chunk = CPU_QUERY_CHUNK if q.device.type == "cpu" else T
        out = []
        for s in range(start, end, chunk):
            e = min(s + chunk, end)
            lo = max(key_start, s - self.window_size + 1) if local else key_start
            if e - s == 1:
                mask, causal = None, False  # one query sees every key from lo on
            elif lo == s and (not local or e - s <= self.window_size):
                mask, causal = None, True
            else:
                mask, causal = (masks[1] if local else masks[0])[s:e, lo:e], False
            qc, kc, vc = q[:, :, s - start:e - start], k[:, :, lo - key_start:], v[:, :, lo - key_start:]
            kc, vc = kc[:, :, :e - lo], vc[:, :, :e - lo]
            # GPT-Neo does not scale q.k by 1/sqrt(hd); SDPA keeps the softmax in fp32 for fp32 inputs.
            out.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, dropout_p=dropout,
                                                      is_causal=causal, scale=1.0))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class MLP(nn.Module):
    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        inner = config.intermediate_size or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # gelu_new is GELU's tanh approximation; PyTorch computes it in one fused kernel.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))

    def decode(self, x):
        return self.dropout(matvec(F.gelu(matvec(x, self.c_fc.weight, self.c_fc.bias), approximate="tanh"),
                                   self.c_proj.weight, self.c_proj.bias))


class Block(nn.Module):
    def __init__(self, config: GPTNeoConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = SelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, masks, kv_cache=None):
        x = x + self.attn(self.ln_1(x), masks, kv_cache)
        return x + self.mlp(self.ln_2(x))

    def decode(self, x, pos, slot, masks, kv_cache):
        x = x + self.attn.decode(self.ln_1(x), pos, slot, masks, kv_cache)
        return x + self.mlp.decode(self.ln_2(x))


class GPTNeo(nn.Module):
    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        # Built once for the whole context and sliced per call; not saved with the weights.
        n = config.max_position_embeddings
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)
        self.register_buffer("band_mask", causal & ~causal.tril(-config.window_size), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # GPT-Neo's initialisation (transformers' GPTNeoPreTrainedModel._init_weights).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, kv_cache: KVCache | None = None):
        """Final-LayerNorm output (B, T, C) for token ids idx (B, T), continuing kv_cache if given."""
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's context of "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")
        x = self.drop(self.wte(idx) + self.wpe.weight[start:start + T])
        masks = (self.causal_mask, self.band_mask)
        for block in self.h:
            x = block(x, masks, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.ln_f(x)

    def decode_step(self, token, pos, kv_cache: KVCache):
        """Logits (B, vocab) after token (B, 1) at position pos (a (1,) tensor), kv_cache holding every earlier
        position; the caller advances kv_cache.pos. All shapes stay the same from one step to the next, so
        torch.compile traces it once for a whole generation."""
        x = self.wte(token) + self.wpe(pos)  # (B, 1, C)
        slot = pos % self.config.window_size  # local heads: position p lives in ring slot p % window_size
        masks = (kv_cache.global_slots <= pos, kv_cache.local_slots <= pos)
        for block in self.h:
            x = block.decode(x, pos, slot, masks, kv_cache)
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

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None):
        """Token ids idx (B, T) -> (logits, loss).

        Without targets: logits (B, T, vocab) and loss None. With targets (B, T): logits None and loss the
        mean cross-entropy over targets that are not -100; the loss is computed chunk by chunk together with
        the LM head, so the (B, T, vocab) logits, training's largest tensor, never exist.
        """
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return F.linear(x, self.wte.weight), None  # LM head tied to wte
        return None, lm_head_cross_entropy(x.flatten(0, 1), self.wte.weight, targets.flatten())

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
        if (weight.device.type != "cpu" or weight.dtype != torch.float32 or (self.training and self.config.dropout)
                or batch_size * self.config.n_embd > NATIVE_MAX_ROWS_X_WIDTH):
            return "eager"
        try:
            from native import load_library  # builds decode.c once per process; the one file model.py runs

            load_library()
            return "native"
        except (ImportError, RuntimeError):
            return "eager"

    def per_token_step(self, backend: str, device):
        """The step function of a backend choose_backend named (decode_step's interface)."""
        if backend == "native":
            from native import native_decode_step

            return native_decode_step(self)
        return self._compiled_decode_step(device) if backend == "compile" else self.decode_step

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, eos_token_id: int | None = None,
                        generator: torch.Generator | None = None, compile: bool = False, step=None,
                        backend: str = "auto"):
        """Yield the next tokens (B, 1) one step at a time, as `generate` appends them."""
        check_sampling_args(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be a (batch, tokens) tensor with at least one token, got shape {tuple(idx.shape)}")
        B, T = idx.size()
        backend = self.choose_backend("compile" if compile else backend, B) if step is None else "step"
        limit = self.config.max_position_embeddings
        if T + max_new_tokens > limit:
            raise ValueError(f"cannot generate {max_new_tokens} tokens after a {T}-token prompt: the model's "
                             f"context is {limit} tokens (max_position_embeddings); lower max_new_tokens to "
                             f"{max(limit - T, 0)} or shorten the prompt")
        if max_new_tokens == 0:
            return
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.wte.weight.dtype)
        logits = F.linear(self.hidden_states(idx, cache)[:, -1], self.wte.weight)  # (B, vocab)
        compiled = backend == "compile"
        step = step or self.per_token_step(backend, idx.device)
        pos = torch.tensor([T], device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            x = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_token_id is not None:
                x = x.masked_fill(done[:, None], eos_token_id)
                done |= x[:, 0] == eos_token_id
            yield x
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

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "GPTNeo":
        """Load a TinyLM checkpoint or Hugging Face GPT-Neo folder (config.json + model.safetensors or
        pytorch_model.bin), or a hub id such as 'roneneldan/TinyStories-1M' when the hub can be reached."""
        folder = resolve_pretrained(name_or_path)
        config_file = os.path.join(folder, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{folder} has no config.json; point at a TinyLM checkpoint or a "
                                    "Hugging Face GPT-Neo model folder")
        try:
            with open(config_file, encoding="utf-8") as f:
                hf_config = json.load(f)
            config = GPTNeoConfig.from_hf_dict(hf_config)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            detail = f"it lacks {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{config_file} cannot be read ({detail}): the checkpoint is damaged or not a GPT-Neo "
                             "model; save or download it again") from None
        model = cls(config)
        # its own shapes, not a second model built on "meta", whose initialization imports torch._dynamo (0.8 s)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        model.load_state_dict(hf_to_tinylm_state_dict(read_weights(folder), config, expected), strict=True)
        return model.eval()

    def save_pretrained(self, folder: str):
        """Write config.json and model.safetensors in transformers' GPT-Neo layout. Mixed layers are
        recorded so that TinyLM reloads them and transformers refuses them."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tinylm_to_hf_state_dict(self.state_dict()).items()}
        atomic_write(os.path.join(folder, "model.safetensors"), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        config = {**self.config.to_hf_dict(), "dtype": str(self.wte.weight.dtype).removeprefix("torch.")}
        atomic_write(os.path.join(folder, "config.json"), lambda p: write_text(p, json.dumps(config, indent=2) + "\n"))


def matvec(x, weight, bias=None):
    """F.linear for one token per row. Under torch.compile it is a broadcast multiply and sum, which Inductor
    turns into vectorized loops fused with their neighbours: on CPU the LM head's (1, C) x (C, vocab) GEMV,
    half of a small model's time per token, runs 2x faster that way than through MKL (0.13 vs 0.29 ms for
    TinyStories-1M on 2 threads), and the layers' small GEMVs lose their call overhead."""
    if not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    y = (x.unsqueeze(-2) * weight).sum(dim=-1)
    return y if bias is None else y + bias


def lm_head_cross_entropy(h, weight, targets, rows: int | None = None, vocab_block: int | None = None):
    """cross_entropy(h @ weight.T, targets, ignore_index=-100) for h (N, C), without building (N, vocab).

    The logits exist only as blocks of `rows` tokens x `vocab_block` vocabulary entries. On CPU the blocks
    are cache-sized: with C this small (64-768) that runs 1.5-2x the FLOP/s of one (rows, vocab) matmul
    (MKL, measured on a 2-core EPYC). Elsewhere one block spans the vocabulary, to launch fewer kernels."""
    cpu = h.device.type == "cpu"
    rows = rows or (512 if cpu else max(1, 2 ** 26 // weight.size(0)))
    vocab_block = vocab_block or (2048 if cpu else weight.size(0))
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        # under autocast (mixed-precision training) the matmuls run in its dtype; softmax and the loss stay fp32
        matmul_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else None
        return _LMHeadCrossEntropy.apply(h, weight, targets, rows, vocab_block, matmul_dtype)
    valid = targets != -100
    total = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(total.dtype)
        for s in range(0, h.size(0), rows):
            hc, tc = h[s:s + rows].to(total.dtype), targets[s:s + rows].clamp(min=0)
            _, row_max, sum_exp = _exp_logit_blocks(hc, w, vocab_block)
            total += ((row_max + sum_exp.log())[:, 0] - (hc * w[tc]).sum(dim=1))[valid[s:s + rows]].sum()
    return total / valid.sum().clamp(min=1)


def _exp_logit_blocks(hc, w, vocab_block: int, dtype=None):
    """exp(logits - row max) for hc (n, C) against w (vocab, C) as a list of (n, vocab_block) blocks in `dtype`
    (default: hc's), with the row max (n, 1) and the row sum of the exponentials (n, 1)."""
    blocks = [(hc @ w[v:v + vocab_block].t()).to(dtype or hc.dtype) for v in range(0, w.size(0), vocab_block)]
    row_max = torch.stack([b.amax(dim=1) for b in blocks]).amax(dim=0)[:, None]
    sum_exp = sum(b.sub_(row_max).exp_().sum(dim=1, keepdim=True) for b in blocks)
    return blocks, row_max, sum_exp


class _LMHeadCrossEntropy(torch.autograd.Function):
    """Fused LM head + cross-entropy: forward also computes the gradients block by block (the trick of
    Liger-Kernel's FusedLinearCrossEntropy); backward only scales them. Softmax runs in fp32; with matmul_dtype
    (bf16 under autocast) the three products run in it, which on a CPU with AMX makes this 2x faster."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows, vocab_block, matmul_dtype):
        dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for fp64 weights
        valid = targets != -100
        scale = 1.0 / valid.sum().clamp(min=1).to(dtype)
        grad_h = torch.empty_like(h, dtype=dtype) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=dtype) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=dtype, device=h.device)
        low = matmul_dtype is not None and matmul_dtype != dtype  # the three matmuls in bf16, the rest in fp32
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            w_mm = w.to(matmul_dtype) if low else w
            for s in range(0, h.size(0), rows):
                hc, tc = h[s:s + rows].to(dtype), targets[s:s + rows].clamp(min=0)
                hc_mm = hc.to(matmul_dtype) if low else hc
                target_w, row_scale = w[tc], (valid[s:s + rows] * scale)[:, None]  # (n, C), (n, 1)
                blocks, row_max, sum_exp = _exp_logit_blocks(hc_mm, w_mm, vocab_block, dtype)
                total += (((row_max + sum_exp.log())[:, 0] - (hc * target_w).sum(dim=1)) * row_scale[:, 0]).sum()
                # d loss / d logits = row_scale * (softmax - onehot(target)); the onehot part is added apart
                softmax_scale = row_scale / sum_exp
                gh = -row_scale * target_w if grad_h is not None else None
                for v, probs in zip(range(0, w.size(0), vocab_block), blocks):
                    probs = probs.mul_(softmax_scale).to(w_mm.dtype)
                    # a bf16 product is added to the fp32 gradient (addmm_ cannot mix dtypes)
                    if gh is not None:
                        gh.add_(probs @ w_mm[v:v + vocab_block]) if low else gh.addmm_(probs, w_mm[v:v + vocab_block])
                    if grad_w is not None:
                        gw = grad_w[v:v + vocab_block]
                        gw.add_(probs.t() @ hc_mm) if low else gw.addmm_(probs.t(), hc_mm)
                if grad_w is not None:
                    grad_w.index_add_(0, tc, -row_scale * hc)
                if gh is not None:
                    grad_h[s:s + rows] = gh
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = (grad_h * grad_loss).to(ctx.dtypes[0]) if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.dtypes[1]) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


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
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ---- checkpoint I/O, used only by from_pretrained / save_pretrained ----

def resolve_pretrained(name_or_path: str) -> str:
    """A local folder as is; 'owner/name' that is not a local path is fetched from the Hugging Face hub."""
    if os.path.isdir(name_or_path):
        return name_or_path
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"no model folder at {name_or_path!r}; pass a checkpoint folder or a hub id like "
                                "'roneneldan/TinyStories-1M'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"])
    except Exception as e:
        raise OSError(f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: no folder of "
                      "that name here and the hub is unreachable or lacks it); download the model on a machine "
                      "with network access and pass its local folder instead") from e


def read_weights(folder: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        files = ["pytorch_model.bin"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin; is the checkpoint complete?")
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        try:
            if name.endswith(".bin"):
                state.update(torch.load(path, map_location="cpu", weights_only=True))
            else:
                state.update(load_file(path))
        except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise ValueError(f"could not read {path}: the file is truncated or corrupt ({e}); save or download "
                             "the checkpoint again") from e
    return state


def hf_to_tinylm_state_dict(hf_state: dict, config: GPTNeoConfig, expected: dict | None = None) -> dict:
    """transformers GPT-Neo state dict -> ours; checks every key and shape against `config` (or `expected`, the
    {name: shape} of a model of that config, when the caller has one)."""
    if expected is None:
        with torch.device("meta"):
            expected = {k: v.shape for k, v in GPTNeo(config).state_dict().items()}
    ours, lm_head = {}, None
    for name, tensor in hf_state.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.attention.bias", ".attn.attention.masked_bias")):
            continue  # GPT-Neo's precomputed mask buffers, saved by transformers 4.x
        if name == "lm_head.weight":
            lm_head = tensor
            continue
        ours[name.replace(".attn.attention.", ".attn.")] = tensor
    missing, unexpected = sorted(expected.keys() - ours.keys()), sorted(ours.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match its config.json: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    for name, shape in expected.items():
        if ours[name].shape != shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(ours[name].shape)}, config.json implies "
                             f"{tuple(shape)}")
    if lm_head is not None and not torch.equal(lm_head.to(ours["wte.weight"].dtype), ours["wte.weight"]):
        raise ValueError("checkpoint's lm_head.weight differs from transformer.wte.weight; TinyLM needs a tied LM head")
    return ours


def tinylm_to_hf_state_dict(state: dict) -> dict:
    """Ours -> transformers GPT-Neo names (the tied lm_head is left out, as transformers saves it)."""
    return {"transformer." + k.replace(".attn.", ".attn.attention."): v for k, v in state.items()}
