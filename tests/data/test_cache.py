"""tinylm/data/cache.py: token caches and batches, on corpora the tests write themselves."""

import glob
import json
import os

import numpy as np
import pytest
import torch

from helpers import ODD_TEXTS, make_stories, write_txt
from tinylm.data.cache import count_tokens, get_batch, iter_eval_batches, prepare_data
from tinylm.data.corpus import EOT, read_stories
from tinylm.data.tokenizer import trim_tokenizer


def test_prepare_data_caches_reuse_and_rebuild(tmp_path):
    data = write_txt(tmp_path / "train.txt", make_stories(400) + ODD_TEXTS)
    logs = []
    tok, splits, report = prepare_data(data, 600, str(tmp_path / "out"), val_fraction=0.1, log=logs.append)
    assert len(tok) == 600 and report["val_stories"] == 40 and report["train_stories"] == 366
    assert splits["train"].dtype == np.uint16
    eot = tok.eos_token_id
    assert (splits["train"] == eot).sum() == 366 and splits["train"][-1] == eot  # every story ends with EOT
    text = tok.decode(np.asarray(splits["train"]).tolist())
    assert text.count(EOT) == 366 and ODD_TEXTS[1] in text
    assert not any("reusing" in line for line in logs)

    logs.clear()
    _, again, _ = prepare_data(data, 600, str(tmp_path / "out"), val_fraction=0.1, log=logs.append)
    assert sum("reusing" in line for line in logs) == 3  # tokenizer, train, val
    assert np.array_equal(again["train"], splits["train"])

    logs.clear()
    write_txt(tmp_path / "train.txt", make_stories(400, seed=1))  # the corpus changed: everything rebuilds
    prepare_data(data, 600, str(tmp_path / "out"), val_fraction=0.1, log=logs.append)
    assert not any("reusing" in line for line in logs)
    assert not glob.glob(str(tmp_path / "out" / "*.tmp*"))


def test_local_formats_and_skipped_empty_stories(tmp_path):
    stories = make_stories(30)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(f"{stories[0]}\n{EOT}\n\n{EOT}\n   \n{EOT}\n{stories[1]}", encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(stories[2:12])))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": stories[12:30]}), folder / "c.parquet")
    assert list(read_stories(sorted(glob.glob(str(folder / "*")))))[:2] == [f"{stories[0]}\n", "\n\n"]
    _, splits, report = prepare_data(str(folder), 50257, str(tmp_path / "out"), val_data=str(folder / "b.jsonl"))
    assert report["train_stories"] == 30 and report["val_stories"] == 10
    meta = [json.load(open(p)) for p in glob.glob(str(tmp_path / "out" / "train-*.json"))]
    assert meta[0]["skipped_empty"] == 2


@pytest.mark.parametrize("content, message", [
    (b"Once upon a time \xff\xfe there\n<|endoftext|>\n", "not valid UTF-8 .*iconv -f latin1"),
    (b"", "is empty"),
    (bytes(range(256)) * 8, r"is a binary file, not text \(it is not UTF-8 from byte 128 on, and holds NUL bytes\)"),
    ("Once upon a time\n<|endoftext|>\n".encode("utf-16"), "is UTF-16 text; .*iconv -f utf-16 -t utf-8"),
])
def test_bad_files_fail_clearly(tmp_path, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    logs = []
    with pytest.raises(ValueError, match=message):
        prepare_data(str(tmp_path / "bad.txt"), 50257, str(tmp_path / "out"), log=logs.append)
    assert logs == []  # no note that the file reads as one story before the error that it is not stories at all


def test_a_corpus_of_blank_stories_leaves_no_tokenizer(tmp_path):
    (tmp_path / "out").mkdir()
    write_txt(tmp_path / "blank.txt", ["", "   ", "\n\n"] * 5)
    with pytest.raises(ValueError, match=r"the train split of .*blank.txt' has no stories: all of them are empty"):
        prepare_data(str(tmp_path / "blank.txt"), 400, str(tmp_path / "out"))
    assert not glob.glob(str(tmp_path / "out" / "tokenizer*"))


def test_a_read_only_cache_dir_is_one_sentence_naming_the_setting(tmp_path, monkeypatch):
    from conftest import read_only_below
    write_txt(tmp_path / "s.txt", make_stories(50))
    read_only_below(monkeypatch, tmp_path / "ro")
    with pytest.raises(OSError, match=r"^cannot write the tokenizer and token caches: .*ro.cache is on a read-only "
                                      r"file system; set data.cache_dir \(dataload.py --out\) to a folder that can be "
                                      r"written$"):
        prepare_data(str(tmp_path / "s.txt"), 400, str(tmp_path / "ro" / "cache"))


def test_bad_requests_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data at"):
        prepare_data(str(tmp_path / "nothing.txt"), 50257, str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="matches no"):
        prepare_data(str(tmp_path / "*.txt"), 50257, str(tmp_path / "out"))
    (tmp_path / "rows.jsonl").write_text('{"story": "no text field"}\n')
    with pytest.raises(ValueError, match="line 1.*'text'"):
        prepare_data(str(tmp_path / "rows.jsonl"), 50257, str(tmp_path / "out"))
    # JSON may escape half of a UTF-16 pair, which no UTF-8 text can hold; a whole pair is an emoji
    (tmp_path / "pairs.jsonl").write_text('{"text": "A \\ud83d\\ude00 pair."}\n{"text": "A lone \\ud83d half."}\n' * 3)
    with pytest.raises(ValueError, match=r"pairs.jsonl line 2: the text holds a lone UTF-16 surrogate \('\\ud83d'\)"):
        prepare_data(str(tmp_path / "pairs.jsonl"), 50257, str(tmp_path / "out"))
    write_txt(tmp_path / "one.txt", make_stories(1))
    with pytest.raises(ValueError, match="val split .* has no stories; it needs at least two stories .*data.val_dataset"):
        prepare_data(str(tmp_path / "one.txt"), 50257, str(tmp_path / "new" / "out"))
    assert not (tmp_path / "new").exists()  # a failed build leaves no folder behind
    with pytest.raises(ConnectionError, match="hub dataset"):  # HF_HUB_OFFLINE=1 in conftest
        prepare_data("roneneldan/TinyStories", 50257, str(tmp_path / "out"))


def test_batches_are_deterministic_and_eval_covers_the_split_once():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 4, 16, step=7, seed=3)
    x2, y2 = get_batch(tokens, 4, 16, step=7, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.dtype == torch.long and x.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y - x, torch.ones_like(x))
    assert not torch.equal(get_batch(tokens, 4, 16, step=8, seed=3)[0], x)
    with pytest.raises(ValueError, match="block_size"):
        get_batch(tokens[:10], 1, 16, step=0)
    targets = [t for _, yb in iter_eval_batches(tokens, 3, 64) for t in yb[yb != -100].tolist()]
    assert targets == list(range(1, 1000))  # every next-token target exactly once, in order
    xb, yb = next(iter_eval_batches(tokens, 2, 64, max_tokens=100))
    assert (yb != -100).sum() == 100


