"""storage.py: files are written whole, and a write the storage refuses is one sentence naming the setting."""

import errno
import os

import pytest

from tinylm import storage
from tinylm.storage import atomic_write, storage_failure


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")

    def write_half(tmp):
        with open(tmp, "w") as f:
            f.write("ne")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError):
        atomic_write(str(path), write_half)
    assert os.listdir(tmp_path) == ["config.json"] and path.read_text() == "old"
    atomic_write(str(path), lambda tmp: open(tmp, "w").write("new"))
    assert os.listdir(tmp_path) == ["config.json"] and path.read_text() == "new"


def test_each_storage_failure_is_one_sentence_naming_the_setting(tmp_path, monkeypatch):
    where = str(tmp_path / "run")
    assert storage_failure(OSError(errno.EROFS, "Read-only file system"), where, "train.out_dir") == \
        f"{where} is on a read-only file system; set train.out_dir to a folder that can be written"
    assert storage_failure(OSError(errno.EACCES, "Permission denied"), where, "train.out_dir") == \
        f"this user may not write to {where}; set train.out_dir to a folder that can be written"
    assert storage_failure(OSError(errno.ENOSPC, "No space left"), where, "train.out_dir").startswith(
        f"the disk holding {where} is full (")
    (tmp_path / "notes.txt").write_text("a file where a folder should be")
    in_the_way = str(tmp_path / "notes.txt" / "run")
    assert storage_failure(OSError(errno.ENOTDIR, "Not a directory"), in_the_way, "data.cache_dir") == \
        f"{tmp_path / 'notes.txt'} is a file, not a folder; set data.cache_dir to a folder"
    # torch.save says a full disk as a RuntimeError: it counts as one only when the disk is full
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1580416 vs 1580308")
    assert storage_failure(torch_error, where, "train.out_dir") is None
    monkeypatch.setattr(storage, "free_mb", lambda path: 0.2)
    assert storage_failure(torch_error, where, "train.out_dir").startswith(f"the disk holding {where} is full (0.2 MB")
    assert storage_failure(OSError(errno.EIO, "I/O error"), where, "train.out_dir") is None  # not the user's to fix
