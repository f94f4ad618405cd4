"""What model.py is built from: the KV cache and sampling (generation.py), training's fused LM head and loss
(lm_head.py), and transformers' files in and out (hf_weights.py)."""
