"""tinylm/hub.py: a model name is a local folder or a hub id, and a mistyped path is said to be a path."""

import subprocess
import sys

import pytest

from helpers import ROOT
from tinylm.hub import looks_like_path, resolve_pretrained


@pytest.mark.parametrize("name", ["out/nope", "out/quickstart/bset", "./nope", "nope", "a/b/c", "/abs/x", "~/x",
                                  "x--y/z", "owner/na me", "owner/"])
def test_a_name_that_looks_like_a_path_is_told_no_folder_is_there(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "quickstart" / "best").mkdir(parents=True)
    assert looks_like_path(name)
    with pytest.raises(FileNotFoundError, match=rf"^no model folder at {name!r}") as e:
        resolve_pretrained(name)
    assert "fetch" not in str(e.value) and "a hub id such as 'roneneldan/TinyStories-1M'" in str(e.value)
    if name.startswith("out/"):  # the folder above it says what is there, which shows the typo
        assert ("(out/ holds quickstart)" if name == "out/nope" else "(out/quickstart/ holds best)") in str(e.value)


def test_an_owner_name_that_is_no_local_folder_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # conftest keeps the hub offline: the fetch fails, naming the hub
    assert not looks_like_path("roneneldan/TinyStories-1M")
    with pytest.raises(OSError, match=r"^could not fetch 'roneneldan/TinyStories-1M' from the Hugging Face hub"):
        resolve_pretrained("roneneldan/TinyStories-1M")
    (tmp_path / "roneneldan").mkdir()  # ...unless its first part is a folder here: then it was meant as a path
    with pytest.raises(FileNotFoundError, match=r"^no model folder at 'roneneldan/TinyStories-1M' \(roneneldan/ is "):
        resolve_pretrained("roneneldan/TinyStories-1M")


@pytest.mark.parametrize("script", [["inference.py"], ["inference.py", "--serve", "--port", "0"],
                                    ["evaluate.py", "--data", "stories.txt"]])
def test_the_scripts_say_a_mistyped_model_folder_is_not_there(tmp_path, script):
    (tmp_path / "out" / "run").mkdir(parents=True)
    (tmp_path / "stories.txt").write_text("Once upon a time.\n<|endoftext|>\n")
    done = subprocess.run([sys.executable, f"{ROOT}/{script[0]}", *script[1:], "--model", "out/nope"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: no model folder at 'out/nope' (out/ holds run)")
