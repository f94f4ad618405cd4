"""train.dtype: the precision a run trains in, and on CPU whether its C kernels run. `auto` on a CPU is measured:
a few forward + backward passes of the run's own model at its own shapes in each precision (where the CPU has bf16
instructions), and in fp32 with and without each C kernel its size rules take (attention.c, lmhead.c), taking
turns, once per machine and shape, remembered beside the compiled C kernels (tinylm/kernels/native.py's cache).

Why measure rather than read the CPU's flags: bf16 instructions alone do not say bf16 is faster. On an AMD EPYC
(avx512_bf16, no AMX) bf16 mixed precision trained the recipes 1.37-1.50x faster than fp32; on an Intel Xeon whose
oneDNN was kept to those same instructions (no AMX) it trained them at 0.78x fp32's speed (docs/precision.md).
Likewise the C kernels' size rules were measured on a few builds of one CPU (docs/speed.md); measured here, a kernel
that loses on this machine is left out.

    precision, kernels_off, why = pick_precision("auto", device, model, batch_size=16, block_size=256)
    model.allow_c_kernels([k for k in model.allowed_c_kernels if k not in kernels_off])
"""

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import tempfile
import time

import torch

from tinylm.devices import cpu_bf16_support, cpu_model_and_flags
from tinylm.kernels.native import cache_folder

# bf16 must beat fp32 by this much to be taken: on a tie fp32, the exact one, trains
BF16_MARGIN = 1.05
# tokens per timed pass: a larger batch is timed on fewer of its rows (the matmuls are as efficient from here up)
MEASURED_TOKENS = 4096
# what else changes the answer on one machine: the instruction sets oneDNN, ATen and MKL may use, the C kernels' -march
ENVIRONMENT = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
               "TINYLM_MARCH")


