"""Look inside a GPT-Neo: what each head attends to, what each layer would predict, what each MLP neuron does.

    seen = inside(model, idx)                # idx (1, T): a forward pass of its own, the normal paths untouched
    seen["attention"][layer]                 # (n_head, T, T): the softmax probabilities the forward pass uses
    head_stats(seen["attention"][layer])     # per head: mean distance attended, weight on the previous token, entropy
    logit_lens(model, seen["residual"], t)   # each layer's top 5 next tokens at position t, the real output last
    seen["neurons"][layer][:, i]             # neuron i of a layer's MLP on every token

The pass computes attention as softmax(q k^T) with GPT-Neo's masks written out (no 1/sqrt(head size) scale, the
first local_heads[layer] heads local: a query sees its last window_size keys), so the weights are the ones
transformers returns with output_attentions=True. It runs in fp32 and costs what a forward pass with the (T, T)
scores written out costs: fine for a text of a model's context, never used in training or generation.
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def inside(model, idx: torch.Tensor) -> dict:
    """For token ids idx (1, T): attention (per layer, (n_head, T, T)), residual (per layer, the stream after it,
    (T, C); entry 0 is the embedding), neurons (per layer, the MLP's hidden activation after GELU, (T, inner)),
    local (per layer, how many of its heads are local) and logits (T, vocab), the model's output."""
    config = model.config
    T = idx.size(1)
    if idx.dim() != 2 or idx.size(0) != 1 or not 1 <= T <= config.max_position_embeddings:
        raise ValueError(f"inside() takes one sequence of 1 to {config.max_position_embeddings} token ids, shape "
                         f"(1, T); got {tuple(idx.shape)}")
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    band = causal & ~causal.tril(-config.window_size)  # a local head's query sees its last window_size keys
    x = (model.wte(idx) + model.wpe.weight[:T])[0].float()  # (T, C)
    seen = {"attention": [], "residual": [x], "neurons": [], "local": list(config.local_heads)}
    for layer, block in enumerate(model.h):
        attn, nh, nl = block.attn, config.n_head, config.local_heads[layer]
        qkv = F.linear(block.ln_1(x), attn.qkv_weight()).view(T, 3, nh, -1).permute(1, 2, 0, 3)  # (3, nh, T, hd)
        scores = qkv[0] @ qkv[1].transpose(-1, -2)  # (nh, T, T), unscaled as in GPT-Neo
        allowed = torch.stack([band if head < nl else causal for head in range(nh)])
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = (probs @ qkv[2]).transpose(0, 1).reshape(T, -1)  # (nh, T, hd) -> (T, C)
        x = x + attn.out_proj(y)
        hidden = F.gelu(block.mlp.c_fc(block.ln_2(x)), approximate="tanh")  # (T, inner)
        x = x + block.mlp.c_proj(hidden)
        seen["attention"].append(probs)
        seen["neurons"].append(hidden)
        seen["residual"].append(x)
    seen["logits"] = F.linear(model.ln_f(x), model.wte.weight)
    return seen


def head_stats(probs: torch.Tensor) -> list[dict]:
    """Per head of a layer's attention (n_head, T, T), averaged over the queries: the mean distance back to the
    keys attended (0: itself), the weight on the previous token (queries 1 on), and the entropy in nats. Distance
    heads show a small, steady distance and a high previous weight; content heads a spread that varies."""
    T = probs.size(-1)
    positions = torch.arange(T, device=probs.device, dtype=probs.dtype)
    distance = (probs * (positions[:, None] - positions[None, :]).clamp(min=0)).sum(-1).mean(-1)  # (nh,)
    previous = probs.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1) if T > 1 else torch.zeros(probs.size(0))
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum(-1).mean(-1)
    return [{"distance": d, "previous": p, "entropy": e}
            for d, p, e in zip(distance.tolist(), previous.tolist(), entropy.tolist())]


@torch.no_grad()
def logit_lens(model, residual: list[torch.Tensor], position: int, top: int = 5) -> list[list[tuple[int, float]]]:
    """What each layer's residual stream at `position` would predict, read through the final LayerNorm and the
    LM head: per layer (the embedding first, the last layer's being the model's real output) the top (id,
    probability) pairs of the next token."""
    stack = torch.stack([r[position] for r in residual])  # (n_layer + 1, C)
    probs = F.linear(model.ln_f(stack), model.wte.weight).float().softmax(-1)
    best = probs.topk(top, dim=-1)
    return [list(zip(i.tolist(), p.tolist())) for p, i in zip(best.values, best.indices)]


@torch.no_grad()
def heads_over(model, texts: list[list[int]]) -> list[list[dict]]:
    """Each head's head_stats averaged over several token sequences (each cut to the model's context), weighted by
    their tokens, with its type: per layer, per head {"type": "local" | "global", "distance", "previous",
    "entropy"}. What evaluate.py's report shows of each model's heads."""
    config, device = model.config, model.wte.weight.device
    totals, weight = None, 0
    for ids in texts:
        ids = ids[:config.max_position_embeddings]
        if len(ids) < 2:
            continue
        seen = inside(model, torch.tensor([ids], device=device))
        stats = [head_stats(probs) for probs in seen["attention"]]
        if totals is None:
            totals = [[{k: 0.0 for k in head} for head in layer] for layer in stats]
        for total_layer, layer in zip(totals, stats):
            for total, head in zip(total_layer, layer):
                for k, v in head.items():
                    total[k] += v * len(ids)
        weight += len(ids)
    if totals is None:
        return []
    return [[{"type": "local" if h < config.local_heads[layer] else "global",
              **{k: v / weight for k, v in head.items()}} for h, head in enumerate(heads)]
            for layer, heads in enumerate(totals)]
