"""evaluate.py: models side by side; an untrained model scores chance; every mistake is one sentence."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from evaluate import main as evaluate_main
from helpers import ROOT
from helpers import make_stories, write_txt
from model import GPTNeo, GPTNeoConfig

SHARED_TEST = os.path.join(ROOT, "..", "shared", "data", "tinystories_test.txt")


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A model that never saw a story (GPT-Neo's initialization, its full vocabulary, no tokenizer.json: the
    GPT-Neo tokenizer applies), and held-out stories: the shared test split where it is, else generated ones."""
    folder = tmp_path_factory.mktemp("untrained")
    torch.manual_seed(0)
    GPTNeo(GPTNeoConfig(max_position_embeddings=256, n_layer=2, n_head=2, n_embd=32, window_size=16)).save_pretrained(
        str(folder))
    data = SHARED_TEST if os.path.isfile(SHARED_TEST) else write_txt(folder / "held_out.txt", make_stories(400, 7))
    return str(folder), data


def test_an_untrained_model_scores_chance(untrained, tmp_path, capsys):
    folder, data = untrained
    evaluate_main(["--model", folder, "--data", data, "--json", str(tmp_path / "r.json"), "--completion_tokens", "4"])
    report = json.loads((tmp_path / "r.json").read_text())
    scores = report["models"][folder]  # keyed by --model exactly as given
    assert scores["bits_per_byte"] > 1.5 and report["cloze_items"] >= 100
    for key in ("cloze_acc", "cloze_acc_bytes"):
        low, high = scores[key + "_ci"]
        assert low <= 0.25 <= high, (key, scores[key])
    for category in ("factual", "reasoning", "context", "all"):
        for key in ("acc", "acc_bytes"):
            low, high = scores["probes"][category][key + "_ci"]
            assert low <= report["chance"]["probes"][category] <= high, (category, key)
    assert len(scores["probe_completions"]) == len(report["probes"]) >= 90
    table = capsys.readouterr().out
    assert "cloze acc" in table and "probes reasoning acc" in table and folder in table.splitlines()[0]