def pick_precision(name: str, device: torch.device, model=None, batch_size: int = 1, block_size: int = 1,
                   measure=None, clock=time.perf_counter, say=lambda line: None,
                   compiled: bool = False) -> tuple[str, tuple, str]:
    """(the training precision, the C kernels to leave out, why) for train.dtype `name`. The precision: "float32",
    or "bfloat16" (mixed precision: bf16 matmuls under autocast; fp32 weights, optimizer state, LayerNorm, softmax
    and loss). "auto" takes bfloat16 on a CUDA GPU that supports it. On a CPU it times the ways this model could
    train at (batch_size, block_size) and takes the fastest: fp32 with the C kernels its rules take
    (model.c_kernels()), fp32 without each of them, and bf16 where the CPU has bf16 instructions (AMX,
    avx512_bf16); by measure(model, rows, block_size, ways, clock) -> {way: seconds} (step_seconds by default),
    remembered per machine and shape. Nothing to choose from: float32, unmeasured. say(line) is told before a
    measurement. A compiled run (train.compile) runs no C kernel (torch.compile cannot trace a C call): none is
    timed."""
    if name != "auto":
        return name, (), "set by train.dtype"
    if device.type == "cuda":
        return ("bfloat16", (), "this GPU supports bf16") if torch.cuda.is_bf16_supported() else \
            ("float32", (), "this GPU has no bf16 support")
    if device.type != "cpu":
        return "float32", (), "mixed precision is untried on MPS"
    support = cpu_bf16_support()
    kernels = model.c_kernels() if model is not None and not compiled else []
    no_bf16 = "this CPU has no bf16 instructions (AMX or avx512_bf16)"
    if not kernels and (not support or model is None):
        return "float32", (), no_bf16
    rows = max(1, min(batch_size, MEASURED_TOKENS // block_size))
    key, described = measurement_key(model, rows, block_size, kernels)
    ways = ["float32"] + [without(k) for k in kernels] + (["bfloat16"] if support else [])
    path = os.path.join(cache_folder(), "precision.json")
    remembered = read_measurements(path)
    entry = remembered.get(key)
    when = "measured now, remembered in " + path
    if not isinstance(entry, dict) or not all(isinstance(entry.get(way), float) for way in ways):
        say(f"# train.dtype = auto: timing {rows} x {block_size} tokens each way ({', '.join(ways)}) on this CPU, "
            "once per machine and model shape")
        seconds = (measure or step_seconds)(model, rows, block_size, ways, clock=clock)
        entry = {way: float(seconds[way]) for way in ways}
        entry.update({"what": described, "date": datetime.date.today().isoformat()})
        remembered[key] = entry
        if not write_measurements(path, remembered):
            when = "measured now (the cache folder is not writable: measured again next run)"
    else:
        when = f"measured {entry.get('date', 'earlier')}, remembered in {path}"
    # a C kernel stays where the step without it is no faster; fp32's best is the fastest fp32 way timed
    kernel_speedups = {k: entry[without(k)] / max(entry["float32"], 1e-9) for k in kernels}
    left_out = tuple(k for k, speedup in kernel_speedups.items() if speedup < 1.0)
    float32 = min(entry[way] for way in ways if way != "bfloat16")
    found = [] if support else [no_bf16]
    precision = "float32"
    if support:
        speedup = float32 / max(entry["bfloat16"], 1e-9)
        precision = "bfloat16" if speedup >= BF16_MARGIN else "float32"
        found.append(f"bf16 mixed precision trains this model at {speedup:.2f}x fp32's speed on this CPU ({support})")
    for k, speedup in kernel_speedups.items():
        found.append(f"{k}.c runs a fp32 step at {speedup:.2f}x PyTorch's speed"
                     + (", so PyTorch runs it" if k in left_out else ""))
    return precision, left_out, "; ".join(found) + f"; {when}"


def without(kernel: str) -> str:
    """The name of the fp32 way that keeps this C kernel's work in PyTorch."""
    return f"float32 without {kernel}.c"


def step_seconds(model, rows: int, block_size: int, ways=("float32", "bfloat16"), rounds: int = 3,
                 clock=time.perf_counter) -> dict[str, float]:
    """The fastest of `rounds` forward + backward passes of `model` on (rows, block_size) random tokens, each way
    ("float32", "bfloat16", or without(kernel)), taking turns after a round that warms them all up (oneDNN builds
    its kernels for new shapes). The model's weights, gradients, mode, allowed C kernels and the global random
    state are as they were."""
    tokens = torch.randint(0, model.config.vocab_size, (rows, block_size + 1),
                           generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(next(model.parameters()).device)
    was_training, allowed, times = model.training, model.allowed_c_kernels, {way: [] for way in ways}
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws here must not shift the run's own random stream
            for round_ in range(rounds + 1):
                for way in ways:
                    model.allow_c_kernels([k for k in allowed if way != without(k)])
                    start = clock()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=way == "bfloat16"):
                        loss = model(tokens[:, :-1], tokens[:, 1:])[1]
                    loss.backward()
                    seconds = clock() - start
                    model.zero_grad(set_to_none=True)
                    if round_:
                        times[way].append(seconds)
    finally:
        model.train(was_training)
        model.allow_c_kernels(allowed)
    return {way: min(seconds) for way, seconds in times.items()}


def measurement_key(model, rows: int, block_size: int, kernels: list[str]) -> tuple[str, str]:
    """(a short hash, the readable text it hashes) of what the measurement depends on: the CPU (model name and
    flags), PyTorch's version and threads, the instruction-set caps in the environment, the model's shape, the
    batch timed, and the C kernels that run in its fp32 passes (another compiler's build, or a compiled run: none)."""
    name, flags = cpu_model_and_flags()
    shape = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(model.config).items()
                     if k not in ("bos_token_id", "eos_token_id", "max_position_embeddings"))
    shape += f" batch={rows}x{block_size} C kernels: {', '.join(kernels) or 'none'}"
    environment = " ".join(f"{name}={os.environ[name]}" for name in ENVIRONMENT if os.environ.get(name))
    described = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {shape}" + \
        (f", {environment}" if environment else "")
    text = "\0".join([platform.machine(), name, " ".join(flags), described])
    return hashlib.sha256(text.encode()).hexdigest()[:16], described


def read_measurements(path: str) -> dict:
    """The remembered measurements, or {} where there are none or the file is damaged (they are measured again)."""
    try:
        with open(path) as f:
            remembered = json.load(f)
    except (OSError, ValueError):
        return {}
    return remembered if isinstance(remembered, dict) else {}


def write_measurements(path: str, remembered: dict) -> bool:
    """Publish the file whole (os.replace of this process's own file); False where the folder is not writable."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), prefix="precision.json.tmp",
                                         delete=False) as f:
            json.dump(remembered, f, indent=1)
        os.replace(f.name, path)
        return True
    except OSError:
        return False
