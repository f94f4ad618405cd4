"""lm_head.py: the fused LM head and loss equal cross_entropy of the logits, blocked, recomputed and in bf16."""

import pytest
import torch
import torch.nn.functional as F

from tinylm.modeling.lm_head import _LMHeadCrossEntropy, lm_head_cross_entropy


def test_mixed_precision_lm_head_multiplies_in_bf16_and_takes_the_softmax_in_fp32():
    # under autocast the fused LM head multiplies in bf16 (nanoGPT's autocast does the same), then takes the
    # softmax and the loss in fp32: the loss and gradients are fp32, within bf16 rounding of the exact ones
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=g)
    targets[:3] = -100
    exact = F.cross_entropy(h @ w.t(), targets)
    exact_grads = torch.autograd.grad(exact, (h, w))
    for recompute in (False, True):  # blocks kept for the gradient pass, or recomputed (large vocabularies)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _LMHeadCrossEntropy.apply(h, w, targets, 16, 32, torch.bfloat16, recompute)
        assert loss.dtype == torch.float32 and loss.item() != exact.item()
        torch.testing.assert_close(loss, exact, rtol=4e-3, atol=0)
        for got, want in zip(torch.autograd.grad(loss, (h, w)), exact_grads):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what training calls picks the same bf16 products
        loss = lm_head_cross_entropy(h, w, targets, rows=16, vocab_block=32)
    torch.testing.assert_close(loss, exact, rtol=4e-3, atol=0)


@pytest.mark.parametrize("rows, vocab_block", [(5, 7), (64, 2048)])
def test_blocked_lm_head_cross_entropy_equals_cross_entropy(rows, vocab_block):
    # Several row chunks and vocab blocks, both with a short last one, and ignored targets.
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (23,), generator=g)
    targets[[0, 6, 7, 22]] = -100
    ref = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, (h, w))
    for recompute in (False, True):  # blocks kept for the gradient pass, or recomputed (large vocabularies)
        loss = _LMHeadCrossEntropy.apply(h, w, targets, rows, vocab_block, None, recompute)
        grads = torch.autograd.grad(loss, (h, w))
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lm_head_cross_entropy(h, w, targets, rows, vocab_block), ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(lm_head_cross_entropy(h, w, targets, rows, vocab_block), ref, rtol=1e-12, atol=1e-12)
