"""Training's LM head and loss, fused: cross_entropy(h @ wte.T, targets) for GPTNeo.forward without the (tokens,
vocab) logits, in blocks of PyTorch operations (any device and dtype; bf16 products under autocast), or on CPU in
fp32 at small widths by lmhead.c (native.py).

    loss = lm_head_cross_entropy(hidden.flatten(0, 1), model.wte.weight, targets.flatten())
"""

import torch

# Training's LM head and loss on CPU in fp32 runs lmhead.c (native.native_lm_head_cross_entropy) at widths that are
# multiples of 64 up to this, where it beats the blocked PyTorch path. bench/bench_thresholds.py, fwd + bwd of 4096
# tokens (Xeon with AMX, 2 runs): 1.22-1.26x at width 64 and vocab 50257, 1.06-1.21x at vocab 4000; at 128 a tie
# with vocab 50257 (0.95-1.01x) and 0.82x with vocab 4000 (the quickstart's shape: its fp32 step 1.08-1.10x faster
# without it), 0.7-0.8x at 192 and 256. Earlier measurements had 1.1-1.2x at 128; 0 turns it off. Which builds
# run it at all (gcc, OpenMP, AVX-512's 16-float vectors): native.faster_here
NATIVE_LM_HEAD_MAX_WIDTH = 64


