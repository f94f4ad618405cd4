"""corpus.py: local files and hub datasets, read offline from folders and caches in the hub's own layout."""

import numpy as np
import pytest

from helpers import make_stories, write_txt
from tinylm.data.cache import prepare_data


HUB_README = {  # roneneldan/TinyStories' card: metadata, with or without the configs block that names the splits
    "configs": "---\nlicense: cdla-sharing-1.0\nlanguage:\n- en\nconfigs:\n- config_name: default\n  data_files:\n"
               "  - split: train\n    path: data/train-*\n  - split: validation\n    path: data/validation-*\n---\n"
               "# TinyStories\n",
    "no-configs": "---\nlicense: cdla-sharing-1.0\nlanguage:\n- en\n---\n# TinyStories\n"}


def multi_paragraph(stories):
    return [s.replace(". ", ".\n\n", 1) for s in stories]  # V2 stories run over several lines, as the real ones do


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory):
    """A folder laid out as the hub repository roneneldan/TinyStories: datasets' parquet shards under data/ (the
    default splits), the V1 .txt files and the V2 GPT-4 .txt files at the top. Returns (folder, stories by part)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("TinyStories")
    parts = {"train": make_stories(120, seed=1), "validation": make_stories(12, seed=2),
             "v2-train": multi_paragraph(make_stories(90, seed=3)),
             "v2-valid": multi_paragraph(make_stories(9, seed=4))}
    (folder / "data").mkdir()
    shards = [("train-00000-of-00002-2d5a1467fff1081b", parts["train"][:60]),
              ("train-00001-of-00002-5852b56a2bd28fd9", parts["train"][60:]),
              ("validation-00000-of-00001-869c898b519ad725", parts["validation"])]
    for name, stories in shards:
        pq.write_table(pa.table({"text": stories}), folder / "data" / f"{name}.parquet")
    write_txt(folder / "TinyStories-train.txt", parts["train"])
    write_txt(folder / "TinyStories-valid.txt", parts["validation"])
    write_txt(folder / "TinyStoriesV2-GPT4-train.txt", parts["v2-train"])
    write_txt(folder / "TinyStoriesV2-GPT4-valid.txt", parts["v2-valid"])
    return folder, parts


def encoded(tokenizer, stories):
    return [i for s in stories for i in tokenizer.encode(s.strip()) + [tokenizer.eos_token_id]]


@pytest.mark.parametrize("readme", HUB_README)
@pytest.mark.parametrize("streaming", [False, True])
def test_a_copy_of_the_hub_dataset_reads_as_the_hub_does(tmp_path, full, hub_repo, readme, streaming):
    # the same datasets.load_dataset call as for roneneldan/TinyStories, with the folder as its location: the
    # parquet splits only (before, every .txt and .parquet in the folder was read, validation files included)
    folder, parts = hub_repo
    (folder / "README.md").write_text(HUB_README[readme])
    _, splits, report = prepare_data(str(folder), 50257, str(tmp_path / "out"), streaming=streaming, log=print)
    assert (report["train_stories"], report["val_stories"]) == (120, 12)
    assert splits["train"].tolist() == encoded(full, parts["train"])
    assert splits["val"].tolist() == encoded(full, parts["validation"])


@pytest.mark.parametrize("streaming", [False, True])
def test_tinystories_v2_is_selected_by_hub_files(tmp_path, full, hub_repo, streaming):
    folder, parts = hub_repo
    from tinylm.data.corpus import TINYSTORIES_V2
    _, splits, report = prepare_data(str(folder), 50257, str(tmp_path / "out"), hub_files=TINYSTORIES_V2,
                                     streaming=streaming, log=print)
    assert (report["train_stories"], report["val_stories"]) == (90, 9)
    assert splits["train"].tolist() == encoded(full, parts["v2-train"])
    assert splits["val"].tolist() == encoded(full, parts["v2-valid"])


def test_tinystories_v2_by_hub_id_offline_from_the_hub_cache(tmp_path, full, hub_repo, monkeypatch):
    # roneneldan/TinyStories as huggingface_hub caches the V2 files it downloaded: read by hub id, offline
    folder, parts = hub_repo
    from conftest import hub_cache_snapshot
    from tinylm.data.corpus import TINYSTORIES_V2
    hub_cache_snapshot(tmp_path / "hub", "roneneldan/TinyStories", {
        name: str(folder / name) for name in ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt")},
        repo_type="dataset")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _, splits, report = prepare_data("roneneldan/TinyStories", 50257, str(tmp_path / "out"), hub_files=TINYSTORIES_V2,
                                     log=print)
    assert (report["train_stories"], report["val_stories"]) == (90, 9)
    assert splits["train"].tolist() == encoded(full, parts["v2-train"])
    with pytest.raises(ConnectionError, match="roneneldan/TinyStories.*HF_HUB_OFFLINE"):  # V1 files are not cached
        prepare_data("roneneldan/TinyStories", 50257, str(tmp_path / "out2"), hub_files="TinyStories", log=print)
    assert not (tmp_path / "out2").exists()


def test_hub_options_fail_clearly(tmp_path, hub_repo):
    folder, _ = hub_repo
    write_txt(tmp_path / "s.txt", make_stories(20))
    with pytest.raises(ValueError, match="data.hub_files .* names local files"):
        prepare_data(str(tmp_path / "s.txt"), 50257, str(tmp_path / "out"), hub_files="TinyStoriesV2-GPT4")
    with pytest.raises(ValueError, match=r"lacks TinyStoriesV3-train.txt \(data.hub_files = TinyStoriesV3\)"):
        prepare_data(str(folder), 50257, str(tmp_path / "out"), hub_files="TinyStoriesV3", log=print)
    assert not (tmp_path / "out").exists()
    from dataload import main as dataload_main
    assert dataload_main(["--data", str(folder), "--hub_files", "TinyStoriesV2-GPT4", "--streaming", "--vocab_size",
                          "300", "--out", str(tmp_path / "cli")]) is None



def test_a_start_on_an_unchanged_corpus_does_not_read_it_again(tmp_path, monkeypatch):
    import hashlib

    from tinylm.data import corpus
    write_txt(tmp_path / "a.txt", make_stories(30))
    write_txt(tmp_path / "b.txt", make_stories(30, seed=1))
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    (tmp_path / "memo").mkdir()
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: reads.append(f.name) or real(f, name))
    first = corpus.files_digest(files, str(tmp_path / "memo"))
    assert first == corpus.files_digest(files) and len(reads) == 4  # the same digest as without a memo
    assert corpus.files_digest(files, str(tmp_path / "memo")) == first and len(reads) == 4  # nothing read again
    write_txt(tmp_path / "b.txt", make_stories(30, seed=2))  # changed: read again, and a new digest
    assert corpus.files_digest(files, str(tmp_path / "memo")) != first and reads[-1] == files[1] and len(reads) == 5


def test_txt_reading_is_exact_across_chunk_boundaries_and_names_a_bad_byte(tmp_path):
    from tinylm.data.corpus import read_txt

    stories = ["Café “déjà vu” 🙂 said Lily.", "", "Tom ran.\n\nThe end."]
    path = tmp_path / "s.txt"
    path.write_text("\n<|endoftext|>\n".join(stories), encoding="utf-8")
    for chunk_bytes in (1, 3, 7, 1 << 20):  # chunks that cut through the separator and through a 4-byte emoji
        assert list(read_txt(str(path), chunk_bytes)) == [stories[0] + "\n", "\n\n", "\n" + stories[2]]
    good = "Once upon a time.\n<|endoftext|>\nTom ran.\n<|endoftext|>\n".encode()
    path.write_bytes(good + b"Bad \xff here")
    for chunk_bytes in (3, 1 << 20):
        with pytest.raises(ValueError, match=f"not valid UTF-8 \\(byte {len(good) + 4}\\)"):
            list(read_txt(str(path), chunk_bytes))


def test_the_validation_pass_takes_the_stories_the_train_pass_held_out(tmp_path, monkeypatch):
    from tinylm.data import corpus

    write_txt(tmp_path / "s.txt", make_stories(3000, seed=3))
    reads, read_stories = [], corpus.read_stories
    monkeypatch.setattr(corpus, "read_stories", lambda files: reads.append(files) or read_stories(files))
    _, kept, report = prepare_data(str(tmp_path / "s.txt"), 600, str(tmp_path / "kept"), val_fraction=0.05)
    assert len(reads) == 2 and report["val_stories"] == 150  # counting and the train pass; none for validation
    monkeypatch.setattr(corpus, "HELD_OUT_CHARS", 1000)  # too little to keep: the validation pass reads the file
    _, read, _ = prepare_data(str(tmp_path / "s.txt"), 600, str(tmp_path / "read"), val_fraction=0.05)
    assert len(reads) == 5
    assert np.array_equal(kept["val"], read["val"]) and np.array_equal(kept["train"], read["train"])
