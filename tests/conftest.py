import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Tests never touch the network: the hub is treated as offline before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# ...and they neither read nor fill the user's Hugging Face caches: a fresh HF_HOME per session.
HF_HOME = tempfile.mkdtemp(prefix="tinylm-test-hf-")
os.environ["HF_HOME"] = HF_HOME
for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
    os.environ.pop(name, None)  # each would override HF_HOME
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ...nor the user's cache of compiled decode.c libraries (native.py): one per session, so it is built once
os.environ["TINYLM_CACHE"] = os.path.join(HF_HOME, "tinylm")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# The device the parity (against transformers), KV-cache and sampling tests run on: TINYLM_TEST_DEVICE=cuda on a
# GPU machine, else the CPU. Everything else runs on the CPU.
DEVICE = torch.device(os.environ.get("TINYLM_TEST_DEVICE", "cpu"))
# fp32 logits agree to 1e-5 of the largest logit on the CPU; GPU kernels (cuBLAS, fused SDPA) sum in other orders
FP32_TOLERANCE = 1e-5 if DEVICE.type == "cpu" else 1e-4


def hub_cache_snapshot(cache_dir, repo_id: str, files: dict, repo_type: str = "model",
                       commit: str = "4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b") -> str:
    """Lay files out as huggingface_hub's cache does after a download: blobs/<hash>, snapshots/<commit>/<name>
    linked to its blob, and refs/main naming the commit. `files` maps a repo path to a local file. Returns the
    snapshot folder; with HF_HUB_OFFLINE=1 the hub id then resolves there, as on a machine that downloaded it."""
    import hashlib

    root = os.path.join(str(cache_dir), f"{repo_type}s--{repo_id.replace('/', '--')}")
    snapshot = os.path.join(root, "snapshots", commit)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    for name, source in files.items():
        with open(source, "rb") as f:
            blob = os.path.join(root, "blobs", hashlib.file_digest(f, "sha256").hexdigest())
        shutil.copyfile(source, blob)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def read_only_below(monkeypatch, folder):
    """os.makedirs under `folder` fails as on a read-only mount (EROFS); elsewhere it works."""
    import errno
    real_makedirs = os.makedirs

    def makedirs(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, "makedirs", makedirs)


@pytest.fixture(scope="session")
def full():
    """The GPT-Neo tokenizer (50257 tokens); tests only read it."""
    from tinylm.data.tokenizer import gpt_neo_tokenizer

    return gpt_neo_tokenizer()


@pytest.fixture(scope="session")
def trimmed(full):
    """A 1000-token tokenizer trimmed on 300 generated stories, and the stories."""
    from tinylm.data.cache import count_tokens
    from tinylm.data.tokenizer import trim_tokenizer
    from helpers import make_stories

    stories = make_stories(300)
    return trim_tokenizer(full, count_tokens(full, stories), 1000), stories
