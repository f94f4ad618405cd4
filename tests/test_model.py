"""model.py against transformers' GPTNeoForCausalLM (random weights, built locally, no network)."""

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoForCausalLM

from conftest import DEVICE, FP32_TOLERANCE
from helpers import MIXED, SHAPES, assert_logits_close, make_hf, sharpen_
from model import GPTNeo, GPTNeoConfig
from tinylm.modeling.hf_weights import hf_to_tinylm_state_dict

SEQ_LEN = {"tinystories_1M": 300, "odd_small": 50}  # both longer than the window


def save_legacy_bin(hf: GPTNeoForCausalLM, folder: str):
    """The 2023-era layout of the TinyStories repos: pytorch_model.bin with the attention mask buffers and
    no lm_head.weight."""
    os.makedirs(folder, exist_ok=True)
    hf.config.to_json_file(os.path.join(folder, "config.json"))
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    n, w = hf.config.max_position_embeddings, hf.config.window_size
    for i, kind in enumerate(hf.config.attention_layers):
        bias = torch.tril(torch.ones(n, n, dtype=torch.bool))
        if kind == "local":
            bias = bias ^ torch.tril(bias, -w)
        state[f"transformer.h.{i}.attn.attention.bias"] = bias.view(1, 1, n, n)
        state[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))


@pytest.fixture(scope="module", params=list(SHAPES))
def hf_folders(request, tmp_path_factory):
    shape = request.param
    hf = make_hf(shape)
    root = tmp_path_factory.mktemp(shape)
    hf.save_pretrained(root / "safetensors")
    save_legacy_bin(hf, str(root / "bin"))
    return shape, hf, root


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_logits_match_transformers(hf_folders, layout):
    shape, hf, root = hf_folders
    assert os.path.exists(root / layout / ("model.safetensors" if layout == "safetensors" else "pytorch_model.bin"))
    ours = GPTNeo.from_pretrained(str(root / layout)).to(DEVICE)
    idx = torch.randint(0, hf.config.vocab_size, (2, SEQ_LEN[shape]), generator=torch.Generator().manual_seed(1))
    idx = idx.to(DEVICE)
    with torch.no_grad():
        ref = hf.to(DEVICE)(idx).logits
        logits, loss = ours(idx)
    assert loss is None
    assert ref.std() > 1.0  # the comparison means something
    assert_logits_close(logits, ref)


