"""pieces.py: the piece table gives exactly the tokenizer's ids, whatever the text, the table size or the hashes."""

import random

import numpy as np

from helpers import ODD_TEXTS
from tinylm.data import pieces
from tinylm.data.pieces import (NON_ASCII_WHITESPACE, encode_batches, encode_pieces, find_rows, non_ascii_whitespace,
                                piece_starts)


def plain(tokenizer, texts):
    return [i for t in texts for i in tokenizer.encode(t) + [tokenizer.eos_token_id]]


def check_table(table):
    """Row 0 is end-of-text, and every other row is found by its hash."""
    assert table["byte_lengths"][0] == -1 and table["id_lengths"][0] == 1 and table["bytes"].dtype == np.uint8
    rows = np.arange(1, len(table["hashes"]))
    assert find_rows(table, table["hashes"][rows]).tolist() == rows.tolist()
    assert 3 * len(table["hashes"]) <= len(table["slots"])


def test_piece_table_encoding_equals_plain_tokenizer(full, trimmed):
    tok, stories = trimmed
    tricky = ["a  b", "a \n b", "a  \nb", " lead", "trail ", "x\t y", "  ", "it's  'tis 42 3.14 ...!? ", "", "a",
              "a\u3000b c\u00a0d", "e\x85 f", "end<|endoftext|> start", "déjà vu 🙂 🙂🙂 x", "x y z.", "\nstart x",
              "a   b", "x\n  y", "p\t\t  q", "x y\n", "a\x1c b", "a \x1fb", "a\rb c", "a b\x0b c", "x \u00a0y",
              "“Hi,” she said — naïve café 🙂.", "a\u2003 b", "a \u180e b", "z\u3000 q", "“ q ”", "ü \u200b ü",
              "x\u00a0 \u00a0y", "é\u3000 \u2003é", "\ufeff x", "x \ufeff"]
    texts = ODD_TEXTS + tricky + stories[:50]
    for tokenizer in (full, tok):
        want = plain(tokenizer, texts)
        for workers in (1, 2):
            got = np.concatenate(list(encode_batches(tokenizer, texts, batch_size=7, workers=workers)))
            assert got.tolist() == want, (tokenizer is full, workers)
        # a table of at most 40 pieces keeps dropping its less used half, and the ids stay the same
        table = {}
        got = [encode_pieces(tokenizer.backend_tokenizer, table, texts[i:i + 7], np.uint32, max_cached_pieces=40)
               for i in range(0, len(texts), 7)]
        assert np.concatenate(got).tolist() == want
        assert len(table["hashes"]) <= 40 + 7 * 60
        check_table(table)


def test_random_text_equals_plain_tokenizer(full):
    # words, punctuation and every kind of whitespace, next to each other in any order
    parts = list("ab Z1.,'!") + [" ", " ", "  ", "\n", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "é", "’",
                                 "“", "😀", "'s", "'ll", "12"] + [c.decode() for c in NON_ASCII_WHITESPACE]
    rng, table = random.Random(0), {}
    for trial in range(200):
        batch = ["".join(rng.choice(parts) for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(1, 20))]
        got = encode_pieces(full.backend_tokenizer, table, batch, np.uint16, max_cached_pieces=64)
        assert got.tolist() == plain(full, batch), batch
    check_table(table)


def encode_counting_direct(full, monkeypatch, batches):
    """Each batch's ids through one table, checked against the plain tokenizer; the batches encoded directly."""
    direct, encode_directly = [], pieces.encode_directly

    def counted(encoder, batch, dtype):
        direct.append(batch)
        return encode_directly(encoder, batch, dtype)

    monkeypatch.setattr(pieces, "encode_directly", counted)
    table = {}
    for batch in batches:
        assert encode_pieces(full.backend_tokenizer, table, batch, np.uint16).tolist() == plain(full, batch)
    check_table(table)
    return direct


def test_hash_collisions_cost_time_not_correctness(full, monkeypatch):
    # with base 1 a piece's hash is the sum of its bytes: anagrams collide, found rows hold other bytes
    monkeypatch.setattr(pieces, "HASH_POWERS", np.ones(4096, dtype=np.uint64))
    batches = [["a stop and a pot"], ["a pots and a top"], ["stop pots tops opts"], ["a stop and a pot."]]
    # the second batch's " pots" matches " stop"'s hash and length, the third holds three of the same hash
    assert encode_counting_direct(full, monkeypatch, batches) == batches[1:3]


def test_pieces_longer_than_the_hash_weights_stay_exact(full, monkeypatch):
    # weights repeat every 4096 bytes: swapping the bytes at 0 and 4096 keeps the hash of the real HASH_BASE
    first, second = "Once " + "a" + "x" * 4095 + "b", "Once " + "b" + "x" * 4095 + "a"
    batches = [[first], [second], [first, "The end."]]
    assert encode_counting_direct(full, monkeypatch, batches) == [[second]]


def test_pieces_are_cut_before_whitespace_that_follows_non_whitespace():
    def pieces_of(stories):
        encoded = [s.encode() for s in stories]
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        ends = np.cumsum([len(e) for e in encoded])
        starts = np.append(0, ends[:-1])
        cuts = piece_starts(blob, starts, ends).tolist() + [len(blob)]
        return [bytes(blob[a:b]).decode() for a, b in zip(cuts, cuts[1:])]

    assert pieces_of(["x y ", "Once upon  a\ttime. The end.\n\nOne"]) == ["x", " y", " ", "Once", " upon", "  a",
                                                                         "\ttime.", " The", " end.", "\n\nOne"]
    # \x1c-\x1f are whitespace to Python, not to the tokenizer: no cut before them, nor after
    assert pieces_of(["a.\x1c b", "a \x1fb"]) == ["a.\x1c b", "a", " \x1fb"]
    # in a story with Unicode whitespace, no cut follows a non-ASCII character
    assert pieces_of(["“Hi” said Zoë a\u00a0 b c", "“Hi” said Zoë"]) == ["“Hi” said", " Zoë a\u00a0 b", " c",
                                                                        "“Hi”", " said", " Zoë"]


def test_non_ascii_whitespace_is_found_by_its_bytes():
    for space in NON_ASCII_WHITESPACE:
        text = "é’ “x”".encode() + space + "😀 \u00e2\u0080".encode()
        assert non_ascii_whitespace(np.frombuffer(text, dtype=np.uint8)).tolist() == [text.index(space)], space
    assert non_ascii_whitespace(np.frombuffer("naïve café “q” 🙂 \u00c2".encode(), dtype=np.uint8)).size == 0
