"""GPT-Neo, as used by TinyStories (Eldan & Li 2023, arXiv 2305.07759): the architecture and its fused training loss.

Computes exactly what Hugging Face's `transformers.GPTNeoForCausalLM` computes (reference:
transformers/models/gpt_neo/modeling_gpt_neo.py): learned positions, pre-LayerNorm blocks, attention
WITHOUT 1/sqrt(head_dim) scaling, gelu_new MLP, LM head tied to the token embedding. On top of GPT-Neo's
per-layer choice of local (sliding window) or global attention, a layer may mix both: its first
`local_heads` heads are local, the rest global.

What it is built from, in tinylm/modeling/: lm_head.py (training's fused LM head and loss), generation.py (KV
cache, per-token decoding, sampling: `model.generate`), hf_weights.py (transformers' files, read and written for
`GPTNeo.from_pretrained` / `.save_pretrained`); in tinylm/kernels/: native.py and its C files (CPU attention for
training, the fast decoding step).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.hub import resolve_pretrained
from tinylm.modeling.generation import GenerationMixin, KVCache
from tinylm.modeling.hf_weights import hf_to_tinylm_state_dict, read_config, read_weights, write_pretrained
from tinylm.modeling.lm_head import lm_head_cross_entropy, native_lm_head_runs

ATTENTION_TYPES = ("global", "local", "mixed")
CPU_QUERY_CHUNK = 64  # see SelfAttention._attend
# Training attention on CPU in fp32 runs attention.c (native.native_attention) up to this head size, where it beats
# scaled_dot_product_attention (a 2-layer model's forward + backward at batch 8 x 512: 2.0x at head size 4, 1.3-1.4x
# at 8, 1.00-1.06x at 16, where whole training steps of TinyStories-8M and the quickstart came out 0.92-1.07x);
# 0 turns it off
NATIVE_ATTENTION_MAX_HEAD_DIM = 8
# the C training kernels: attention.c (above) and lmhead.c (lm_head.NATIVE_LM_HEAD_MAX_WIDTH)
C_KERNELS = ("attention", "lmhead")


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
    dropout: float = 0.0  # embedding and residual dropout (GPT-Neo's embed_dropout and resid_dropout)
    # dropout on the attention probabilities; None: the same as dropout. On a CPU any value above 0 takes
    # PyTorch's math attention, about twice the step time, where dropout alone costs about 15%.
    attention_dropout: float | None = None
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
        if self.attention_dropout is None:
            self.attention_dropout = self.dropout
        for name in ("dropout", "attention_dropout"):
            if not isinstance(getattr(self, name), (int, float)) or not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

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
    def has_dropout(self) -> bool:
        """True when training drops anything (embeddings, residuals or attention): the native step cannot."""
        return self.dropout > 0 or self.attention_dropout > 0

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
            "attention_dropout": self.attention_dropout,
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
        dropout = max(float(d.get(k, 0.0) or 0.0) for k in ("embed_dropout", "resid_dropout"))
        return cls(
            vocab_size=d["vocab_size"], max_position_embeddings=d["max_position_embeddings"],
            n_layer=d["num_layers"], n_head=d["num_heads"], n_embd=d["hidden_size"],
            window_size=d.get("window_size", 256), attention_types=types if "local_heads" not in d else None,
            local_heads=d.get("local_heads"), intermediate_size=d.get("intermediate_size"),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5), dropout=dropout,
            attention_dropout=float(d.get("attention_dropout", 0.0) or 0.0),
            bos_token_id=d.get("bos_token_id", 50256), eos_token_id=d.get("eos_token_id", 50256),
        )



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
        self.attention_dropout = config.attention_dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.c_kernel = True  # attention.c where native_attention_runs; GPTNeo.allow_c_kernels sets it

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


    def _attend(self, q, k, v, start, masks, local):
        """q (B, nh, T, hd) holds positions start..start+T-1; k, v hold the S positions ending at the same place."""
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU mixed precision: PyTorch's CPU flash-attention backward runs ~4x slower in bf16 than in fp32
            # (torch 2.13, head_dim 16-24), and attention is a small share of the FLOPs: keep it in fp32.
            with torch.autocast("cpu", enabled=False):
                return self._attend(q.float(), k.float(), v.float(), start, masks, local)
        T, S = q.size(2), k.size(2)
        dropout = self.attention_dropout if self.training else 0.0
        if T == S > 1 and start == 0 and not dropout and self.c_kernel and native_attention_runs(q):
            from tinylm.kernels.native import native_attention

            return native_attention(q, k, v, self.window_size if local else 0)
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


def native_attention_runs(q) -> bool:
    """Whether attention.c runs q's attention: fp32 on CPU, a head size it wins at, a C compiler to build it (once
    per machine, see native.py), and not under torch.compile (which cannot trace a C call)."""
    if q.size(-1) > NATIVE_ATTENTION_MAX_HEAD_DIM:
        return False
    from tinylm.kernels.native import trains_natively

    return trains_natively("attention", q)


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


class GPTNeo(GenerationMixin, nn.Module):  # generate(): generation.py
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
        self.allow_c_kernels(C_KERNELS)

    @staticmethod
    def _init_weights(module):
        # GPT-Neo's initialisation (transformers' GPTNeoPreTrainedModel._init_weights).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def allow_c_kernels(self, kernels=C_KERNELS):
        """Which C kernels fp32 training on CPU may run where their size and build rules take this model: both by
        default; train.dtype = auto leaves out one it measured slower on this machine (training/precision.py)."""
        self.allowed_c_kernels = tuple(k for k in C_KERNELS if k in kernels)
        for block in self.h:
            block.attn.c_kernel = "attention" in kernels

    def c_kernels(self) -> list[str]:
        """The C kernels that fp32 training of this model on its device runs: those allowed whose rules take it."""
        device, hd = self.wte.weight.device, self.config.n_embd // self.config.n_head
        takes = {"attention": lambda: native_attention_runs(torch.empty(1, 1, 2, hd, device=device)),
                 "lmhead": lambda: native_lm_head_runs(torch.empty(2, self.config.n_embd, device=device),
                                                       self.wte.weight)}
        return [k for k in self.allowed_c_kernels if takes[k]()]

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


    def forward(self, idx, targets=None, kv_cache: KVCache | None = None):
        """Token ids idx (B, T) -> (logits, loss).

        Without targets: logits (B, T, vocab) and loss None. With targets (B, T): logits None and loss the
        mean cross-entropy over targets that are not -100; the loss is computed chunk by chunk together with
        the LM head, so the (B, T, vocab) logits, training's largest tensor, never exist.
        """
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return F.linear(x, self.wte.weight), None  # LM head tied to wte
        return None, lm_head_cross_entropy(x.flatten(0, 1), self.wte.weight, targets.flatten(),
                                           c_kernel="lmhead" in self.allowed_c_kernels)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "GPTNeo":
        """Load a TinyLM checkpoint or Hugging Face GPT-Neo folder (config.json + model.safetensors or
        pytorch_model.bin), or a hub id such as 'roneneldan/TinyStories-1M' when the hub can be reached."""
        folder = resolve_pretrained(name_or_path)
        model = cls(read_config(folder, GPTNeoConfig.from_hf_dict))
        # its own state dict gives the names and shapes to check, not a second model built on "meta", whose
        # initialization imports torch._dynamo (0.8 s)
        model.load_state_dict(hf_to_tinylm_state_dict(read_weights(folder), model.state_dict()), strict=True)
        return model.eval()

    def save_pretrained(self, folder: str):
        """Write config.json and model.safetensors in transformers' GPT-Neo layout. Mixed layers are
        recorded so that TinyLM reloads them and transformers refuses them."""
        hf_config = {**self.config.to_hf_dict(), "dtype": str(self.wte.weight.dtype).removeprefix("torch.")}
        write_pretrained(folder, hf_config, self.state_dict())