def test_training_loss_and_gradients_match_transformers():
    # Training path: dropout off, chunked attention over T > 64 on CPU, fused LM head + cross-entropy.
    hf = make_hf("odd_small")
    hf.config.max_position_embeddings = 64
    ours = GPTNeo(GPTNeoConfig.from_hf_dict(hf.config.to_dict()))
    ours.load_state_dict(hf_to_tinylm_state_dict(hf.state_dict(), ours.state_dict()))
    hf.to(DEVICE).train(), ours.to(DEVICE).train()
    idx = torch.randint(0, 97, (3, 64), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    targets = torch.roll(idx, -1, dims=1)
    targets[0, :10] = -100  # ignored positions
    ref_loss = F.cross_entropy(hf(idx).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_loss.backward()
    logits, loss = ours(idx, targets)
    loss.backward()
    assert logits is None
    torch.testing.assert_close(loss, ref_loss, rtol=FP32_TOLERANCE, atol=1e-6)
    ref_grads = hf_to_tinylm_state_dict({k: p.grad for k, p in hf.named_parameters()}, ours.state_dict())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=10 * FP32_TOLERANCE, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bfloat16_autocast_logits_match_transformers_within_bf16_rounding(shape):
    # bf16 keeps 8 significant bits (rounding 2^-9, 0.2%, per operation); through the layers both models land
    # about 1.3% of the largest logit away from fp32 (measured on the 1M shape), each its own way. Allowed: 4%.
    hf = make_hf(shape).to(DEVICE)
    ours = GPTNeo(GPTNeoConfig.from_hf_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf_to_tinylm_state_dict(hf.state_dict(), ours.state_dict()))
    ours.to(DEVICE)
    idx = torch.randint(0, hf.config.vocab_size, (2, SEQ_LEN[shape]), generator=torch.Generator().manual_seed(1))
    idx = idx.to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ref, logits = hf(idx).logits.float(), ours(idx)[0].float()
    torch.testing.assert_close(logits, ref, rtol=0, atol=0.04 * ref.abs().max().item())


def test_mixed_precision_gradients_match_fp32_within_bf16_rounding():
    # train.dtype = bfloat16: the matmuls (the fused LM head's included) run in bf16, attention on CPU and the
    # loss in fp32, and the gradients land in the fp32 weights. Mixed local/global heads and 100 tokens, so
    # the query chunks of _attend run. Measured: every gradient within 0.8% (relative norm) of fp32's.
    torch.manual_seed(0)
    model = GPTNeo(GPTNeoConfig(vocab_size=300, n_layer=2, n_head=4, n_embd=64, max_position_embeddings=128,
                                window_size=16, local_heads=[2, 4])).to(DEVICE)
    idx, targets = torch.randint(0, 300, (2, 3, 100), device=DEVICE)

    def loss_and_grads(mixed: bool):
        model.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=mixed):
            loss = model(idx, targets)[1]
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss32, grads32 = loss_and_grads(False)
    loss16, grads16 = loss_and_grads(True)
    assert loss16 == pytest.approx(loss32, rel=1e-3)
    errors = {n: ((grads16[n] - grads32[n]).norm() / grads32[n].norm()).item() for n in grads32}
    assert all(g.dtype == torch.float32 for g in grads16.values())
    assert max(errors.values()) < 0.03, errors
    assert min(errors.values()) > 1e-4, "the bf16 path computed exactly what fp32 does: it did not run in bf16"


def test_loss_without_grad_equals_cross_entropy_of_logits():
    model = sharpen_(GPTNeo(GPTNeoConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=16, max_position_embeddings=32)))
    idx = torch.randint(0, 300, (2, 32))
    targets = torch.randint(0, 300, (2, 32))
    targets[1, 5:] = -100
    with torch.no_grad():
        logits, _ = model(idx)
        _, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()), rtol=1e-6, atol=1e-6)


def reference_attention_forward(model: GPTNeo, idx):
    """Eager float64 GPT-Neo with an explicit mask per head: the first local_heads[layer] heads of a layer see
    the last window_size keys, the others all earlier keys. Independent of model.py's attention code."""
    c = model.config
    B, T = idx.shape
    hd = c.n_embd // c.n_head
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal, band = j <= i, (j <= i) & (j > i - c.window_size)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    for layer in range(c.n_layer):
        p = f"h.{layer}."
        h = F.layer_norm(x, (c.n_embd,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], c.layer_norm_epsilon)
        q, k, v = (h @ sd[f"{p}attn.{n}_proj.weight"].T for n in "qkv")
        q, k, v = (t.view(B, T, c.n_head, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        mask = torch.stack([band if head < c.local_heads[layer] else causal for head in range(c.n_head)])
        att = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")).softmax(-1)  # no 1/sqrt(hd)
        y = (att @ v).transpose(1, 2).reshape(B, T, c.n_embd)
        x = x + y @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (c.n_embd,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], c.layer_norm_epsilon)
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (c.n_embd,), sd["ln_f.weight"], sd["ln_f.bias"], c.layer_norm_epsilon)
    return x @ sd["wte.weight"].T


