"""harness.py: evaluate.py's cloze and probes as lm-evaluation-harness tasks give evaluate.py's accuracy, item for
item, when lm_eval scores a TinyLM checkpoint through transformers (requirements-test.txt; skipped without it)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from evaluate import main as evaluate_main
from helpers import make_stories, train_config, write_txt

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -r requirements-test.txt)")


def lm_eval_command() -> str:
    """The harness' console script beside this Python (the README's command), else on the PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    return here if os.path.exists(here) else shutil.which("lm_eval")


def samples(out_dir, task: str) -> list[dict]:
    (path,) = glob.glob(os.path.join(str(out_dir), "*", f"samples_{task}_*.jsonl"))
    with open(path) as f:
        return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])


def test_the_exported_tasks_give_evaluate_pys_accuracy_item_for_item(tmp_path):
    from train import main as train_main
    assert train_main(["--config", train_config(tmp_path, max_steps=40, eval_interval=40, dtype="float32")]) == 0
    model = str(tmp_path / "out" / "best")  # a trimmed 400-token vocabulary: its own tokenizer.json
    data = write_txt(tmp_path / "held_out.txt", make_stories(80, 11))
    tasks = tmp_path / "tasks"
    evaluate_main(["--model", model, "--data", data, "--cloze_items", "24", "--completions", "0",
                   "--completion_tokens", "0", "--json", str(tmp_path / "r.json"), "--export_lm_eval", str(tasks)])
    ours = json.loads((tmp_path / "r.json").read_text())
    scores, probes = ours["models"][model], ours["probes"]
    # the README's command, run from a folder that holds an evaluate.py of its own, as the repository root does
    done = subprocess.run([lm_eval_command(), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                           "--include_path", str(tasks), "--tasks", "tinylm_cloze,tinylm_probes", "--device", "cpu",
                           "--batch_size", "16", "--output_path", str(tmp_path / "lm_eval"), "--log_samples"],
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          capture_output=True, text=True,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    cloze = samples(tmp_path / "lm_eval", "tinylm_cloze")
    assert len(cloze) == ours["cloze_items"] >= 10
    assert [bool(s["acc"]) for s in cloze] == scores["cloze_right"]
    for category in sorted({p["category"] for p in probes}):
        theirs = [bool(s["acc"]) for s in samples(tmp_path / "lm_eval", f"tinylm_probes_{category}")]
        assert theirs == [right for right, p in zip(scores["probe_right"], probes) if p["category"] == category]
        assert sum(theirs) / len(theirs) == pytest.approx(scores["probes"][category]["acc"])
    # the same items: the harness' choices are the continuations evaluate.py scores, the joining space included
    first = samples(tmp_path / "lm_eval", f"tinylm_probes_{probes[0]['category']}")[0]
    assert first["arguments"]["gen_args_0"] == {"arg_0": probes[0]["prompt"], "arg_1": " " + probes[0]["right"]}
