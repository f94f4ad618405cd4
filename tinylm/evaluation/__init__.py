"""evaluate.py's parts: scoring text with a model (scoring.py), story cloze items and probe files (evalsets.py,
probes/), measures of completions (storymetrics.py), the n-gram baseline (ngram.py), the LLM judge (judge.py) and
the HTML report (report.py)."""