def lm_head_cross_entropy(h, weight, targets, rows: int | None = None, vocab_block: int | None = None,
                          c_kernel: bool = True):
    """cross_entropy(h @ weight.T, targets, ignore_index=-100) for h (N, C), without building (N, vocab).

    The logits exist only as blocks of `rows` tokens x `vocab_block` vocabulary entries. On CPU the blocks
    are cache-sized: with C this small (64-768) that runs 1.5-2x the FLOP/s of one (rows, vocab) matmul
    (MKL, measured on a 2-core EPYC). Elsewhere one block spans the vocabulary, to launch fewer kernels. c_kernel
    False keeps training off lmhead.c where native_lm_head_runs would take it."""
    cpu, training = h.device.type == "cpu", torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    # under autocast (mixed-precision training) the matmuls run in its dtype; softmax and the loss stay fp32
    autocast = training and torch.is_autocast_enabled(h.device.type)
    matmul_dtype = torch.get_autocast_dtype(h.device.type) if autocast else None
    low = matmul_dtype is not None and matmul_dtype.itemsize < 4  # bf16 (or fp16) products
    # On CPU, blocks of 2^20 logits (4 MB in fp32). bf16 matmuls 256 wide or more run the LM head 14% faster
    # with 1024 rows x 1024 entries than with 512 x 2048 (TinyStories-8M; no difference at widths 64-192), and
    # with lmhead.c's softmax passes 2048 rows run it 10-15% faster again (half the (rows, C) products to add up).
    wide_low = low and h.size(1) >= 256
    rows = rows or ((2048 if wide_low else 512) if cpu else max(1, 2 ** 26 // weight.size(0)))
    vocab_block = vocab_block or ((1024 if wide_low else 2048) if cpu else weight.size(0))
    if training and not low and c_kernel and native_lm_head_runs(h, weight):
        return _NativeLMHeadCrossEntropy.apply(h, weight, targets)
    if training:
        # Recompute each block's logits for the gradient pass (a third more matmul work) when keeping a row
        # chunk's logits would overflow the cache (over 64 MB) and the matmuls are cheap next to sending every
        # elementwise pass to memory: bf16 on AMX, or fp32 as narrow as 128. Measured, LM head fwd + bwd, 4096
        # tokens: 1.09-1.18x at vocab 50257 width 64 (fp32 and bf16), 1.06-1.12x at width 256 in bf16; 0.88x at
        # width 256 in fp32 and 0.71-0.82x at vocab 4000 (the recipes), which keep their blocks.
        large = rows * weight.size(0) * 4 > 64 << 20
        recompute = cpu and large and (low or h.size(1) <= 128)
        return _LMHeadCrossEntropy.apply(h, weight, targets, rows, vocab_block, matmul_dtype, recompute)
    valid = targets != -100
    total = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(total.dtype)
        for s in range(0, h.size(0), rows):
            hc, tc = h[s:s + rows].to(total.dtype), targets[s:s + rows].clamp(min=0)
            row_max, sum_exp = _row_logsumexp(hc, w, vocab_block, total.dtype)
            total += ((row_max + sum_exp.log())[:, 0] - (hc * w[tc]).sum(dim=1))[valid[s:s + rows]].sum()
    return total / valid.sum().clamp(min=1)


def native_lm_head_runs(h, weight) -> bool:
    """Whether lmhead.c runs the LM head and loss of training: fp32 on CPU, a width it wins at, a C compiler, and not
    under torch.compile."""
    if h.size(1) % 64 or h.size(1) > NATIVE_LM_HEAD_MAX_WIDTH:
        return False
    from tinylm.kernels.native import trains_natively

    return trains_natively("lmhead", h, weight)


class _NativeLMHeadCrossEntropy(torch.autograd.Function):
    """lm_head_cross_entropy by lmhead.c: forward computes the loss and both gradients, backward scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        from tinylm.kernels.native import native_lm_head_cross_entropy

        loss, grad_h, grad_w = native_lm_head_cross_entropy(h.detach(), weight.detach(), targets)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None


def _exp_logit_blocks(hc, w, vocab_block: int, dtype=None):
    """exp(logits - row max) for hc (n, C) against w (vocab, C) as a list of (n, vocab_block) blocks in `dtype`
    (default: hc's), with the row max (n, 1) and the row sum of the exponentials (n, 1)."""
    blocks = [(hc @ w[v:v + vocab_block].t()).to(dtype or hc.dtype) for v in range(0, w.size(0), vocab_block)]
    row_max = torch.stack([b.amax(dim=1) for b in blocks]).amax(dim=0)[:, None]
    sum_exp = sum(b.sub_(row_max).exp_().sum(dim=1, keepdim=True) for b in blocks)
    return blocks, row_max, sum_exp


def _row_logsumexp(hc, w, vocab_block: int, dtype, kernels=None):
    """(row max (n, 1), row sum of exp(logits - row max) (n, 1)) of the logits hc @ w.T, in `dtype`, one
    (n, vocab_block) block at a time: each block is reduced while it is in cache and dropped; the running sum is
    rescaled when a block raises the max (online softmax). Nothing of the size of the vocabulary is kept.
    kernels: native.bf16_softmax_kernels(), which take in bf16 blocks in one pass."""
    row_max = torch.full((hc.size(0), 1), float("-inf"), dtype=dtype, device=hc.device)
    sum_exp = torch.zeros_like(row_max)
    for v in range(0, w.size(0), vocab_block):
        if kernels is not None:
            kernels.lse_update(hc @ w[v:v + vocab_block].t(), row_max, sum_exp)
            continue
        logits = (hc @ w[v:v + vocab_block].t()).to(dtype)
        new_max = torch.maximum(row_max, logits.amax(dim=1, keepdim=True))
        sum_exp = sum_exp.mul_((row_max - new_max).exp_()).add_(logits.sub_(new_max).exp_().sum(dim=1, keepdim=True))
        row_max = new_max
    return row_max, sum_exp


class _LMHeadCrossEntropy(torch.autograd.Function):
    """Fused LM head + cross-entropy: forward also computes the gradients block by block (the trick of
    Liger-Kernel's FusedLinearCrossEntropy); backward only scales them. Softmax runs in fp32; with matmul_dtype
    (bf16 under autocast) the three products run in it, which on a CPU with AMX makes this 2x faster."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows, vocab_block, matmul_dtype, recompute):
        dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 for fp64 weights
        valid = targets != -100
        scale = 1.0 / valid.sum().clamp(min=1).to(dtype)
        grad_h = torch.empty_like(h, dtype=dtype) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=dtype) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=dtype, device=h.device)
        low = matmul_dtype is not None and matmul_dtype != dtype  # the three matmuls in bf16, the rest in fp32
        kernels = None  # recomputed bf16 blocks on CPU: lmhead.c's softmax passes where it builds
        if recompute and matmul_dtype == torch.bfloat16 and dtype == torch.float32 and h.device.type == "cpu":
            from tinylm.kernels.native import bf16_softmax_kernels

            kernels = bf16_softmax_kernels()
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            w_mm = w.to(matmul_dtype) if low else w
            for s in range(0, h.size(0), rows):
                hc, tc = h[s:s + rows].to(dtype), targets[s:s + rows].clamp(min=0)
                hc_mm = hc.to(matmul_dtype) if low else hc
                target_w, row_scale = w[tc], (valid[s:s + rows] * scale)[:, None]  # (n, C), (n, 1)
                if recompute:
                    row_max, sum_exp = _row_logsumexp(hc_mm, w_mm, vocab_block, dtype, kernels)
                else:
                    blocks, row_max, sum_exp = _exp_logit_blocks(hc_mm, w_mm, vocab_block, dtype)
                total += (((row_max + sum_exp.log())[:, 0] - (hc * target_w).sum(dim=1)) * row_scale[:, 0]).sum()
                # d loss / d logits = softmax_scale * exps - row_scale * onehot(target), the onehot part added
                # apart. softmax_scale (n, 1) scales rows, so it multiplies the (n, C) matrices on either side of
                # each block's products rather than the (n, vocab_block) blocks.
                softmax_scale = row_scale / sum_exp
                gh = torch.zeros_like(hc) if grad_h is not None else None
                hs = (hc * softmax_scale).to(w_mm.dtype) if grad_w is not None else None
                for v in range(0, w.size(0), vocab_block):
                    w_block = w_mm[v:v + vocab_block]
                    # recomputed: the block's logits again, made exponentials and used by both products in cache
                    if kernels is not None:
                        exps = kernels.exp_(hc_mm @ w_block.t(), row_max)
                    else:
                        exps = ((hc_mm @ w_block.t()).to(dtype).sub_(row_max).exp_() if recompute
                                else blocks[v // vocab_block]).to(w_mm.dtype)
                    # a bf16 product is added to the fp32 gradient (addmm_ cannot mix dtypes)
                    if gh is not None:
                        gh.add_(exps @ w_block) if low else gh.addmm_(exps, w_block)
                    if grad_w is not None:
                        gw = grad_w[v:v + vocab_block]
                        gw.add_(exps.t() @ hs) if low else gw.addmm_(exps.t(), hs)
                if grad_w is not None:
                    grad_w.index_add_(0, tc, -row_scale * hc)
                if gh is not None:
                    grad_h[s:s + rows] = gh.mul_(softmax_scale).sub_(row_scale * target_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = (grad_h * grad_loss).to(ctx.dtypes[0]) if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.dtypes[1]) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None
