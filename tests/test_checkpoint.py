"""checkpoint.py: a crash mid-save is undone, and a bare inference.py picks best/ of the newest finished run,
never last/, a .tmp or an .old folder."""

import json
import os
import subprocess
import sys

from checkpoint import holds_run, newest_model, recover
from model import GPTNeo, GPTNeoConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
