"""Writing files whole, and saying in one sentence why a write failed.

    atomic_write(path, lambda tmp: save(tmp))    # path is the old file or the new one, never half of one
    write_json(path, obj), read_json(path, what)
    storage_failure(error, path, "train.out_dir") -> "the disk holding /x is full (0.1 MB free); free some ..."

A full disk, a read-only mount, a folder the user may not write to, or a file where a folder should be reach the
user as one sentence that names the folder and the setting that chose it; every other error is left as it is.
"""

import errno
import json
import os
import shutil

# errno values that mean "this storage cannot take the write", whatever wrote
FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
READ_ONLY = (errno.EROFS,)
DENIED = (errno.EACCES, errno.EPERM)


def atomic_write(path: str, write):
    """Write through a temporary name and rename, so a crash never leaves a half-written file at `path`; a
    failed write leaves no temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def new_file_mode() -> int:
    """The permissions open() gives a new file under this process's umask (0o644 under the usual 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_text(path: str, text: str):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj):
    atomic_write(path, lambda p: write_text(p, json.dumps(obj, indent=2)))


def read_json(path: str, what: str) -> dict:
    """A JSON file of a checkpoint or cache; a damaged one is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the {what} is damaged; use another {what}") from None


def parents(path: str) -> list[str]:
    """path (made absolute) and every folder above it, innermost first."""
    chain = [os.path.abspath(path)]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    return chain


def outermost_new_folder(path: str) -> str | None:
    """The first folder os.makedirs(path) would create, or None when path exists."""
    missing = [p for p in parents(path) if not os.path.exists(p)]
    return missing[-1] if missing else None


def free_mb(path: str) -> float:
    """MB free on the disk holding path (or its nearest existing parent)."""
    return shutil.disk_usage(next(p for p in parents(path) if os.path.exists(p))).free / 1e6


def storage_failure(error: BaseException, path: str, setting: str) -> str | None:
    """One sentence for a failed write under `path` (a folder that `setting` chose), or None when `error` is not
    about the storage. torch.save reports a full disk as a RuntimeError ("unexpected pos ..."), so any error
    while a disk has under 1 MB free counts as a full disk."""
    where = os.path.abspath(path)
    code = getattr(error, "errno", None)
    if code in FULL or (not isinstance(error, OSError) and free_mb(where) < 1):
        return (f"the disk holding {where} is full ({free_mb(where):,.1f} MB free); free some space, or set "
                f"{setting} to a folder on a larger disk")
    if code in READ_ONLY:
        return f"{where} is on a read-only file system; set {setting} to a folder that can be written"
    if code in DENIED:
        return f"this user may not write to {where}; set {setting} to a folder that can be written"
    if code in (errno.EEXIST, errno.ENOTDIR):  # makedirs met a file where a folder goes
        blocking = next((p for p in parents(where) if os.path.exists(p) and not os.path.isdir(p)), None)
        if blocking is not None:
            return f"{blocking} is a file, not a folder; set {setting} to a folder"
    return None

