"""What several test files share: corpora the tests write, models with random weights sharp enough to show a wrong
mask, and a small training config. A plain module (tests/ is on sys.path through conftest.py)."""

import os
import random
import signal

import torch
from transformers import GPTNeoConfig as HFConfig
from transformers import GPTNeoForCausalLM

from conftest import FP32_TOLERANCE
from tinylm.data.corpus import EOT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SHARED = os.path.join(ROOT, "..", "shared", "data")  # real TinyStories, beside the checkout; tests skip without it


# ---- corpora ----

ODD_TEXTS = ["Lily saw a 🐶 — “naïve” café!\n\n  Tom said: <3 \x00", "Zyzzyvas quokkas ŋ 日本語のテキスト 🤖🫠",
             "tab\there  trailing   ", "\u200b\ufeffzero width", "x" * 300, "Ω≈ç√∫˜µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


def make_stories(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Sue", "Max", "Ben", "Mia", "Zoë"]
    things = ["ball", "cat", "red kite", "big tree", "little boat", "shiny rock", "café"]
    verbs = ["found", "liked", "saw", "lost", "painted", "hugged"]
    return [" ".join(f"{rng.choice(names)} {rng.choice(verbs)} a {rng.choice(things)}." for _ in range(rng.randint(2, 9)))
            for _ in range(n)]


def write_txt(path, stories):
    path.write_text("".join(f"{s}\n{EOT}\n" for s in stories), encoding="utf-8")
    return str(path)


# ---- models ----

# TinyStories-1M as released, and an odd small shape: 3 heads of 8, MLP 40 wide, window 7.
SHAPES = {
    "tinystories_1M": dict(vocab_size=50257, max_position_embeddings=2048, hidden_size=64, num_layers=8,
                           num_heads=16, window_size=256, attention_types=[[["global", "local"], 4]]),
    "odd_small": dict(vocab_size=97, max_position_embeddings=64, hidden_size=24, num_layers=3, num_heads=3,
                      window_size=7, intermediate_size=40, attention_types=[[["local", "global", "local"], 1]]),
}


def sharpen_(model: torch.nn.Module, seed: int = 0):
    """Random weights large enough that attention is peaked and logits spread out: at GPT-Neo's 0.02 init
    every model outputs nearly uniform logits and a wrong mask would hardly show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lm_head.weight"):
                continue  # tied to wte
            if "ln" in name.split(".")[-2]:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                std = 0.5 if ("wte" in name or "wpe" in name) else 1.0 / p.shape[1] ** 0.5
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def make_hf(shape: str, seed: int = 0) -> GPTNeoForCausalLM:
    config = HFConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return sharpen_(GPTNeoForCausalLM(config), seed).eval()


def small_gpt_neo(context: int, window: int, seed: int = 0) -> GPTNeoForCausalLM:
    """A sharp random GPT-Neo with GPT-Neo's full vocabulary (so its tokenizer applies, no tokenizer files needed):
    2 layers, global then local (`window` keys), 4 heads, 32 wide, `context` positions."""
    config = HFConfig(vocab_size=50257, max_position_embeddings=context, hidden_size=32, num_layers=2, num_heads=4,
                      window_size=window, attention_types=[[["global", "local"], 1]])
    torch.manual_seed(seed)
    return sharpen_(GPTNeoForCausalLM(config)).eval()


def assert_logits_close(ours, ref):
    torch.testing.assert_close(ours, ref.to(ours.device, ours.dtype), rtol=FP32_TOLERANCE,
                               atol=FP32_TOLERANCE * ref.abs().max().item())


MIXED = dict(vocab_size=101, max_position_embeddings=160, n_layer=4, n_head=4, n_embd=32, window_size=9,
             local_heads=[1, 4, 0, 3])


# ---- training ----

def train_config(tmp_path, **train):
    data = tmp_path / "stories.txt"
    if not data.exists():
        write_txt(data, make_stories(300))
    # dtype float32 unless asked: train.dtype = auto times both precisions on this machine, and a test's result must
    # not hang on which one a busy machine's timing picked (two runs compared could differ)
    settings = {**dict(batch_size=8, max_steps=30, eval_interval=10, eval_tokens=2000, warmup_steps=5, lr=3e-3,
                       dtype="float32", out_dir=str(tmp_path / "out")), **train}
    text = ("[model]\nvocab_size = 400\nn_layer = 2\nn_head = 2\nn_embd = 32\nmax_position_embeddings = 64\n"
            "window_size = 8\n[data]\ndataset = {data}\nval_fraction = 0.1\nblock_size = 32\ncache_dir = {cache}\n"
            "[train]\n").format(data=data, cache=tmp_path / "cache")
    text += "".join(f"{k} = {v}\n" for k, v in settings.items())
    path = tmp_path / "x.config"
    path.write_text(text)
    return str(path)


def ctrl_c_reaches_it():
    """preexec_fn for a child process a test sends SIGINT: Ctrl-C's default, as in a terminal's foreground job. A
    suite started in the background (`cmd &`, nohup, some CI runners) has SIGINT ignored, its children inherit
    that, and Python then installs no KeyboardInterrupt for them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class FakeClock:
    """A clock for training runs (train.main's `clock`): each reading is `tick` seconds after the one before, so
    how many steps fit in a max_minutes depends on the code alone, never on how busy the machine is."""

    def __init__(self, tick: float = 0.02):
        self.now, self.tick = 1_000_000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now
