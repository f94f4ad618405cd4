"""Where a model named on the command line lives: a local folder as it is, or a Hugging Face hub id fetched into
the hub's local cache (`HF_HUB_OFFLINE=1` reads that cache without the network). Model weights (hf_weights.py),
tokenizers (data/tokenizer.py) and the scripts resolve names here, so a name means the same thing everywhere.

    folder = resolve_pretrained("roneneldan/TinyStories-1M")   # or "out/quickstart/best"
"""

import os
import re


# a hub repo id: owner/name, each part letters, digits, '.', '_' or '-' (not first), at most 96 characters
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def looks_like_path(name: str) -> bool:
    """Whether a name that is no folder here was meant as a local path rather than a hub id: it starts with '.',
    '/' or '~', has a '/' that a hub id would not (none, two or more, a leading or trailing one), characters a
    hub id cannot have, or a first part that exists here (out/nope, when out/ is a folder)."""
    if name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        return True
    return os.path.exists(name.split("/")[0])


def resolve_pretrained(name_or_path: str) -> str:
    """A local folder as is; 'owner/name' that is not a local path is fetched from the Hugging Face hub."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if looks_like_path(name_or_path):
        raise FileNotFoundError(f"no model folder at {name_or_path!r}{near_miss(name_or_path)}: pass a folder with "
                                "a config.json (a TinyLM checkpoint such as out/quickstart/best, or a downloaded "
                                "Hugging Face model), or a hub id such as 'roneneldan/TinyStories-1M'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"])
    except Exception as e:
        raise OSError(f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: no folder of "
                      "that name here and the hub is unreachable or lacks it); download the model on a machine "
                      "with network access and pass its local folder instead") from e


def near_miss(path: str) -> str:
    """', which holds ...' naming what the deepest existing folder above `path` holds, to show the typo."""
    parent = os.path.dirname(os.path.normpath(path))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if not parent:
        return ""
    entries = sorted(e for e in os.listdir(parent) if not e.startswith("."))
    if not entries:
        return f" ({parent}/ is empty)"
    return f" ({parent}/ holds {', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''})"
