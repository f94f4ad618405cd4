"""tokenizer.py: GPT-Neo's tokenizer, trimmed ones and tokenizer.json files, equal to transformers' own, without
importing transformers."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from helpers import ODD_TEXTS, SHARED, make_stories
from helpers import ROOT
from tinylm.data.cache import count_tokens
from tinylm.data.corpus import read_stories
from tinylm.data.tokenizer import (EOT, gpt_neo_vocab_and_merges, load_tokenizer, text_stream, tokenizer_from_file,
                                   trim_tokenizer)



def test_gpt_neo_tokenizer_is_complete_and_lossless(tmp_path, full):
    assert len(full) == 50257  # transformers 5 silently builds an empty tokenizer from vocab_file=/merges_file=
    assert full.eos_token_id == 50256
    assert full.encode("Once upon a time") == [7454, 2402, 257, 640]  # GPT-2/GPT-Neo ids
    for text in ODD_TEXTS:
        assert full.decode(full.encode(text)) == text
    full.save_pretrained(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert len(again) == 50257 and again.encode(ODD_TEXTS[0]) == full.encode(ODD_TEXTS[0])
    (tmp_path / "no-tokenizer-here").mkdir()  # a Hugging Face folder without tokenizer files: GPT-Neo's applies
    assert len(load_tokenizer(str(tmp_path / "no-tokenizer-here"))) == 50257
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut off mid-write
    with pytest.raises(ValueError, match=rf"could not read {tmp_path / 'tokenizer.json'} .*damaged"):
        load_tokenizer(str(tmp_path))


def test_trimmed_tokenizer_is_lossless_compact_and_reloadable(tmp_path, full, trimmed):
    tok, stories = trimmed
    assert len(tok) == 1000 and sorted(tok.get_vocab().values()) == list(range(1000))
    assert tok.eos_token_id == 999 and tok.convert_ids_to_tokens(999) == EOT
    rng = random.Random(1)
    random_unicode = "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(400))
    for text in ODD_TEXTS + stories[:20] + [random_unicode, f"a{EOT}b"]:
        ids = tok.encode(text)
        assert max(ids) < 1000 and tok.decode(ids) == text
    # frequent words stay whole; a word the corpus never used splits into kept pieces instead of an unknown token
    assert tok.tokenize(" Lily") == ["ĠLily"]
    assert len(tok.encode(" Zyzzyvas")) > len(full.encode(" Zyzzyvas"))
    path = str(tmp_path / "tokenizer.json")
    tok.backend_tokenizer.save(path)
    reloaded = tokenizer_from_file(path)
    from transformers import PreTrainedTokenizerFast
    plain = PreTrainedTokenizerFast(tokenizer_file=path)  # what a user of transformers would do
    for text in ODD_TEXTS + stories[:5]:
        assert reloaded.encode(text) == tok.encode(text) == plain.encode(text)


def test_trimming_keeps_the_most_frequent_tokens_and_fills_small_corpora_in_merge_order(full):
    stories = make_stories(50)
    counts = count_tokens(full, stories)
    used = int((counts > 0).sum())
    big = trim_tokenizer(full, counts, 2000)  # far more than the corpus uses: filled up, deterministic
    assert len(big) == 2000 and big.get_vocab() == trim_tokenizer(full, counts, 2000).get_vocab()
    vocab = big.get_vocab()
    assert all(full.convert_ids_to_tokens(int(i)) in vocab for i in np.flatnonzero(counts))  # every used token kept
    assert used < 2000 and "Ġthe" in vocab  # fill comes from GPT-Neo's earliest merges
    small = trim_tokenizer(full, counts, 300)
    top = full.convert_ids_to_tokens(int(np.argmax(counts)))
    assert top in small.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        trim_tokenizer(full, counts, 256)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is not present")
def test_real_tinystories_sample_round_trips(full):
    stories = list(read_stories([os.path.join(SHARED, "tinystories_sample.txt")]))
    tok = trim_tokenizer(full, count_tokens(full, [s.strip() for s in stories if s.strip()]), 4000)
    for story in stories:
        assert tok.decode(tok.encode(story)) == story


def test_a_stream_never_shows_half_a_character_and_decodes_only_its_last_tokens():
    # 🦒 is three byte-level tokens: until its last one arrives the stream shows the text before it
    tokenizer = load_tokenizer()
    story = "Tom saw a 🦒 and ran. " * 40 + "Ünïcödé ends it: 日本"
    ids, decoded = tokenizer.encode(story), []
    real_decode = tokenizer.decode
    tokenizer.decode = lambda ids, **kw: decoded.append(len(ids)) or real_decode(ids, **kw)
    for cut in (1, 4, 6):  # prompts of whole characters (1, 6) and one that ends inside 🦒 (4)
        decoded.clear()
        prompt = real_decode(ids[:cut])
        new_text = text_stream(tokenizer, ids[:cut])
        deltas = [new_text(token) for token in ids[cut:]]
        assert "".join(deltas) == story[len(prompt):]  # what decoding the whole story each time showed
        assert all("\ufffd" not in d for d in deltas) and "" in deltas  # some tokens held back a partial character
        assert max(decoded[3:]) <= 3  # each step decoded the tokens since the last whole character, not the story
    assert real_decode(ids[:4]).endswith("\ufffd") and real_decode(ids[:6]).endswith("🦒")


def reference_gpt_neo_tokenizer():
    """GPT-Neo's tokenizer as transformers builds it from the same files: what TinyLM's must equal."""
    from transformers import GPT2TokenizerFast

    vocab, merges = gpt_neo_vocab_and_merges()
    return GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=EOT, bos_token=EOT, eos_token=EOT,
                             add_prefix_space=False)


def sample_texts():
    texts = ODD_TEXTS + make_stories(30) + [f"a{EOT}b", f"{EOT}", " a , b . don 't  x", ""]
    test_file = os.path.join(SHARED, "tinystories_test.txt")
    if os.path.isfile(test_file):  # real stories, several whole ones with their separators
        with open(test_file, encoding="utf-8") as f:
            texts.append(f.read(100_000))
    return texts


def test_the_gpt_neo_tokenizer_equals_transformers(full):
    ref = reference_gpt_neo_tokenizer()
    assert len(ref) == len(full) == 50257 and ref.eos_token_id == full.eos_token_id
    assert ref.get_vocab() == full.get_vocab()
    for text in sample_texts():
        ids = full.encode(text)
        assert ids == ref.encode(text)
        for skip in (False, True):
            assert full.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert full.tokenize(text) == ref.tokenize(text)


def test_a_saved_tokenizer_loads_in_transformers_with_its_end_of_text(tmp_path, trimmed):
    import torch
    from transformers import AutoTokenizer

    tok, stories = trimmed
    tok.save_pretrained(str(tmp_path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs.eos_token_id == tok.eos_token_id == 999 and len(theirs) == len(tok)
    for text in sample_texts()[:12] + stories[:5]:
        ids = tok.encode(text)
        assert theirs.encode(text) == ids
        assert theirs.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    ids = tok.encode(" Lily saw a cat.")  # decode takes what generate returns, as transformers' does
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(ids) == " Lily saw a cat."
    assert tok.decode(ids[0]) == " Lily" and tok.convert_ids_to_tokens(ids[0]) == "ĠLily"


def test_loading_a_model_and_its_tokenizer_does_not_import_transformers(tmp_path, trimmed):
    # transformers' import is about 0.4 s of every `python inference.py`, which never needs it
    from model import GPTNeo, GPTNeoConfig

    GPTNeo(GPTNeoConfig(vocab_size=1000, n_layer=1, n_head=2, n_embd=16, max_position_embeddings=32,
                        eos_token_id=999, bos_token_id=999)).save_pretrained(str(tmp_path))
    trimmed[0].backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    code = ("import sys; from tinylm.checkpoint import load_model_and_tokenizer; "
            "from tinylm.data.tokenizer import load_tokenizer; import inference; "
            "from tinylm.serving import playground; "
            f"m, t = load_model_and_tokenizer({str(tmp_path)!r}, 'cpu'); "
            "load_tokenizer(); print(len(t), sorted(k for k in sys.modules if k.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1000", "[]"]
