"""checkpoint.py: a crash mid-save is undone, a bare inference.py picks best/ of the newest finished run (never
last/, a .tmp or an .old folder), one process at a time writes a run folder, and a full disk or a read-only
folder ends a run in one sentence that keeps the checkpoints it had."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import read_only_below
from helpers import ROOT
from model import GPTNeo, GPTNeoConfig
from tinylm.checkpoint import holds_run, newest_model, recover



def save_model(folder, mtime):
    GPTNeo(GPTNeoConfig(n_layer=1, n_head=2, n_embd=16, max_position_embeddings=32)).save_pretrained(str(folder))
    os.utime(folder / "config.json", (mtime, mtime))


def end_run(out_dir, stop=True):
    rows = [{"step": 5, "loss": 3.0}] + ([{"step": 5, "stop": "max_steps reached"}] if stop else [])
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bare_inference_picks_best_of_the_newest_finished_run(tmp_path):
    out = tmp_path / "out"
    save_model(out / "old" / "best", 100)
    end_run(out / "old")
    save_model(out / "finished" / "best", 200)
    end_run(out / "finished")
    save_model(out / "finished" / "last", 300)
    save_model(out / "running" / "best", 400)  # newer, but its run has not ended
    end_run(out / "running", stop=False)
    save_model(out / "crashed" / "best.tmp", 500)  # half-written copies are never models
    save_model(out / "crashed" / "last.old", 600)
    assert newest_model(str(out)) == (str(out / "finished" / "best"), "the best model of the newest finished run")
    for name in ("old", "finished"):
        (out / name / "metrics.jsonl").unlink()
    assert newest_model(str(out)) == (str(out / "running" / "best"),
                                      "the best model so far of a run that has not finished")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), "--max_new_tokens", "3"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"sampling from {os.path.join('out', 'running', 'best')}, the best model so far" in r.stderr


def test_recover_undoes_a_crash_inside_save_checkpoint(tmp_path):
    # save_checkpoint writes last.tmp, moves last to last.old, then last.tmp to last: a crash between the moves
    # leaves last.old (complete) and last.tmp (maybe not)
    for name in ("last.old", "last.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "last.old" / "train_state.pt").write_bytes(b"state")
    (tmp_path / "last.old" / "metrics.json").write_text("{}")  # written last: the folder is complete
    assert holds_run(str(tmp_path)) == ["last.old", "last.tmp"]
    recover(str(tmp_path / "last"))
    assert sorted(os.listdir(tmp_path)) == ["last"] and (tmp_path / "last" / "train_state.pt").exists()


# ---- one writer per run folder; a full disk or a read-only folder is one sentence ----

def hold_lock(out_dir):
    """Another process that holds out_dir's lock until it is killed, as a live train.py does."""
    program = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tinylm.checkpoint import run_folder_lock\n"
               "with run_folder_lock(sys.argv[2]):\n    print('held', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", program, ROOT, str(out_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_folder_in_use_is_refused_before_any_work_and_a_killed_holder_never_blocks(tmp_path, capsys):
    from helpers import train_config
    from train import main as train_main
    config = train_config(tmp_path, max_steps=2, eval_interval=2)
    assert train_main(["--config", config]) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    holder = hold_lock(tmp_path / "out")
    try:
        capsys.readouterr()
        for flags in ([], ["--resume", "--set", "train.max_steps=4"], ["--overwrite"]):
            with pytest.raises(SystemExit) as e:
                train_main(["--config", config, *flags])
            message = str(e.value)
            assert message.startswith(f"error: train.out_dir {tmp_path / 'out'} is in use by process {holder.pid} (")
            assert f"kill {holder.pid}" in message and "--set train.out_dir=NEW_DIR" in message and "\n" not in message
            assert capsys.readouterr().out == ""  # refused before any work: nothing loaded, nothing printed
        assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".lock"} == \
            before  # --overwrite deleted nothing of the live run's folder
    finally:
        holder.kill()  # as kill -9: its .lock file stays, and the kernel drops its lock
        holder.wait()
    assert (tmp_path / "out" / ".lock").exists()
    assert train_main(["--config", config, "--resume", "--set", "train.max_steps=4"]) == 0
    assert not (tmp_path / "out" / ".lock").exists()  # a run that ends removes its lock file