@pytest.mark.parametrize("T", [5, 40, 150])  # inside the window, past it, and past the CPU query chunk
def test_mixed_heads_match_explicit_masked_reference(T):
    model = sharpen_(GPTNeo(GPTNeoConfig(**MIXED))).eval()
    assert model.config.attention_types == ("mixed", "local", "global", "mixed")
    idx = torch.randint(0, 101, (2, T), generator=torch.Generator().manual_seed(3))
    ref = reference_attention_forward(model, idx)  # on the CPU in fp64
    with torch.no_grad():
        logits, _ = model.to(DEVICE)(idx.to(DEVICE))
    assert_logits_close(logits.double(), ref)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(local_heads=5, n_head=4, n_embd=32), "local_heads"),
    (dict(local_heads=-1), "local_heads"),
    (dict(window_size=0), "window_size"),
    (dict(attention_types=[]), "empty"),
    (dict(attention_types="global,sliding"), "one of"),
    (dict(attention_types="global,local", local_heads=3), "disagrees"),
    (dict(attention_types="mixed"), "needs local_heads"),
    (dict(dropout=1.0), "dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTNeoConfig(**kwargs)


def test_attention_dropout_is_its_own_setting_and_survives_transformers_files(tmp_path):
    # on a CPU attention dropout takes PyTorch's math attention (about twice the step time), so a recipe may use
    # residual and embedding dropout alone; by default the three are tied, as before
    assert GPTNeoConfig(dropout=0.1).attention_dropout == 0.1
    model = GPTNeo(GPTNeoConfig(vocab_size=50, max_position_embeddings=16, n_layer=2, n_head=2, n_embd=8,
                                dropout=0.1, attention_dropout=0.0))
    assert model.h[0].attn.attention_dropout == 0.0 and model.h[0].attn.resid_dropout.p == 0.1
    model.save_pretrained(str(tmp_path))
    hf = GPTNeoForCausalLM.from_pretrained(str(tmp_path))
    assert (hf.config.attention_dropout, hf.config.resid_dropout, hf.config.embed_dropout) == (0.0, 0.1, 0.1)
    again = GPTNeo.from_pretrained(str(tmp_path)).config
    assert (again.dropout, again.attention_dropout) == (0.1, 0.0)
    model.train()  # training mode with attention dropout 0: attention is deterministic, only the residuals drop
    idx = torch.randint(0, 50, (2, 16))
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model(idx)[0], model(idx)[0])
    model.config.dropout = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])


def test_a_pattern_is_repeated_and_cut_at_n_layer(tmp_path):
    # resizing a model is editing n_layer alone: global,local over 3 layers is global,local,global
    assert GPTNeoConfig(n_layer=3, attention_types="global,local").attention_types == ("global", "local", "global")
    assert GPTNeoConfig(n_layer=1, attention_types="global,local").attention_types == ("global",)
    assert GPTNeoConfig(n_layer=5, n_head=4, n_embd=16, local_heads=[0, 1]).local_heads == (0, 1, 0, 1, 0)
    assert GPTNeoConfig(n_layer=2, n_head=4, n_embd=16, local_heads=[0, 4, 4]).attention_types == ("global", "local")
    model = sharpen_(GPTNeo(GPTNeoConfig(vocab_size=120, max_position_embeddings=64, n_layer=3, n_head=4, n_embd=32,
                                         window_size=5, attention_types="global,local"))).eval()
    model.save_pretrained(str(tmp_path))
    hf = GPTNeoForCausalLM.from_pretrained(str(tmp_path)).eval()  # config.json stays exact for transformers
    assert hf.config.attention_layers == ["global", "local", "global"]
    idx = torch.randint(0, 120, (1, 40))
    with torch.no_grad():
        assert_logits_close(model(idx)[0], hf(idx).logits)


def test_config_forms_agree_and_default_alternates():
    assert GPTNeoConfig(n_layer=4).attention_types == ("global", "local", "global", "local")
    a = GPTNeoConfig(n_layer=4, n_head=4, n_embd=16, attention_types="global,local")
    b = GPTNeoConfig(n_layer=4, n_head=4, n_embd=16, local_heads=[0, 4, 0, 4])
    assert a == b and a.gpt_neo_compatible
    assert GPTNeoConfig(**GPTNeoConfig(n_layer=2, local_heads=[3, 16]).__dict__).local_heads == (3, 16)
    assert not GPTNeoConfig(n_layer=2, local_heads=3).gpt_neo_compatible
