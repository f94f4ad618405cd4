"""Hugging Face weights in and out: GPTNeo.from_pretrained and .save_pretrained read and write transformers'
GPT-Neo layout (config.json + model.safetensors, or pytorch_model.bin; sharded indexes too), from a folder or the hub.

    model = load_pretrained(GPTNeo, "roneneldan/TinyStories-1M")   # what GPTNeo.from_pretrained calls
    save_pretrained(model, "out/x/best")                             # what model.save_pretrained calls
"""

import json
import os

import torch

from model import GPTNeo, GPTNeoConfig
from storage import atomic_write, new_file_mode, write_text


def load_pretrained(cls, name_or_path: str) -> GPTNeo:
    """A `cls` (GPTNeo) model from a TinyLM checkpoint or Hugging Face GPT-Neo folder (config.json +
    model.safetensors or pytorch_model.bin), or a hub id such as 'roneneldan/TinyStories-1M' when the hub can be
    reached."""
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


def save_pretrained(model: GPTNeo, folder: str):
    """Write config.json and model.safetensors in transformers' GPT-Neo layout. Mixed layers are
    recorded so that TinyLM reloads them and transformers refuses them."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tinylm_to_hf_state_dict(model.state_dict()).items()}
    # safetensors creates its file readable by its owner alone (0600); a shared model gets a new file's usual mode
    atomic_write(os.path.join(folder, "model.safetensors"),
                 lambda p: (save_file(tensors, p, metadata={"format": "pt"}), os.chmod(p, new_file_mode())))
    config = {**model.config.to_hf_dict(), "dtype": str(model.wte.weight.dtype).removeprefix("torch.")}
    atomic_write(os.path.join(folder, "config.json"), lambda p: write_text(p, json.dumps(config, indent=2) + "\n"))


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

