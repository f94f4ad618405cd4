"""Token caches: the stories corpus.py reads (local files or the hub), tokenized once under the GPT-Neo tokenizer
trimmed to their most common tokens (tokenizer.py) into memory-mapped files, and the batches training takes from
them. `dataload.py` at the root is the command that builds them ahead of a run; train.py calls prepare_data.

    tokenizer, splits, report = prepare_data("stories.txt", vocab_size=10000, out_dir="data/ts10k")

Stories are separated by <|endoftext|> (the released TinyStories .txt format), or are the `text` field of
.jsonl / .parquet rows or of a `datasets` hub dataset. Every story ends with the end-of-text token.
"""

import errno
import glob
import hashlib
import json
import mmap
import os
import re
import shutil

import numpy as np

from tinylm.data.corpus import HUB_DATASET, note_single_story, resolve_files, split_sources
from tinylm.data.pieces import encode_batches, ids_dtype
from tinylm.data.tokenizer import FULL_VOCAB, gpt_neo_tokenizer, tokenizer_from_file, trim_tokenizer
from tinylm.storage import atomic_write, outermost_new_folder, storage_failure, write_json
from tinylm.wording import plural
CACHE_SETTING = "data.cache_dir (dataload.py --out)"  # what chooses the folder, named in storage errors
CACHE_VERSION = 2  # bump when the cache format or story handling changes (2: small corpora hold out a story)
PARALLEL_BYTES = 16 << 20  # corpora above this are tokenized by one process per core
# A trimmed vocabulary is chosen from token counts over at most about this much text, taken evenly from the whole
# corpus (see spread_sample). On a 2 GB corpus from bench/make_corpus.py, the 10K vocabulary chosen from 64 MB
# keeps 99.834% of the GPT-Neo tokens of other text of that corpus; from 256 MB, 99.839%, at 4x the counting time.
COUNT_SAMPLE_BYTES = 64 << 20


# ---- token counts (tokenizer.py chooses the kept tokens from them) ----

def count_tokens(tokenizer, stories, workers: int = 1) -> np.ndarray:
    """How often each token id occurs when `stories` are encoded (end-of-text once per story)."""
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for ids in encode_batches(tokenizer, stories, workers=workers):
        counts += np.bincount(ids, minlength=len(counts))
    return counts


# ---- token caches ----

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
                      f"{os.path.basename(path)}; free some space, or point {CACHE_SETTING} at a larger disk") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def open_cache(path: str, vocab_size: int) -> np.memmap:
    tokens = np.memmap(path, dtype=ids_dtype(vocab_size), mode="r")
    # Training reads random windows of half a KB: the kernel's readahead would read 128 KB around each (and keep
    # it resident), which on a cache larger than memory or on a cold disk multiplies the I/O.
    mapping = getattr(tokens, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return tokens


def prepare_data(data: str = HUB_DATASET, vocab_size: int = FULL_VOCAB, out_dir: str = "data",
                 val_data: str | None = None, val_fraction: float = 0.01, log=print, tokenizer=None,
                 hub_files: str | None = None, streaming: bool = False):
    """Build or reuse the tokenizer and the train/val token caches under out_dir.

    Returns (tokenizer, {"train": memmap, "val": memmap}, report). Caches are keyed by a hash of the source
    data and the tokenizer, so a changed corpus or vocabulary rebuilds and an unchanged one is reused at once.
    A given `tokenizer` (a resumed run's) is used as it is, whatever vocab_size says. A failure leaves no folder
    that this call created; a failure of the storage (a full disk, a read-only folder) is an OSError of one
    sentence naming the setting that chose out_dir. hub_files and streaming apply to hub datasets (see hub_stories).
    """
    created = outermost_new_folder(out_dir)
    try:
        sources = split_sources(data, val_data, val_fraction, hub_files, streaming, memo_dir=out_dir)
        files = resolve_files(data)
        for path in files or ():
            note_single_story(path, log)
        # Worker processes take a second or so to start: worth it only for corpora larger than a few MB.
        text_bytes = None if files is None else sum(os.path.getsize(f) for f in files)
        big = text_bytes is None or text_bytes > PARALLEL_BYTES
        workers = os.cpu_count() or 1 if big else 1
        os.makedirs(out_dir, exist_ok=True)
        return build_splits(data, sources, vocab_size, out_dir, workers, log, tokenizer, text_bytes)
    except BaseException as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        sentence = storage_failure(e, out_dir, CACHE_SETTING) if isinstance(e, OSError) else None
        if sentence is None:
            raise
        raise OSError(f"cannot write the tokenizer and token caches: {sentence}") from None


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
                      f"or point {CACHE_SETTING} at a larger disk")


def build_splits(data, sources, vocab_size, out_dir, workers, log, tokenizer=None, text_bytes=None):
    """prepare_data's work, inside the folder it made."""
    remove_abandoned_files(out_dir, log)
    if not glob.glob(os.path.join(glob.escape(out_dir), "train-*.bin")):  # a first build: check before counting
        check_free_space(out_dir, text_bytes, np.dtype(ids_dtype(vocab_size)).itemsize)
    if tokenizer is None:
        tokenizer, report = prepare_tokenizer(sources["train"], vocab_size, out_dir, workers, log, text_bytes,
                                              data)
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
            log(f"{split}: reusing {path} ({plural(meta['tokens'], 'token')}, {plural(meta['stories'], 'story')})")
        else:
            check_free_space(out_dir, text_bytes and (text_bytes if split == "train" else text_bytes // 10),
                             np.dtype(ids_dtype(len(tokenizer))).itemsize)
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
            log(f"{split}: wrote {path} ({plural(n, 'token')}, {plural(meta['stories'], 'story')})")
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
                      text_bytes: int | None = None, data: str = "the data"):
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
    if not sample.get("counted_stories"):  # before a tokenizer.json is written for no text
        raise ValueError(f"the train split of {data!r} has no stories: all of them are empty or blank")
    if stride > 1:
        log(f"tokenizer: counted tokens in 1 of every {stride} batches of 1000 stories ({sample['counted_stories']:,} "
            f"stories, 1/{stride} of the text)")
    tokenizer = trim_tokenizer(full, counts, vocab_size)
    kept_mass = coverage(full, tokenizer, counts)
    report = {"vocab_size": vocab_size, "corpus_distinct_tokens": int((counts > 0).sum()),
              "coverage": float(kept_mass), "full_vocab_tokens": int(counts.sum()),
              "tokens_per_story_full_vocab": float(counts.sum() / max(counts[full.eos_token_id], 1)),
              "count_stride": stride}
    atomic_write(path, lambda p: tokenizer.backend_tokenizer.save(p))
    write_json(meta_path, {**want, "report": report})
    log(f"tokenizer: wrote {path} ({vocab_size} tokens; {kept_mass:.2%} of the corpus' GPT-Neo tokens keep their token)")
    return tokenizer, report


def coverage(full, trimmed, counts: np.ndarray) -> float:
    """Share of the GPT-Neo tokens counted in `counts` (by full's ids) that the trimmed tokenizer keeps."""
    kept = trimmed.get_vocab()
    return float(sum(counts[i] for t, i in full.get_vocab().items() if t in kept) / max(counts.sum(), 1))


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