def fail_third_train_state_save(monkeypatch, error):
    """torch.save of train_state.pt fails on its third call (last/ at the second evaluation after step 0), after
    writing part of the file, as a full disk does."""
    from tinylm import checkpoint
    real_save, calls = torch.save, {"n": 0}

    def save(obj, path):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a zip file")
            raise error
        return real_save(obj, path)
    monkeypatch.setattr(checkpoint.torch, "save", save)


@pytest.mark.parametrize("error, sentence", [
    # torch.save reports a full disk as this RuntimeError, not as an OSError
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1580416 vs 1580308"),
     "the disk holding {out} is full (0.0 MB free); free some space, or set train.out_dir to a folder on a larger "
     "disk"),
    (OSError(errno.EROFS, "Read-only file system"),
     "{out} is on a read-only file system; set train.out_dir to a folder that can be written"),
])
def test_a_failed_save_keeps_the_previous_checkpoints_and_says_so(tmp_path, monkeypatch, error, sentence):
    from tinylm import storage
    from helpers import train_config
    from train import main as train_main
    config = train_config(tmp_path, max_steps=8, eval_interval=2)
    with monkeypatch.context() as patch:
        fail_third_train_state_save(patch, error)
        patch.setattr(storage, "free_mb", lambda path: 0.0)
        with pytest.raises(SystemExit) as e:
            train_main(["--config", config])
    out = tmp_path / "out"
    first, continue_line = str(e.value).split("\n")
    assert first == (f"error: could not save the checkpoint {out / 'last'}: " + sentence.format(out=out) +
                     "; the checkpoints saved before are kept")
    assert continue_line.startswith("  continue, once it is fixed: python train.py --config ")
    assert continue_line.endswith(" --resume")
    assert sorted(os.listdir(out)) == ["best", "last", "metrics.jsonl"]  # no .tmp, no .lock
    assert json.loads((out / "last" / "metrics.json").read_text())["step"] == 2  # the save before the failure
    assert GPTNeo.from_pretrained(str(out / "last")) is not None
    assert train_main(["--config", config, "--resume"]) == 0  # once fixed, the run goes on
    assert json.loads((out / "last" / "metrics.json").read_text())["step"] == 8


def test_an_out_dir_that_cannot_be_created_is_one_sentence_before_any_work(tmp_path, monkeypatch, capsys):
    from helpers import train_config
    from train import main as train_main
    read_only_below(monkeypatch, tmp_path / "ro")
    with pytest.raises(SystemExit) as e:
        train_main(["--config", train_config(tmp_path, out_dir=tmp_path / "ro" / "run")])
    assert str(e.value) == (f"error: cannot create the run folder train.out_dir = {tmp_path / 'ro' / 'run'}: "
                            f"{tmp_path / 'ro' / 'run'} is on a read-only file system; set train.out_dir to a folder "
                            "that can be written")
    assert capsys.readouterr().out == "" and not (tmp_path / "cache").exists()  # before the data is loaded


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(options): a real tmpfs file system at a new folder; skipped where this user may not mount."""
    mounted = []

    def mount(options: str):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_real_full_disk_and_a_real_read_only_folder(tmp_path, mount_tmpfs):
    from helpers import train_config
    from train import main as train_main
    disk = mount_tmpfs("size=1m")  # room for the first best/ and last/ (about 0.7 MB), not for the next copies
    config = train_config(tmp_path, max_steps=1000, eval_interval=2, out_dir=disk / "run")
    with pytest.raises(SystemExit) as e:
        train_main(["--config", config])
    message = str(e.value)
    assert message.startswith("error: ") and "Traceback" not in message
    assert f"the disk holding {disk / 'run'} is full" in message and "set train.out_dir to a folder" in message
    leftovers = [p.name for p in disk.rglob("*") if ".tmp" in p.name or p.name in (".lock", "best.old", "last.old")]
    assert leftovers == []
    assert GPTNeo.from_pretrained(str(disk / "run" / "last")) is not None  # the checkpoint before is whole
    read_only = mount_tmpfs("ro,size=1m")
    with pytest.raises(SystemExit, match=f"^error: cannot create the run folder train.out_dir = {read_only / 'run'}: "
                                         ".* is on a read-only file system; set train.out_dir to a folder"):
        train_main(["--config", train_config(tmp_path, out_dir=read_only / "run")])
