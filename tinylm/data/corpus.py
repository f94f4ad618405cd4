"""Where TinyLM's stories come from: local .txt / .jsonl / .parquet files, a hub dataset through `datasets` (or a
local copy of one in the hub's layout), and the deterministic train/validation split of a single corpus.

Stories are separated by <|endoftext|> (the released TinyStories .txt format), or are the `text` field of
.jsonl / .parquet rows or of a `datasets` hub dataset.
"""

import glob
import hashlib
import json
import os
import re

EOT = "<|endoftext|>"
HUB_DATASET = "roneneldan/TinyStories"
TINYSTORIES_V2 = "TinyStoriesV2-GPT4"  # data.hub_files value: the hub repo's V2 text files, GPT-4 stories only
FILE_TYPES = (".txt", ".jsonl", ".parquet")
HELD_OUT_CHARS = 64 << 20  # validation text a train pass keeps for the validation pass (see take_every)


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


def split_at_eot(texts, separator: str | bytes = EOT):
    """Stories of a stream of text pieces that, joined, hold stories separated by <|endoftext|> (str, or bytes
    with separator=EOT.encode())."""
    pending = separator[:0]
    for text in texts:
        pending += text
        *stories, pending = pending.split(separator)
        yield from stories
    yield pending


def read_txt(path: str, chunk_bytes: int = 1 << 20):
    """Stories of a .txt file separated by <|endoftext|>, streamed; invalid UTF-8 is an error with its offset.

    The bytes are split before decoding (a UTF-8 sequence never holds an ASCII byte): splitting a decoded chunk
    costs 4x more, since one curly quote makes Python store the whole chunk as UCS-2."""
    def chunks():
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(chunk_bytes), b"")

    separator, offset = EOT.encode(), 0  # offset: where the story starts in the file
    for story in split_at_eot(chunks(), separator):
        try:
            yield story.decode("utf-8")
        except UnicodeDecodeError as e:
            if story.startswith((b"\xff\xfe", b"\xfe\xff")) and offset == 0:
                raise ValueError(f"{path} is UTF-16 text; convert it to UTF-8, e.g. iconv -f utf-16 -t utf-8") from None
            if b"\0" in story:  # not UTF-8 and holding NUL bytes: a binary file, not text in another encoding
                raise ValueError(f"{path} is a binary file, not text (it is not UTF-8 from byte {offset + e.start} "
                                 "on, and holds NUL bytes); stories come as UTF-8 text in .txt, .jsonl or .parquet "
                                 "files") from None
            raise ValueError(f"{path} is not valid UTF-8 (byte {offset + e.start}); convert it, e.g. "
                             f"iconv -f latin1 -t utf-8") from None
        offset += len(story) + len(separator)


def read_jsonl(path: str):
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {n}: expected a JSON object with a 'text' field ({e})") from None
            if b"\\ud" in line.lower() and isinstance(text, str):  # a \ud800-\udfff escape: half of a UTF-16 pair
                try:
                    text.encode()
                except UnicodeEncodeError as e:
                    raise ValueError(f"{path} line {n}: the text holds a lone UTF-16 surrogate "
                                     f"({ascii(e.object[e.start])}), which is no character; remove it or write the "
                                     "whole pair") from None
            yield text


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
        if not path.endswith(FILE_TYPES):
            raise ValueError(f"{path} is not a {', '.join(FILE_TYPES)} file; stories come in one of those")
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
                              f"({type(e).__name__}); offline, point data.dataset (dataload.py --data) at local TinyStories text files (a "
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
        raise ValueError(f"{location} is read as a copy of a hub dataset repository (see corpus.is_hub_repo_folder), "
                         f"but it lacks {need}: {type(e).__name__}: {str(e)[:200]}") from None


