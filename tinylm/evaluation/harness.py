"""evaluate.py's story cloze and probes as lm-evaluation-harness tasks (evaluate.py --export_lm_eval DIR), so that
any model the harness loads, a TinyLM checkpoint folder or a Hugging Face model, is scored on the same items:

    python evaluate.py --model out/quickstart/best --data test.txt --export_lm_eval out/lm_eval_tasks
    lm_eval --model hf --model_args pretrained=out/quickstart/best --include_path out/lm_eval_tasks \
        --tasks tinylm_cloze,tinylm_probes

DIR gets a JSONL file and a YAML file per task: tinylm_cloze, and tinylm_probes_<category> for each probe category,
which the group tinylm_probes gathers (its acc weighted by each category's size: the accuracy over all probes).
Each item's choices are the exact strings evaluate.py scores after the context, the joining whitespace included,
so the tasks set target_delimiter to "": the harness' acc (the choice of highest summed log-probability) is
evaluate.py's acc, item for item.
"""

import json
import os

from tinylm.evaluation.evalsets import probe_continuation


def task_yaml(task: str, jsonl: str, context: str) -> str:
    """One multiple-choice task over a local JSONL file of {context, choices, answer} rows, as YAML (JSON is YAML)."""
    return json.dumps({
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.abspath(jsonl)}},  # datasets reads it from any folder
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": context,
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": "",  # each choice carries the whitespace that joins it to the context
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "made_by": "TinyLM evaluate.py --export_lm_eval"},
    }, indent=2) + "\n"


def write_task(folder: str, task: str, rows: list[dict], context: str) -> list[str]:
    jsonl, yaml = os.path.join(folder, f"{task}.jsonl"), os.path.join(folder, f"{task}.yaml")
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(yaml, "w", encoding="utf-8") as f:
        f.write(task_yaml(task, jsonl, context))
    return [jsonl, yaml]


def export_tasks(folder: str, items, probes: list[dict]) -> list[str]:
    """Write the cloze items and the probes as harness tasks into `folder`; returns the files written."""
    os.makedirs(folder, exist_ok=True)
    cloze = [{"context": i.context, "choices": i.options, "answer": i.answer} for i in items]
    written = write_task(folder, "tinylm_cloze", cloze, "context")
    categories = sorted({p["category"] for p in probes})
    for category in categories:
        rows = [{"prompt": p["prompt"], "choices": [probe_continuation(p["prompt"], a) for a in [p["right"], *p["wrong"]]],
                 "answer": 0} for p in probes if p["category"] == category]
        written += write_task(folder, f"tinylm_probes_{category}", rows, "prompt")
    group = os.path.join(folder, "tinylm_probes.yaml")
    with open(group, "w", encoding="utf-8") as f:
        f.write(json.dumps({"group": "tinylm_probes", "task": [f"tinylm_probes_{c}" for c in categories],
                            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean",
                                                       "weight_by_size": True}],
                            "metadata": {"version": 1.0}}, indent=2) + "\n")
    return written + [group]
