"""C for the CPU and the Python that builds and calls it (native.py): decode.c (one token of generation),
attention.c (training attention for small heads), lmhead.c (training's LM head and loss). Each .c file's header gives
its build line; native.py compiles it once per machine."""
