"""Run folders: what a training run leaves in its out_dir, written whole or not at all, one writer at a time, and
which folder to load.

    out_dir/best                 the best model so far: a Hugging Face GPT-Neo folder + tokenizer.json,
                                 training_config.json and metrics.json (step, tokens, best validation loss)
    out_dir/last                 the same at the newest step, plus train_state.pt (optimizer, RNG), which --resume needs
    out_dir/metrics.jsonl        every logged loss; its last row has "stop" once the run has ended
    out_dir/loss.png             the loss curves
    out_dir/.lock                while a run writes the folder: an OS lock on it, and which process holds it

`load_model_and_tokenizer` loads any model folder (or hub id) with the tokenizer that belongs to it.

A checkpoint is written as `name.tmp` and swapped in through `name.old`, so a crash at any moment leaves either
the old or the new folder complete; `recover` puts back whichever is whole. Folders named `*.tmp` or `*.old`
are never loaded as models.
"""

import contextlib
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import sys
import time

import torch

from model import GPTNeo
from tinylm.data.tokenizer import load_tokenizer
from tinylm.hub import resolve_pretrained
from tinylm.storage import outermost_new_folder, parents, read_json, storage_failure, write_json

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

CHECKPOINTS = ("best", "last")
RUN_FILES = ("metrics.jsonl", "loss.png")
LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_folder_lock(out_dir: str):
    """Create out_dir and hold an OS lock on out_dir/.lock while the block runs, so that a second train.py,
    --resume or --overwrite into the same folder is refused before any work (a ValueError naming the process
    that holds it). The kernel drops the lock when its process ends in any way, kill -9 included, so a .lock file
    left behind never blocks a later run. A folder this call created and the run left empty is removed."""
    created = outermost_new_folder(out_dir)
    path = os.path.join(out_dir, LOCK_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = acquire(path, out_dir)
    except OSError as e:
        sentence = storage_failure(e, out_dir, "train.out_dir")
        if sentence is None:
            raise
        raise StorageError(f"cannot create the run folder train.out_dir = {out_dir}: {sentence}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still holding the lock; a process waiting on the old file sees it is gone
        lock.close()
        chain = parents(out_dir)  # innermost first: the folders this call made, up to `created`
        for folder in chain[:chain.index(created) + 1] if created else []:
            with contextlib.suppress(OSError):  # only empty folders go
                os.rmdir(folder)


def acquire(path: str, out_dir: str):
    """The open, locked lock file at path, with this process's description written in it."""
    while True:
        lock = open(path, "a+", encoding="utf-8")
        if not try_lock(lock):
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            pid = re.match(r"process (\d+)", holder)
            stop = f"stop it (Ctrl-C or kill {pid[1]}: it saves a checkpoint first)" if pid else "stop it"
            raise ValueError(f"train.out_dir {out_dir} is in use by {holder}: wait for that run to end, {stop}, or "
                             "write this run elsewhere with --set train.out_dir=NEW_DIR")
        # the holder may have ended and removed the file between our open and our lock: lock the file at path
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
                break
        lock.close()
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} (python {shlex.join(sys.argv)}), started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock.flush()
    return lock


def try_lock(f) -> bool:
    """Take an exclusive lock on the open file f without waiting; False when another process holds one."""
    try:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        return True
    except (BlockingIOError, PermissionError):
        return False


def save_checkpoint(folder: str, model: GPTNeo, tokenizer, opt, state: dict, config: dict, resumable: bool = True):
    """Write a complete checkpoint folder next to `folder`, then swap it in, so `folder` is always whole. Only a
    resumable checkpoint (last/) holds train_state.pt, the optimizer state --resume needs; best/ is what people
    share, at the size of the model. A failed write (a full disk, a read-only folder) removes what it wrote and
    raises StorageError; the previous checkpoint stays."""
    tmp, old = folder + ".tmp", folder + ".old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        # tokenizer.json, and tokenizer_config.json for AutoTokenizer (end-of-text token, the model's context)
        tokenizer.save_pretrained(tmp, model_max_length=model.config.max_position_embeddings)
        write_json(os.path.join(tmp, "training_config.json"), config_as_dict(config))
        if resumable:
            torch.save({"optimizer": opt.state_dict(), "state": state, "torch_rng": torch.get_rng_state()},
                       os.path.join(tmp, "train_state.pt"))
        write_json(os.path.join(tmp, "metrics.json"), state)  # last: a folder with it is complete
    except (OSError, RuntimeError) as e:
        sentence = storage_failure(e, os.path.dirname(folder) or ".", "train.out_dir")  # before tmp frees the disk
        shutil.rmtree(tmp, ignore_errors=True)
        if sentence is None:
            raise
        raise StorageError(f"could not save the checkpoint {folder}: {sentence}") from None
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


class StorageError(Exception):
    """A run folder could not be written (full disk, read-only, no permission): one sentence for the user."""


def config_as_dict(config: dict) -> dict:
    """{section: {key: value}} of the config dataclasses, in plain JSON types (tuples become lists)."""
    return json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in config.items()}, default=list))


