"""Tokenizing a corpus fast: stories reuse the same pieces (" the", " dog.", "\\n\\nOnce"), so each distinct piece
is tokenized once and the rest are lookups in a table of the pieces seen so far, done with numpy on the stories'
UTF-8 bytes. The ids are exactly those of the tokenizer itself (tests/test_pieces.py); on 2 cores a 2 GB corpus
tokenizes at about twice the speed of a Python dictionary of pieces.

    from tinylm.data.pieces import encode_batches
    for ids in encode_batches(tokenizer, stories, workers=2): ...   # each story followed by end-of-text
"""

import itertools
import os

import numpy as np

from tinylm.data.corpus import EOT

PIECE_GROUPS = 8  # sequences new pieces are tokenized in (see add_pieces)

# GPT-2's pre-tokenizer (a regex) never joins a non-whitespace character to the whitespace after it, and splits
# a whitespace run looking only at the run and the character after it. So text cut before every whitespace run that
# follows a non-whitespace character ("Once", " upon", "\n\nThe") tokenizes to exactly the same ids piece by
# piece. A cut needs whitespace after it and none before it, by the tokenizer's \s (Unicode White_Space):
# TOKENIZER_WHITESPACE is sure to be \s; ASCII_WHITESPACE holds all that might be (Python's, a superset).
TOKENIZER_WHITESPACE = np.zeros(256, dtype=bool)
TOKENIZER_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
ASCII_WHITESPACE = np.zeros(256, dtype=bool)
ASCII_WHITESPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
# Non-ASCII: Python's, with U+180E, U+200B and U+FEFF, which older Unicode tables call spaces. In a story holding
# one, no cut follows a non-ASCII character (rare: curly quotes and accents are no whitespace).
NON_ASCII_WHITESPACE = tuple(c.encode() for c in map(chr, range(128, 0xFEFF + 1))
                             if c.isspace() or c in "\u180e\u200b\ufeff")
assert all(2 <= len(c) <= 3 for c in NON_ASCII_WHITESPACE)
# each as a 3-byte big-endian number (2-byte ones with a 0 third byte, matched with the third byte masked off)
WHITESPACE_CODES = np.array([int.from_bytes(c.ljust(3, b"\0"), "big") for c in NON_ASCII_WHITESPACE])

# A piece's hash: the sum of (byte + 1) * HASH_BASE**(position % 4096), mod 2**64. Weights that repeat past 4096
# bytes can only make pieces that long collide, which costs time, never a wrong id; and the table stays 32 KB.
HASH_BASE = np.uint64(0x100000001B3)
HASH_POWERS = np.multiply.accumulate(np.append(np.uint64(1), np.full(4095, HASH_BASE)))
FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # spreads hashes over the slots (Knuth's multiplicative hashing)


# ---- splitting a batch's bytes into pieces ----

def non_ascii_whitespace(blob: np.ndarray) -> np.ndarray:
    """Positions in UTF-8 bytes `blob` where one of NON_ASCII_WHITESPACE starts."""
    lead = np.flatnonzero(blob >= 0xC2)  # lead bytes of 2- to 4-byte sequences: few in English stories
    padded = np.append(blob, np.zeros(2, dtype=np.uint8))
    code = padded[lead].astype(np.int64) << 16 | padded[lead + 1].astype(np.int64) << 8 | padded[lead + 2]
    return lead[np.isin(code, WHITESPACE_CODES) | np.isin(code & ~0xFF, WHITESPACE_CODES)]