def test_the_ngram_baseline_and_the_completions(untrained, tmp_path, capsys):
    folder, _ = untrained
    held_out = write_txt(tmp_path / "held_out.txt", make_stories(120, 11))
    train = write_txt(tmp_path / "train.txt", make_stories(2000, 12))
    evaluate_main(["--model", folder, "--data", held_out, "--baseline", "ngram", "--train", train, "--completions", "6",
                   "--story_tokens", "12", "--completion_tokens", "0", "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    counted, untrained_model = report["models"]["4-gram"], report["models"][folder]
    assert counted["bits_per_byte"] < 0.5 * untrained_model["bits_per_byte"]  # counting learns these stories
    assert counted["cloze_acc"] > 0 and "all" in counted["probes"] and "completions" not in counted
    assert len(report["beginnings"]) == len(untrained_model["completions"]) == 6
    assert set(untrained_model["story"]) == {"repetition", "distinct_2", "ended", "cast_kept", "newcomer_takes_over",
                                             "new_creatures"}
    again = tmp_path / "again.json"  # seeded: a rerun writes the same stories
    evaluate_main(["--model", folder, "--data", held_out, "--completions", "6", "--story_tokens", "12",
                   "--completion_tokens", "0", "--json", str(again)])
    assert json.loads(again.read_text())["models"][folder]["completions"] == untrained_model["completions"]
    assert "4-gram" in capsys.readouterr().out.splitlines()[0]


def test_the_report_is_one_self_contained_page(untrained, tmp_path):
    from html.parser import HTMLParser
    folder, data = untrained

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.fetches, self.tokens = [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tags.append(tag)
            self.fetches += [v for k, v in attrs.items() if k in ("src", "href", "srcset", "data", "action") and v]
            if tag == "span" and "title" in attrs and "top 5" in attrs["title"]:
                self.tokens.append(attrs["title"])
            if tag == "path" and attrs.get("class") == "ci":
                self.whiskers.append(attrs["d"])
            if tag == "span" and attrs.get("class", "").startswith("verdict "):
                self.marks.append(attrs["class"].split()[1])
            if tag == "td":
                self.cells.append("")

        def handle_data(self, data):
            if self.cells and self.tags[-1] == "td":
                self.cells[-1] += data
    evaluate_main(["--model", folder, "--data", data, "--completions", "2", "--story_tokens", "8",
                   "--completion_tokens", "3", "--report", str(tmp_path / "r.html"), "--report_stories", "2",
                   "--json", str(tmp_path / "r.json")])
    text = (tmp_path / "r.html").read_text()
    scores = json.loads((tmp_path / "r.json").read_text())["models"][folder]
    page = Page()
    page.whiskers, page.marks, page.cells = [], [], []
    page.feed(text)
    assert page.fetches == [] and "script" not in page.tags and "link" not in page.tags and "url(" not in text
    assert page.tags.count("svg") == 5  # the cloze and each probe category, and all probes
    assert len(page.whiskers) == 5  # each bar has its 95% interval
    assert len(page.tokens) > 20  # two stories token by token
    # the side-by-side numbers are a real table, not a text block
    assert "pre" not in page.tags and page.cells[:3] == ["parameters", f"{scores['params'] / 1e6:.2f}M", ""]
    assert "bits/byte" in page.cells and f"{scores['bits_per_byte']:.4f}" in page.cells
    # every probe with its completion, marked right or wrong for the model by its scores
    assert "Lily was very tired after playing all day, so she went to" in text
    probes = scores["probes"]["all"]["n"]
    verdicts = page.marks
    assert len(scores["probe_right"]) == probes and verdicts == ["right" if r else "wrong" for r in scores["probe_right"]]
    assert verdicts.count("right") == round(scores["probes"]["all"]["acc"] * probes)
    # each model's heads over the held-out stories: a grid of layers by heads, local and global marked
    assert [[h["type"] for h in layer] for layer in scores["heads"]] == [["global", "global"], ["local", "local"]]
    assert all(0 <= h["previous"] <= 1 and h["distance"] >= 0 for layer in scores["heads"] for h in layer)
    assert text.count("<table class=heads>") == 1 and text.count(">L ") == 2 and text.count(">G ") == 2


def test_a_run_folder_is_its_best_model_and_keeps_its_name(untrained, tmp_path):
    folder, _ = untrained
    run = tmp_path / "run"
    shutil.copytree(folder, run / "best")
    data = write_txt(tmp_path / "held_out.txt", make_stories(40, 5))
    evaluate_main(["--model", str(run), "--data", data, "--completions", "0", "--completion_tokens", "0",
                   "--json", str(tmp_path / "r.json")])
    assert list(json.loads((tmp_path / "r.json").read_text())["models"]) == [str(run)]  # the argument as given


def test_mistakes_are_one_sentence_before_any_scoring(untrained, tmp_path, capsys):
    folder, data = untrained

    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            evaluate_main(list(argv))
        assert capsys.readouterr().out == ""  # nothing was scored
        return str(e.value)
    assert fails("--model", str(tmp_path / "missing"), "--data", data).startswith(
        f"error: no model folder at {str(tmp_path / 'missing')!r}")
    write_txt(tmp_path / "few.txt", make_stories(5))
    assert fails("--model", folder, "--data", str(tmp_path / "few.txt"), "--cloze_items", "50") == (
        f"error: --cloze_items 50: {tmp_path / 'few.txt'} holds 5 stories and the cloze takes at most one item from "
        "each; ask for 1 to 5")
    (tmp_path / "probes.jsonl").write_text('{"category": "factual", "prompt": "Fish swim in the", "right": "water", '
                                           '"wrong": ["sky"]}\n{"category": "factual", "prompt": "x"}\n')
    assert fails("--model", folder, "--data", data, "--probes", str(tmp_path / "probes.jsonl")) == (
        f"error: {tmp_path / 'probes.jsonl'} line 2 has ['category', 'prompt']; a probe has exactly the keys "
        "category, prompt, right and wrong")
    assert fails("--model", folder, "--data", str(tmp_path / "nothing.txt")).startswith("error: --data ")
    assert fails("--model", folder, "--data", data, "--probes", str(tmp_path / "missing.jsonl")) == (
        f"error: --probes {tmp_path / 'missing.jsonl'} is no file; pass a JSONL file of probes, one "
        '{"category", "prompt", "right", "wrong"} per line, or leave --probes out for the built-in ones')
    assert fails("--model", folder, "--data", str(tmp_path / "few.txt"), "--cloze_items", "50").startswith(
        f"error: --cloze_items 50: {tmp_path / 'few.txt'} holds 5 stories")
    write_txt(tmp_path / "one.txt", make_stories(1))
    assert fails("--model", folder, "--data", str(tmp_path / "one.txt"), "--cloze_items", "2").startswith(
        f"error: --cloze_items 2: {tmp_path / 'one.txt'} holds 1 story and")
    assert fails("--model", folder, "--model", folder, "--data", data) == "error: a --model is given twice; each " \
                                                                         "model is one column"
    (tmp_path / "notes.md").write_text("Once upon a time.")
    assert fails("--model", folder, "--data", str(tmp_path / "notes.md")) == (
        f"error: {tmp_path / 'notes.md'} is not a .txt, .jsonl, .parquet file; stories come in one of those")
    assert fails("--model", folder, "--data", data, "--json", str(tmp_path / "notes.md" / "r.json")) == (
        f"error: --json {tmp_path / 'notes.md' / 'r.json'}: {tmp_path / 'notes.md'} is a file, not a folder; set "
        "--json to a folder")
    assert fails("--model", folder, "--data", data, "--baseline", "ngram", "--train", str(tmp_path / "no*.txt")) == (
        f"error: --baseline ngram fits on --train {tmp_path / 'no*.txt'}, which matches no file; pass the models' "
        "training stories with --train")


def test_help_reads_as_a_guide():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for words in ("story cloze", "Chance is 25%", "--probes", "Wilson interval", "examples:"):
        assert words in done.stdout


def test_the_baseline_fits_on_the_training_stories_the_checkpoint_records(untrained, tmp_path, capsys):
    folder, _ = untrained
    held_out = write_txt(tmp_path / "held_out.txt", make_stories(60, 11))
    train = write_txt(tmp_path / "train.txt", make_stories(300, 12))
    args = ["--data", held_out, "--baseline", "ngram", "--completions", "0", "--completion_tokens", "0",
            "--cloze_items", "10", "--json", str(tmp_path / "r.json")]
    # a folder that records no training data (a hub model, or one transformers wrote): one sentence naming --train
    with pytest.raises(SystemExit, match=r"no --model records local ones \(data.dataset in its "
                                         r"training_config.json\): pass them with --train"):
        evaluate_main(["--model", folder, *args])
    trained = tmp_path / "trained"
    shutil.copytree(folder, trained)
    (trained / "training_config.json").write_text(json.dumps({"data": {"dataset": train}}))
    capsys.readouterr()
    evaluate_main(["--model", folder, "--model", str(trained), *args])
    assert f"# --train not given: the baseline fits on {train}, what {trained} was trained on" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["models"]["4-gram"]["bits_per_byte"] > 0
    with pytest.raises(SystemExit, match=r"--data .*missing.txt is no file; pass a file of held-out stories") as e:
        evaluate_main(["--model", str(trained), "--data", str(tmp_path / "missing.txt")])
    assert "shared" not in str(e.value)