def recover(folder: str):
    """Undo what a crash inside save_checkpoint left: a missing `folder` comes back from `folder.old`, and
    a half-written `folder.tmp` goes."""
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(folder + ".old", "metrics.json")):
        os.replace(folder + ".old", folder)
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    if os.path.isdir(folder):
        shutil.rmtree(folder + ".old", ignore_errors=True)


def holds_run(out_dir: str) -> list[str]:
    """The names of the things a training run left in out_dir (empty when it holds none)."""
    names = [n + suffix for n in CHECKPOINTS for suffix in ("", ".old", ".tmp")] + list(RUN_FILES)
    return [n for n in names if os.path.exists(os.path.join(out_dir, n))]


def clear_run(out_dir: str):
    """Delete a previous run's checkpoints and logs from out_dir (train.py --overwrite)."""
    for name in holds_run(out_dir):
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def read_resume_point(folder: str) -> tuple[dict, dict]:
    """(training state, saved config sections) of a checkpoint folder, without loading any tensor."""
    return (read_json(os.path.join(folder, "metrics.json"), "checkpoint"),
            read_json(os.path.join(folder, "training_config.json"), "checkpoint"))


def config_changes(saved: dict, config: dict) -> list[tuple[str, object, object]]:
    """(section.key, saved value, new value) for every setting that differs from a checkpoint's."""
    now = config_as_dict(config)
    return [(f"{section}.{key}", saved.get(section, {}).get(key), value)
            for section, values in now.items() for key, value in values.items()
            if saved.get(section, {}).get(key, value) != value]


def load_checkpoint(folder: str, model: GPTNeo, opt) -> dict:
    """Restore weights, optimizer and RNG from a checkpoint folder; return the training state."""
    model.load_state_dict(GPTNeo.from_pretrained(folder).state_dict(), strict=True)
    path = os.path.join(folder, "train_state.pt")
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read {path} ({type(e).__name__}): the checkpoint is damaged") from None
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["state"]


def run_has_ended(out_dir: str) -> bool:
    """True when the run's metrics.jsonl ends with the row train.py writes when the run stops."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 4096))
            last = f.read().splitlines()[-1]
        return "stop" in json.loads(last)
    except (OSError, ValueError, IndexError):
        return False


def is_model_folder(folder: str, root: str) -> bool:
    """A complete model folder under root whose name (or a parent's below root) is not a .tmp/.old copy."""
    parts = os.path.relpath(folder, root).split(os.sep)
    if any(p.endswith(".old") or ".tmp" in p for p in parts):
        return False
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.isfile(os.path.join(folder, w)) for w in ("model.safetensors", "pytorch_model.bin"))


def newest_model(root: str) -> tuple[str | None, str]:
    """(folder, why) of the model a bare `inference.py` samples: best/ of the newest run that has ended, else
    the newest best/, else the newest other model folder under root (never last/, .tmp or .old)."""
    folders = model_folders(root)
    if not folders:
        return None, ""
    newest = lambda fs: max(fs, key=saved_at)
    best = [f for f in folders if os.path.basename(f) == "best"]
    ended = [f for f in best if run_has_ended(os.path.dirname(f))]
    if ended:
        return newest(ended), "the best model of the newest finished run"
    if best:
        return newest(best), "the best model so far of a run that has not finished"
    return newest(folders), "the newest model folder"


def model_folders(root: str) -> list[str]:
    """Every complete model folder under root but last/ (resuming's, not sampling's), and never .tmp or .old."""
    folders = [os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "config.json"), recursive=True)]
    return [f for f in folders if is_model_folder(f, root) and os.path.basename(f) != "last"]


def finished_models(root: str) -> list[str]:
    """best/ of every run under root that has ended, newest first: the models `inference.py --serve` offers."""
    ended = [f for f in model_folders(root) if os.path.basename(f) == "best" and run_has_ended(os.path.dirname(f))]
    return sorted(ended, key=saved_at, reverse=True)


def saved_at(folder: str) -> float:
    """When a model folder was written: its config.json's modification time."""
    return os.path.getmtime(os.path.join(folder, "config.json"))


def resumable_checkpoint(folder: str) -> str | None:
    """`folder`, or the copy a crash in the middle of save_checkpoint left, if it holds a training state."""
    for candidate in (folder, folder + ".old"):
        if all(os.path.isfile(os.path.join(candidate, n)) for n in ("train_state.pt", "metrics.json")):
            return candidate
    return None