def piece_starts(blob: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Where the pieces of the stories blob[starts[i]:ends[i]] (joined) start: at each story's first byte and
    before each whitespace run that follows a non-whitespace byte. A piece is whitespace, then non-whitespace."""
    whitespace = ASCII_WHITESPACE[blob]
    for story in np.unique(np.searchsorted(starts, non_ascii_whitespace(blob), "right") - 1).tolist():
        whitespace[starts[story]:ends[story]] |= blob[starts[story]:ends[story]] >= 0x80
    cut = np.zeros(len(blob), dtype=bool)
    cut[1:] = TOKENIZER_WHITESPACE[blob[1:]] & ~whitespace[:-1]
    cut[starts[ends > starts]] = True
    return np.flatnonzero(cut)


def piece_hashes(blob: np.ndarray, starts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """64-bit hash of each piece of blob, given where they start and each byte's place in its piece."""
    if not len(blob):
        return np.zeros(0, dtype=np.uint64)
    weights = HASH_POWERS[offsets & (len(HASH_POWERS) - 1)]
    weights *= blob + np.uint8(1)  # no 0xFF byte in UTF-8, so byte + 1 fits
    return np.add.reduceat(weights, starts)


# ---- the piece table: rows of ids and bytes, found by hash through open addressing ----

def new_table(encoder) -> dict:
    """A table holding end-of-text as row 0 (byte length -1: no piece matches it), and one pad byte so that
    np.take always has bytes to clip to."""
    return dict(slots=np.full(1 << 12, -1, dtype=np.int32), hashes=np.array([0], dtype=np.uint64),
                ids=np.array([encoder.token_to_id(EOT)]), id_starts=np.array([0]), id_lengths=np.array([1]),
                bytes=np.zeros(1, dtype=np.uint8), byte_starts=np.array([0]), byte_lengths=np.array([-1]),
                uses=np.array([0]))


def home_slots(table: dict, hashes: np.ndarray) -> np.ndarray:
    bits = len(table["slots"]).bit_length() - 1
    return ((hashes * FIBONACCI) >> np.uint64(64 - bits)).astype(np.int64)


def find_rows(table: dict, hashes: np.ndarray) -> np.ndarray:
    """The row holding each hash, or -1; probing slot after slot (linear probing) where another hash sits."""
    slots, mask = table["slots"], len(table["slots"]) - 1
    at = home_slots(table, hashes)
    rows = slots[at].astype(np.int64)
    found = (rows >= 0) & (table["hashes"][rows] == hashes)
    probing = np.flatnonzero((rows >= 0) & ~found)
    while probing.size:
        at[probing] = (at[probing] + 1) & mask
        rows[probing] = slots[at[probing]]
        found[probing] = (rows[probing] >= 0) & (table["hashes"][rows[probing]] == hashes[probing])
        probing = probing[(rows[probing] >= 0) & ~found[probing]]
    return np.where(found, rows, -1)


def fill_slots(table: dict, rows: np.ndarray):
    """Put rows (whose hashes are new and distinct) into free slots; the slots are kept at most 1/3 full."""
    if 3 * len(table["hashes"]) > len(table["slots"]):
        size = len(table["slots"])
        while 3 * len(table["hashes"]) > size:
            size *= 4
        table["slots"] = np.full(size, -1, dtype=np.int32)
        rows = np.arange(1, len(table["hashes"]))  # all of them, into the larger table
    slots, mask = table["slots"], len(table["slots"]) - 1
    at = home_slots(table, table["hashes"][rows])
    waiting = np.arange(len(rows))
    while waiting.size:
        free = waiting[slots[at[waiting]] < 0]
        _, first = np.unique(at[free], return_index=True)  # one row per free slot this round
        placed = free[first]
        slots[at[placed]] = rows[placed]
        waiting = np.setdiff1d(waiting, placed, assume_unique=True)
        at[waiting] = (at[waiting] + 1) & mask


def gather_runs(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """values[starts[0]:starts[0] + lengths[0]], then the next run, ... as one array; and where each run starts
    in it."""
    ends = np.cumsum(lengths)
    out_starts = ends - lengths
    # position k of the output takes values[starts[run] + (k - out_starts[run])]
    return values[np.repeat(starts - out_starts, lengths) + np.arange(ends[-1] if len(ends) else 0)], out_starts


def keep_most_used_rows(table: dict, keep: int):
    """Shrink the table to its `keep` most used rows (end-of-text stays row 0)."""
    uses = table["uses"].copy()
    uses[0] = uses.max() + 1
    kept = np.sort(np.argsort(-uses, kind="stable")[:keep])  # in their old order: row 0 first
    ids, id_starts = gather_runs(table["ids"], table["id_starts"][kept], table["id_lengths"][kept])
    byte_lengths = table["byte_lengths"][kept]
    stored, byte_starts = gather_runs(table["bytes"], table["byte_starts"][kept], np.maximum(byte_lengths, 0))
    table.update(ids=ids, id_starts=id_starts, id_lengths=table["id_lengths"][kept],
                 bytes=np.append(stored, np.uint8(0)),  # and the pad byte (see new_table)
                 byte_starts=byte_starts, byte_lengths=byte_lengths,
                 hashes=table["hashes"][kept],
                 uses=table["uses"][kept] // 2)  # halved: past use counts less than recent
    table["slots"][:] = -1
    fill_slots(table, np.arange(1, len(kept)))


def add_pieces(encoder, table: dict, pieces: list[bytes], hashes: np.ndarray):
    """Tokenize new distinct pieces and append them to the table as rows."""
    texts = [piece.decode() for piece in pieces]  # whole characters: pieces are cut before ASCII whitespace
    # Pieces go in as the words of a few pre-tokenized sequences, not as one sequence each: tokenizers' cost per
    # sequence (and a Python list of ids for each) outweighs tokenizing a short piece. A word is tokenized
    # exactly as it would be alone; word_ids tell which piece each id belongs to. Several sequences keep all
    # cores busy.
    size = -(-len(texts) // PIECE_GROUPS)
    groups = [texts[i:i + size] for i in range(0, len(texts), size)]
    ids, id_lengths = [], []
    for group, e in zip(groups, encoder.encode_batch(groups, is_pretokenized=True, add_special_tokens=False)):
        ids.append(np.array(e.ids, dtype=np.int64))
        id_lengths.append(np.bincount(np.array(e.word_ids, dtype=np.int64), minlength=len(group)))
    ids, id_lengths = np.concatenate(ids), np.concatenate(id_lengths)
    byte_lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    first_row = len(table["hashes"])
    table.update(
        id_starts=np.concatenate([table["id_starts"], len(table["ids"]) + np.cumsum(id_lengths) - id_lengths]),
        id_lengths=np.concatenate([table["id_lengths"], id_lengths]), ids=np.concatenate([table["ids"], ids]),
        byte_starts=np.concatenate([table["byte_starts"],
                                    len(table["bytes"]) + np.cumsum(byte_lengths) - byte_lengths]),
        byte_lengths=np.concatenate([table["byte_lengths"], byte_lengths]),
        bytes=np.concatenate([table["bytes"], np.frombuffer(b"".join(pieces), dtype=np.uint8)]),
        hashes=np.concatenate([table["hashes"], hashes]),
        uses=np.concatenate([table["uses"], np.zeros(len(pieces), dtype=np.int64)]))
    fill_slots(table, np.arange(first_row, first_row + len(pieces)))


# ---- encoding ----

def encode_pieces(encoder, table: dict, batch: list[str], dtype, max_cached_pieces: int = 1 << 18) -> np.ndarray:
    """Token ids of a batch of stories, each followed by end-of-text; only pieces not in `table` are tokenized.

    `table` (empty at first) holds the pieces seen so far: each row's bytes, hash and ids. A piece is taken from
    the table only when its bytes equal the row's, so a hash collision costs time, never correctness. Past
    max_cached_pieces rows the less used half is dropped, so memory stays flat while real text keeps bringing new
    words (names, typos) that are rarely seen again.
    """
    if not table:
        table.update(new_table(encoder))
    elif len(table["hashes"]) > max_cached_pieces:
        keep_most_used_rows(table, max_cached_pieces // 2)
    encoded = [story.encode() for story in batch]
    text = b"".join(encoded)
    blob = np.frombuffer(text, dtype=np.uint8)
    story_ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
    story_starts = np.append(0, story_ends[:-1])
    starts = piece_starts(blob, story_starts, story_ends)
    lengths = np.diff(starts, append=len(blob))
    # per-byte arrays: int32 where it suffices, as they are the bulk of the memory of a batch
    index = np.int32 if max(len(blob), len(table["bytes"])) < 1 << 31 else np.int64
    offsets = np.arange(len(blob), dtype=index) - np.repeat(starts.astype(index), lengths)  # place in its piece
    hashes = piece_hashes(blob, starts, offsets)
    rows = find_rows(table, hashes)
    # a found row must hold the same bytes (np.take clips where a row of another length would run past the end)
    same = table["byte_lengths"][rows] == lengths
    stored_at = np.repeat(table["byte_starts"][rows].astype(index), lengths)
    stored_at += offsets
    stored = np.take(table["bytes"], stored_at, mode="clip")
    same[np.searchsorted(starts, np.flatnonzero(stored != blob), "right") - 1] = False
    missing = np.flatnonzero((rows < 0) | ~same)
    if missing.size:
        pieces = [text[s:s + n] for s, n in zip(starts[missing].tolist(), lengths[missing].tolist())]
        new = dict(zip(pieces, hashes[missing].tolist()))  # distinct pieces, in first-seen order
        new_hashes = np.fromiter(new.values(), dtype=np.uint64, count=len(new))
        if len(np.unique(new_hashes)) < len(new) or (find_rows(table, new_hashes) >= 0).any():
            return encode_directly(encoder, batch, dtype)  # two pieces share a hash: vanishingly rare
        first_row = len(table["hashes"])
        add_pieces(encoder, table, list(new), new_hashes)
        row_of = dict(zip(new, range(first_row, first_row + len(new))))
        rows[missing] = [row_of[piece] for piece in pieces]
    # the rows in output order: each story's pieces, then end-of-text (row 0) in the place left after them
    story_of_piece = np.searchsorted(story_starts, starts, "right") - 1
    output_rows = np.zeros(len(starts) + len(batch), dtype=np.int64)
    output_rows[np.arange(len(starts)) + story_of_piece] = rows
    table["uses"] += np.bincount(output_rows, minlength=len(table["uses"]))
    ids, _ = gather_runs(table["ids"], table["id_starts"][output_rows], table["id_lengths"][output_rows])
    return ids.astype(dtype)


def encode_directly(encoder, batch: list[str], dtype) -> np.ndarray:
    eot = encoder.token_to_id(EOT)
    encodings = encoder.encode_batch(batch, add_special_tokens=False)
    return np.concatenate([np.append(np.array(e.ids, dtype=np.int64), eot) for e in encodings]).astype(dtype)


def ids_dtype(vocab_size: int):
    """The dtype of token ids in a batch, and so in a token cache."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def encode_batches(tokenizer, stories, batch_size: int = 1000, workers: int = 1):
    """Token ids (np array) per batch of stories, in order. With workers > 1, batches are spread over that
    many processes; with one, tokenizers' Rust encoder still spreads each batch's new pieces over all cores."""
    dtype = ids_dtype(len(tokenizer))
    batches = iter(lambda it=iter(stories): list(itertools.islice(it, batch_size)), [])
    if workers <= 1:
        encoder, table = tokenizer.backend_tokenizer, {}
        yield from (encode_pieces(encoder, table, batch, dtype) for batch in batches)
        return
    import multiprocessing

    # spawn, not fork: a forked copy of a tokenizer that already ran its thread pool can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=start_worker, initargs=(tokenizer.backend_tokenizer.to_str(), dtype)) as pool:
        yield from pool.imap(encode_in_worker, batches)


WORKER = {}  # per worker process: its tokenizer and piece table


def start_worker(tokenizer_json: str, dtype):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes already use every core
    from tokenizers import Tokenizer

    WORKER.update(encoder=Tokenizer.from_str(tokenizer_json), table={}, dtype=dtype)


def encode_in_worker(batch: list[str]) -> np.ndarray:
    return encode_pieces(WORKER["encoder"], WORKER["table"], batch, WORKER["dtype"])
