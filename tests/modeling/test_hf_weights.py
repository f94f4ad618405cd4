"""hf_weights.py: GPTNeo.save_pretrained writes what transformers loads with the same logits, from_pretrained reads
it back, and damaged or foreign checkpoints are refused in one sentence."""

import json
import os

import pytest
import torch
from transformers import GPTNeoForCausalLM

from helpers import MIXED, assert_logits_close, sharpen_
from model import GPTNeo, GPTNeoConfig
from tinylm.modeling.hf_weights import hf_to_tinylm_state_dict
from tinylm.storage import new_file_mode


def test_save_pretrained_loads_in_transformers_with_identical_logits(tmp_path):
    model = sharpen_(GPTNeo(GPTNeoConfig(vocab_size=120, max_position_embeddings=96, n_layer=3, n_head=4, n_embd=32,
                                         window_size=5, attention_types="global,local,local"))).eval()
    model.save_pretrained(str(tmp_path))
    hf, info = GPTNeoForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.attention_layers == ["global", "local", "local"]
    idx = torch.randint(0, 120, (2, 60))
    with torch.no_grad():
        ours, _ = model(idx)
        assert_logits_close(ours, hf.eval()(idx).logits)
        again, _ = GPTNeo.from_pretrained(str(tmp_path))(idx)
    assert torch.equal(again, ours)
    # a folder to share: the weights are as readable as config.json (safetensors alone made them 0600)
    mode = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert mode["model.safetensors"] == mode["config.json"] == new_file_mode()


def test_mixed_model_round_trips_but_transformers_refuses(tmp_path):
    model = sharpen_(GPTNeo(GPTNeoConfig(**MIXED))).eval()
    model.save_pretrained(str(tmp_path))
    with pytest.raises((NotImplementedError, ValueError)):
        GPTNeoForCausalLM.from_pretrained(str(tmp_path))
    reloaded = GPTNeo.from_pretrained(str(tmp_path))
    assert reloaded.config == model.config
    idx = torch.randint(0, 101, (1, 30))
    with torch.no_grad():
        assert torch.equal(reloaded(idx)[0], model(idx)[0])


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        GPTNeo.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(OSError, match="local folder"):
        GPTNeo.from_pretrained("roneneldan/TinyStories-1M-not-cached")  # HF_HUB_OFFLINE=1 in conftest
    model = GPTNeo(GPTNeoConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, max_position_embeddings=16))
    folder = tmp_path / "ckpt"
    model.save_pretrained(str(folder))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        GPTNeo.from_pretrained(str(folder))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPTNeo.from_pretrained(str(folder))
    model.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(ValueError, match="shape"):
        GPTNeo.from_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt_neo"):
        GPTNeo.from_pretrained(str(folder))


def test_untied_lm_head_is_refused():
    config = GPTNeoConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, max_position_embeddings=16)
    state = {"transformer." + k.replace(".attn.", ".attn.attention."): v for k, v in GPTNeo(config).state_dict().items()}
    state["lm_head.weight"] = torch.randn(64, 16)
    with pytest.raises(ValueError, match="tied"):
        hf_to_tinylm_state_dict(state, GPTNeo(config).state_dict())


def test_a_checkpoint_loads_in_transformer_lens_with_our_logits(tmp_path):
    # interpretability users' tool (requirements-test.txt): TransformerBridge over the saved folder, local heads past
    # their window included, and its hooks see every layer
    bridge = pytest.importorskip("transformer_lens.model_bridge",
                                 reason="TransformerLens is not installed (pip install -r requirements-test.txt)")
    model = sharpen_(GPTNeo(GPTNeoConfig(vocab_size=120, max_position_embeddings=96, n_layer=3, n_head=4, n_embd=32,
                                         window_size=5, attention_types="global,local,local"))).eval()
    model.save_pretrained(str(tmp_path))
    lens = bridge.TransformerBridge.boot_transformers(str(tmp_path), device="cpu", tokenizer=_tokenizer())
    idx = torch.randint(0, 120, (2, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, _ = model(idx)
        logits, cache = lens.run_with_cache(idx)
    assert_logits_close(ours, logits)
    assert all(f"blocks.{layer}.hook_resid_post" in cache for layer in range(3))


def _tokenizer():
    """GPT-Neo's tokenizer as transformers takes it (the saved folder has none: a bare model)."""
    from transformers import PreTrainedTokenizerFast
    from tinylm.data.tokenizer import gpt_neo_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=gpt_neo_tokenizer().backend_tokenizer)
