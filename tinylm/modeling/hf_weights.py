"""Hugging Face GPT-Neo files in and out: config.json, model.safetensors (or pytorch_model.bin; sharded indexes too)
in transformers' names, read from a folder or the hub and written whole. This module reads and writes files and
renames tensors; model.py builds the model from what it reads (GPTNeo.from_pretrained) and hands it what to write
(.save_pretrained), so the import runs one way: model.py -> here.

    config = read_config(folder, GPTNeoConfig.from_hf_dict)           # what GPTNeo.from_pretrained does
    state = hf_to_tinylm_state_dict(read_weights(folder), model.state_dict())
    write_pretrained(folder, hf_config, model.state_dict())            # what model.save_pretrained does
"""

import json
import os

import torch

from tinylm.storage import atomic_write, new_file_mode, write_text


def read_config(folder: str, parse):
    """parse(the folder's config.json as a dict); a missing, damaged or foreign file is one sentence naming it."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{folder} has no config.json; point at a TinyLM checkpoint or a "
                                "Hugging Face GPT-Neo model folder")
    try:
        with open(config_file, encoding="utf-8") as f:
            return parse(json.load(f))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        detail = f"it lacks {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{config_file} cannot be read ({detail}): the checkpoint is damaged or not a GPT-Neo "
                         "model; save or download it again") from None


def write_pretrained(folder: str, hf_config: dict, state: dict):
    """Write config.json (hf_config) and model.safetensors (our state dict under transformers' names), each
    file whole or not at all."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tinylm_to_hf_state_dict(state).items()}
    # safetensors creates its file readable by its owner alone (0600); a shared model gets a new file's usual mode
    atomic_write(os.path.join(folder, "model.safetensors"),
                 lambda p: (save_file(tensors, p, metadata={"format": "pt"}), os.chmod(p, new_file_mode())))
    atomic_write(os.path.join(folder, "config.json"), lambda p: write_text(p, json.dumps(hf_config, indent=2) + "\n"))


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


def hf_to_tinylm_state_dict(hf_state: dict, like: dict) -> dict:
    """transformers GPT-Neo state dict -> ours; checks every key and shape against `like`, the state dict (or
    {name: shape}) of the model it must fit."""
    expected = {k: getattr(v, "shape", v) for k, v in like.items()}
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