def check_run_folder(args, config: dict) -> list[str]:
    """Before any work, refuse with one sentence (a ValueError) a new run into a folder that holds one, and a
    resume that could not continue what the checkpoint holds: another model shape or tokenizer, or a limit the
    run has already reached. Returns notes on the settings a resumed run changes."""
    t = config["train"]
    existing = holds_run(t.out_dir)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in train.out_dir and --overwrite replaces it; pass one of them")
    if not args.resume:
        if existing and not args.overwrite:
            raise ValueError(f"train.out_dir {t.out_dir} already holds a training run ({', '.join(existing)}): "
                             "continue it with --resume, start a new one with --set train.out_dir=NEW_DIR, or "
                             "pass --overwrite to delete it and start over")
        return []
    folder = resumable_checkpoint(os.path.join(t.out_dir, "last"))
    if folder is None:
        raise ValueError(f"cannot resume: {os.path.join(t.out_dir, 'last')} holds no checkpoint; drop --resume to "
                         "start a new run")
    state, saved = read_resume_point(folder)
    changes = config_changes(saved, config)
    fixed = [c for c in changes if c[0].startswith("model.") or c[0] == "data.tokenizer"]
    # the head layout follows n_layer: name it only when nothing else differs
    fixed = [c for c in fixed if c[0] not in ("model.attention_types", "model.local_heads")] or fixed
    if fixed:
        raise ValueError(f"--resume: {folder} was trained with " + ", ".join(f"{k}={old}" for k, old, _ in fixed)
                         + "; this run asks for " + ", ".join(f"{k}={new}" for k, _, new in fixed)
                         + ": a resumed run keeps its model and tokenizer, so drop those settings or start a new run "
                         "with --set train.out_dir=NEW_DIR")
    spent = [(state["step"] >= t.max_steps, f"{state['step']} steps", "max_steps", t.max_steps, 2 * t.max_steps),
             (bool(t.max_tokens) and state["tokens"] >= (t.max_tokens or 0), f"{state['tokens']:,} tokens",
              "max_tokens", t.max_tokens, 2 * (t.max_tokens or 0)),
             (bool(t.max_minutes) and state["elapsed"] >= 60 * (t.max_minutes or 0),
              f"{state['elapsed'] / 60:.1f} minutes", "max_minutes", t.max_minutes, 2 * (t.max_minutes or 0)),
             (bool(t.patience) and state["bad_evals"] >= t.patience,
              f"{state['bad_evals']} evaluations without improvement", "patience", t.patience, 2 * t.patience)]
    for done, used, key, limit, more in spent:
        if done:
            raise ValueError(f"--resume: the run in {t.out_dir} has already trained {used}, its train.{key} = "
                             f"{limit}; to train on, raise it, e.g. --set train.{key}={more:g}")
    return [f"resuming with {key} = {new} (the checkpoint has {old})" for key, old, new in changes]


def command(args, world: int, resume: bool, sets: dict[str, str] | None = None) -> str:
    """The command line that runs this config again (with --resume and extra --set values)."""
    items = {s.partition("=")[0].strip(): s for s in args.set}
    items.update({k: f"{k}={v}" for k, v in (sets or {}).items()})
    launcher = ["python"] if world == 1 else ["torchrun", "--standalone", "--nproc_per_node", str(world)]
    words = launcher + ["train.py", "--config", args.config] + [w for s in items.values() for w in ("--set", s)]
    if args.use_wandb:
        words += ["--use_wandb", "--wandb_project", args.wandb_project]
    return shlex.join(words + (["--resume"] if resume else []))


def load_model_and_tokenizer(name_or_path: str, device):
    """Model and its tokenizer: the folder's tokenizer.json if it has one, else the GPT-Neo tokenizer."""
    folder = resolve_pretrained(name_or_path)  # a hub id is fetched into the local hub cache
    model = GPTNeo.from_pretrained(folder).to(device)
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) > model.config.vocab_size:
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise ValueError(f"{folder} has no tokenizer.json, and its model has {model.config.vocab_size} tokens, "
                             f"not the {len(tokenizer)} of GPT-Neo's tokenizer: copy the tokenizer.json of the run "
                             f"that trained it into {folder}")
        raise ValueError(f"{os.path.join(folder, 'tokenizer.json')} has {len(tokenizer)} tokens but the model only "
                         f"{model.config.vocab_size}: put the tokenizer.json the model was trained with into {folder}")
    return model, tokenizer


def run_folder_model(name: str) -> str:
    """A training run's folder (out/quickstart) stands for the best model it holds (out/quickstart/best); a
    folder of runs (out/) is an error that names what it holds."""
    if not os.path.isdir(name) or os.path.isfile(os.path.join(name, "config.json")):
        return name
    best = os.path.join(name, "best")
    if is_model_folder(best, name):
        print(f"# {name} is a training run: using its best model, {best}", file=sys.stderr)
        return best
    newest, _ = newest_model(name)
    if newest is not None:
        raise ValueError(f"{name} is no model folder but holds some, e.g. {newest}: pass that one with --model")
    return name
