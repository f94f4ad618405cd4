"""dataload.py, the command that builds the tokenizer and token caches ahead of training (the library behind it,
tinylm/data/cache.py, has its tests in data/test_cache.py)."""

import glob
import signal
import subprocess
import sys

from dataload import main as dataload_main
from helpers import ROOT, make_stories, write_txt
from tinylm.data.cache import prepare_data


def test_the_command_builds_the_caches_of_a_small_corpus(tmp_path):
    write_txt(tmp_path / "s.txt", make_stories(17))
    assert dataload_main(["--data", str(tmp_path / "s.txt"), "--out", str(tmp_path / "cli")]) is None


def test_a_killed_build_leaves_nothing_that_passes_as_complete(tmp_path):
    write_txt(tmp_path / "s.txt", make_stories(3000))
    out = tmp_path / "out"
    # the build writes its first batch of tokens, says so, then hangs until it is killed
    code = ("import sys, time, dataload\n"
            "from tinylm.data import cache\n"
            "real = cache.encode_batches\n"
            "def hanging(*a, **k):\n"
            "    batches = real(*a, **k)\n"
            "    yield next(batches)\n"
            "    print('building', flush=True)\n"
            "    time.sleep(600)\n"
            "cache.encode_batches = hanging\n"
            "dataload.main(sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "--data", str(tmp_path / "s.txt"), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "building\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert glob.glob(str(out / "*.tmp*")) and not glob.glob(str(out / "train-*.bin"))  # half a cache, by its tmp name
    said = []
    _, splits, report = prepare_data(str(tmp_path / "s.txt"), 50257, str(out), log=said.append)
    assert any("removed" in s and "interrupted build" in s for s in said) and not glob.glob(str(out / "*.tmp*"))
    assert report["train_stories"] + report["val_stories"] == 3000


def test_the_hub_dataset_unreachable_names_the_commands_flag(tmp_path, capsys):
    # conftest sets HF_HUB_OFFLINE=1 and the hub's stories are not in the local cache: the error says what to pass
    # to this command (--data), not only the config key train.py reads
    import pytest
    with pytest.raises(SystemExit) as e:
        dataload_main(["--out", str(tmp_path / "out")])
    assert str(e.value).startswith("error: could not load the hub dataset 'roneneldan/TinyStories'")
    assert "point data.dataset (dataload.py --data) at them" in str(e.value)
    assert not (tmp_path / "out").exists()  # no half-made folder left behind
