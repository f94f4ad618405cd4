"""Where a model named on the command line lives: a local folder as it is, or a Hugging Face hub id fetched into
the hub's local cache (`HF_HUB_OFFLINE=1` reads that cache without the network). Model weights (hf_weights.py),
tokenizers (data/tokenizer.py) and the scripts resolve names here, so a name means the same thing everywhere.

    folder = resolve_pretrained("roneneldan/TinyStories-1M")   # or "out/quickstart/best"
"""

import os


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
