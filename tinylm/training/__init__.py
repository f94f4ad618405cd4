"""train.py's parts: typed INI configs (config.py), optimizers and the learning-rate schedule (optimizers.py),
and what a run reports besides metrics.jsonl (runlog.py)."""
