"""TinyLM's library: what the root scripts (train.py, inference.py, evaluate.py, dataload.py) and model.py are
built from, in folders by purpose. Imports run one way, from the scripts down; tests/test_layout.py checks it.

    data/        stories in, token ids out: corpus.py, tokenizer.py, pieces.py, cache.py
    modeling/    what model.py is built from: generation.py, lm_head.py, hf_weights.py
    kernels/     C for the CPU (decode.c, attention.c, lmhead.c) and native.py, which builds and calls it
    training/    config.py, optimizers.py, runlog.py (train.py's parts)
    evaluation/  scoring.py, evalsets.py (and probes/), storymetrics.py, ngram.py, judge.py, report.py
    serving/     the playground: playground.py and its page, playground.html
    checkpoint.py, hub.py, storage.py, devices.py: run folders and model loading, hub names, files written
                 whole, the device and precision a run takes (shared by training, evaluation and serving)
"""