def hub_file(repo_id: str, name: str) -> str:
    """A file of a hub dataset repository, downloaded once into the huggingface_hub cache (offline: from it)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, name, repo_type="dataset")


def hub_error(name: str, e: Exception) -> ConnectionError:
    offline = " (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set and it is not in the local cache)" \
        if hub_offline() else ""
    return ConnectionError(f"could not load the hub dataset {name!r}{offline} ({type(e).__name__}); offline, download "
                           "its text files elsewhere and point data.dataset (dataload.py --data) at them (a file, folder or glob)")


def non_empty(stories, stats: dict):
    """Stripped stories, counting them in stats["stories"] and skipped empty ones in stats["skipped_empty"]."""
    for story in stories:
        story = story.strip()
        key = "stories" if story else "skipped_empty"
        stats[key] = stats.get(key, 0) + 1
        if story:
            yield story


def take_every(stories, fraction: float, want_val: bool, stats: dict, held_out: dict | None = None):
    """Deterministic split: story i goes to validation when floor((i + 1) * f) > floor(i * f), an even spread
    of exactly `fraction` of the stories. When that picks none of two or more stories (a corpus of fewer than
    1 / f), the last story is held out, so a small corpus still has a validation split.

    held_out (train side only): gets the validation stories passed by, in held_out["stories"] while they hold at
    most HELD_OUT_CHARS of text, and held_out["complete"] = True at the end of a pass that kept them all."""
    if held_out is not None:
        held_out.clear()
        held_out["stories"], kept_chars = [], 0
    stories = iter(stories)
    story, i, any_val = next(stories, None), 0, False
    while story is not None:
        following = next(stories, None)  # one story of lookahead tells which one is last
        is_val = int((i + 1) * fraction) > int(i * fraction) or (following is None and not any_val and i > 0)
        any_val |= is_val
        if is_val == want_val:
            stats["stories"] = stats.get("stories", 0) + 1
            yield story
        elif held_out is not None and "stories" in held_out:
            kept_chars += len(story)
            if kept_chars <= HELD_OUT_CHARS:
                held_out["stories"].append(story)
            else:  # too much to keep: the validation pass reads the corpus again
                del held_out["stories"]
        story, i = following, i + 1
    if held_out is not None and "stories" in held_out:
        held_out["complete"] = True


def split_sources(data: str, val_data: str | None, val_fraction: float, hub_files: str | None = None,
                  streaming: bool = False, memo_dir: str | None = None) -> dict:
    """split name -> (a description of its source for the cache key, stats -> stream of its stories). memo_dir:
    where files_digest keeps the digests of local files."""
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
                         f"{HUB_DATASET}, but data.dataset (dataload.py --data) = {data} names local files; drop hub_files or point "
                         "at the hub dataset")
    if val_data is not None:
        val_files = resolve_files(val_data)
        if val_files is None:
            raise ValueError("data.val_dataset (dataload.py --val_data) must name local files when data.dataset does")
        return {"train": (files_digest(files, memo_dir), lambda stats: non_empty(read_stories(files), stats)),
                "val": (files_digest(val_files, memo_dir), lambda stats: non_empty(read_stories(val_files), stats))}
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction (dataload.py --val_fraction) must be in (0, 1) when no validation files "
                         f"are given, got {val_fraction}")
    key = f"{files_digest(files, memo_dir)}:val_fraction={val_fraction}"
    held_out = {}  # what a whole train pass went past: then the validation pass need not read the corpus again

    def stories(stats: dict, want_val: bool):
        if want_val and held_out.get("complete"):
            kept = held_out["stories"]
            held_out.clear()
            stats["stories"] = len(kept)
            return iter(kept)
        # Empty stories are dropped before the split, so both splits see the same story numbering.
        return take_every(non_empty(read_stories(files), {}), val_fraction, want_val, stats,
                          None if want_val else held_out)
    return {"train": (key, lambda stats: stories(stats, False)), "val": (key, lambda stats: stories(stats, True))}


def folder_signature(folder: str) -> str:
    """The absolute path, names, sizes and modification times of a folder's files: cheap, and changes with them."""
    entries = sorted((os.path.relpath(p, folder), os.path.getsize(p), int(os.path.getmtime(p)))
                     for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))
    return hashlib.sha256(repr((os.path.abspath(folder), entries)).encode()).hexdigest()


def files_digest(files: list[str], memo_dir: str | None = None) -> str:
    """sha256 over the files' sha256s. With memo_dir, each file's is kept in memo_dir/file_digests.json under its
    path, size and modification time, so a start on an unchanged 2 GB corpus does not read it again."""
    memo_path = os.path.join(memo_dir, "file_digests.json") if memo_dir else None
    try:
        with open(memo_path) as f:
            memo = json.load(f)
    except (TypeError, OSError, ValueError):
        memo = {}
    h, changed = hashlib.sha256(), False
    for path in files:
        stat, key = os.stat(path), os.path.abspath(path)
        if memo.get(key, [None])[:2] != [stat.st_size, stat.st_mtime_ns]:
            with open(path, "rb") as f:
                memo[key] = [stat.st_size, stat.st_mtime_ns, hashlib.file_digest(f, "sha256").hexdigest()]
            changed = True
        h.update(bytes.fromhex(memo[key][2]))
    if changed and memo_path and os.path.isdir(memo_dir):
        tmp = f"{memo_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, memo_path)
    return h.hexdigest()


def note_single_story(path: str, log):
    """Say so when a .txt file has no <|endoftext|> in its first MB: it would be read as a single story."""
    if path.endswith(".txt"):
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        if head and EOT.encode() not in head and b"\0" not in head:  # an empty or binary file is an error later
            log(f"note: {path} has no {EOT} line" + (" in its first MB" if len(head) == 1 << 20 else "") +
                f", so it is read as one story; TinyStories files end every story with a {EOT} line")
