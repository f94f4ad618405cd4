"""Stories in, token ids out: reading corpora (corpus.py), the GPT-Neo tokenizer and its trimmed versions
(tokenizer.py), fast exact tokenizing (pieces.py), and the memory-mapped token caches and batches (cache.py)."""