def test_a_small_corpus_still_holds_out_a_story(tmp_path):
    # 17 stories at the default val_fraction 0.01 would give no validation story: the last one is held out
    write_txt(tmp_path / "s.txt", make_stories(17))
    _, splits, report = prepare_data(str(tmp_path / "s.txt"), 50257, str(tmp_path / "out"), log=lambda *a: None)
    assert (report["train_stories"], report["val_stories"]) == (16, 1)


def test_a_txt_file_without_separators_is_named_as_one_story(tmp_path):
    (tmp_path / "plain.txt").write_text("Once upon a time there was a cat.\n\nThe end.\n" * 20)
    said = []
    with pytest.raises(ValueError, match="at least two stories"):
        prepare_data(str(tmp_path / "plain.txt"), 50257, str(tmp_path / "out"), log=said.append)
    assert any(f"{tmp_path / 'plain.txt'} has no {EOT} line, so it is read as one story" in s for s in said)


def test_a_full_disk_is_one_sentence_before_the_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    write_txt(tmp_path / "s.txt", make_stories(50))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError, match=r"need about .* MB, and the disk holding .*out has 0 MB free; free some "
                                      r"space, or point data.cache_dir"):
        prepare_data(str(tmp_path / "s.txt"), 50257, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    import errno

    from tinylm.data import cache
    real_open = open

    def open_full(path, mode="r", *a, **k):  # the disk fills up while the cache is written
        f = real_open(path, mode, *a, **k)
        if ".bin.tmp" in str(path):
            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f
    monkeypatch.setattr("builtins.open", open_full)
    with pytest.raises(OSError, match=r"filled up after 0 tokens of train-.*\.bin; free some space"):
        cache.prepare_data(str(tmp_path / "s.txt"), 50257, str(tmp_path / "out"))
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()


def test_a_large_corpus_counts_tokens_in_an_even_spread(tmp_path, full, monkeypatch):
    from tinylm.data import cache
    stories = make_stories(5000, seed=5)
    write_txt(tmp_path / "s.txt", stories)
    size = os.path.getsize(tmp_path / "s.txt")
    monkeypatch.setattr(cache, "COUNT_SAMPLE_BYTES", size // 3)  # the corpus is "4 samples large": every 4th batch
    said = []
    tok, _, report = prepare_data(str(tmp_path / "s.txt"), 600, str(tmp_path / "out"), val_fraction=0.5,
                                  log=said.append)
    train = stories[0::2]  # val_fraction 0.5 holds out every other story
    sampled = [s for i, s in enumerate(train) if (i // 1000) % 4 == 0]
    assert report["count_stride"] == 4 and any("1 of every 4 batches of 1000 stories (1,000 stories" in s for s in said)
    assert tok.get_vocab() == trim_tokenizer(full, count_tokens(full, sampled), 600).get_vocab()
    again, _, _ = prepare_data(str(tmp_path / "s.txt"), 600, str(tmp_path / "out"), val_fraction=0.5, log=said.append)
    assert "reusing" in said[-3] and again.get_vocab() == tok.get_vocab()
