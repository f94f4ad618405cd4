"""inside.py: the attention weights, logit lens and neuron activations of its own forward pass are the model's."""

import torch
from transformers import GPTNeoForCausalLM

from helpers import MIXED, sharpen_
from model import GPTNeo, GPTNeoConfig
from tinylm.modeling.inside import head_stats, inside, logit_lens


def local_and_global_model(tmp_path):
    config = GPTNeoConfig(vocab_size=120, max_position_embeddings=96, n_layer=3, n_head=4, n_embd=32, window_size=5,
                          attention_types="global,local,global")
    model = sharpen_(GPTNeo(config)).eval()
    model.save_pretrained(str(tmp_path))
    return model, GPTNeoForCausalLM.from_pretrained(str(tmp_path)).eval()


def test_attention_weights_are_transformers_output_attentions(tmp_path):
    model, hf = local_and_global_model(tmp_path)
    idx = torch.randint(0, 120, (1, 40), generator=torch.Generator().manual_seed(1))
    seen = inside(model, idx)
    with torch.no_grad():
        ref = hf(idx, output_attentions=True)
    for layer, (ours, theirs) in enumerate(zip(seen["attention"], ref.attentions)):
        torch.testing.assert_close(ours, theirs[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.sum(-1), torch.ones(4, 40), rtol=0, atol=1e-5)  # each row a distribution
        assert (ours.triu(1) == 0).all()  # no query sees a later key
        if layer == 1:  # the local layer: nothing outside the window of 5
            assert (ours.tril(-5) == 0).all() and (ours.diagonal(-4, 1, 2) > 0).all()
    with torch.no_grad():
        torch.testing.assert_close(seen["logits"], model(idx)[0][0], rtol=0, atol=1e-5 * ref.logits.abs().max().item())


def test_mixed_heads_mark_their_local_ones_and_keep_their_windows():
    model = sharpen_(GPTNeo(GPTNeoConfig(**MIXED))).eval()  # local_heads [1, 4, 0, 3]
    idx = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(2))
    seen = inside(model, idx)
    assert seen["local"] == [1, 4, 0, 3]
    for layer, probs in enumerate(seen["attention"]):
        local = probs[:seen["local"][layer]]
        assert (local.tril(-MIXED["window_size"]) == 0).all()
        if seen["local"][layer] < 4:  # a global head reaches back past the window
            assert (probs[seen["local"][layer]:].tril(-MIXED["window_size"]).sum(-1)[:, -1] > 0).all()
    with torch.no_grad():
        torch.testing.assert_close(seen["logits"], model(idx)[0][0], rtol=0, atol=1e-4)


def test_the_logit_lens_ends_with_the_models_own_top_5():
    model = sharpen_(GPTNeo(GPTNeoConfig(vocab_size=120, max_position_embeddings=64, n_layer=3, n_head=4, n_embd=32,
                                         window_size=8))).eval()
    idx = torch.randint(0, 120, (1, 20), generator=torch.Generator().manual_seed(3))
    seen = inside(model, idx)
    lens = logit_lens(model, seen["residual"], position=12)
    assert len(lens) == 3 + 1  # the embedding, then each layer
    with torch.no_grad():
        best = model(idx)[0][0, 12].softmax(-1).topk(5)
    assert [i for i, _ in lens[-1]] == best.indices.tolist()
    torch.testing.assert_close(torch.tensor([p for _, p in lens[-1]]), best.values, rtol=0, atol=1e-6)


def test_a_neurons_activations_are_the_mlps_hidden_activation():
    model = sharpen_(GPTNeo(GPTNeoConfig(vocab_size=120, max_position_embeddings=64, n_layer=2, n_head=2, n_embd=16,
                                         window_size=8))).eval()
    idx = torch.randint(0, 120, (1, 25), generator=torch.Generator().manual_seed(4))
    hooked = {}
    handle = model.h[1].mlp.c_proj.register_forward_hook(lambda m, args, out: hooked.update(hidden=args[0]))
    with torch.no_grad():
        model(idx)
    handle.remove()
    seen = inside(model, idx)
    torch.testing.assert_close(seen["neurons"][1][:, 7], hooked["hidden"][0, :, 7], rtol=0, atol=1e-6)


def test_head_stats_tell_a_previous_token_head_from_a_spread_one():
    T = 10
    previous = torch.zeros(T, T)
    previous[0, 0] = 1
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1  # every query on the token before it
    uniform = torch.ones(T, T).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    sharp, spread = head_stats(torch.stack([previous, uniform]))
    assert sharp["previous"] == 1 and abs(sharp["distance"] - 0.9) < 1e-6 and sharp["entropy"] == 0
    assert spread["previous"] < 0.4 and spread["distance"] > 2 and spread["entropy"] > 1
