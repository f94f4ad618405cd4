"""train.dtype: the precision a run trains in. `auto` on a CPU with bf16 instructions is measured: a few forward +
backward passes of the run's own model at its own shapes in each precision, taking turns, once per machine and
shape, remembered beside the compiled C kernels (tinylm/kernels/native.py's cache folder).

Why measure rather than read the CPU's flags: bf16 instructions alone do not say bf16 is faster. On an AMD EPYC
(avx512_bf16, no AMX) bf16 mixed precision trained the recipes 1.37-1.50x faster than fp32; on an Intel Xeon whose
oneDNN was kept to those same instructions (no AMX) it trained them at 0.78x fp32's speed (docs/precision.md).

    precision, why = pick_precision("auto", device, model, batch_size=16, block_size=256)
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
                   measure=None, clock=time.perf_counter, say=lambda line: None) -> tuple[str, str]:
    """(the training precision, why) for train.dtype `name`: "float32", or "bfloat16" (mixed precision: bf16
    matmuls under autocast; fp32 weights, optimizer state, LayerNorm, softmax and loss). "auto" takes bfloat16 on a
    CUDA GPU that supports it; on a CPU with bf16 instructions (AMX, avx512_bf16) the faster of the two for `model`
    at (batch_size, block_size), by measure(model, rows, block_size) -> {precision: seconds} (step_seconds by
    default), remembered per machine and shape; float32 elsewhere. say(line) is told before a measurement."""
    if name != "auto":
        return name, "set by train.dtype"
    if device.type == "cuda":
        return ("bfloat16", "this GPU supports bf16") if torch.cuda.is_bf16_supported() else \
            ("float32", "this GPU has no bf16 support")
    if device.type != "cpu":
        return "float32", "mixed precision is untried on MPS"
    support = cpu_bf16_support()
    if not support or model is None:
        return "float32", "this CPU has no bf16 instructions (AMX or avx512_bf16)"
    rows = max(1, min(batch_size, MEASURED_TOKENS // block_size))
    key, described = measurement_key(model, rows, block_size)
    path = os.path.join(cache_folder(), "precision.json")
    remembered = read_measurements(path)
    entry = remembered.get(key)
    when = "measured now, remembered in " + path
    if not isinstance(entry, dict) or not all(isinstance(entry.get(p), float) for p in ("float32", "bfloat16")):
        say(f"# train.dtype = auto: timing {rows} x {block_size} tokens in fp32 and in bf16 on this CPU ({support}), "
            "once per machine and model shape")
        seconds = (measure or step_seconds)(model, rows, block_size, clock=clock)
        entry = {"float32": float(seconds["float32"]), "bfloat16": float(seconds["bfloat16"]), "what": described,
                 "date": datetime.date.today().isoformat()}
        remembered[key] = entry
        if not write_measurements(path, remembered):
            when = "measured now (the cache folder is not writable: measured again next run)"
    else:
        when = f"measured {entry.get('date', 'earlier')}, remembered in {path}"
    speedup = entry["float32"] / max(entry["bfloat16"], 1e-9)
    precision = "bfloat16" if speedup >= BF16_MARGIN else "float32"
    return precision, f"bf16 mixed precision trains this model at {speedup:.2f}x fp32's speed on this CPU " \
        f"({support}), {when}"


def step_seconds(model, rows: int, block_size: int, rounds: int = 3, clock=time.perf_counter) -> dict[str, float]:
    """The fastest of `rounds` forward + backward passes of `model` on (rows, block_size) random tokens, in each
    precision, taking turns after a round that warms both up (oneDNN builds its kernels for new shapes). The model's
    weights, gradients, mode and the global random state are as they were."""
    tokens = torch.randint(0, model.config.vocab_size, (rows, block_size + 1),
                           generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(next(model.parameters()).device)
    was_training, times = model.training, {"float32": [], "bfloat16": []}
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws here must not shift the run's own random stream
            for round_ in range(rounds + 1):
                for precision in times:
                    start = clock()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                        loss = model(tokens[:, :-1], tokens[:, 1:])[1]
                    loss.backward()
                    seconds = clock() - start
                    model.zero_grad(set_to_none=True)
                    if round_:
                        times[precision].append(seconds)
    finally:
        model.train(was_training)
    return {precision: min(seconds) for precision, seconds in times.items()}


def measurement_key(model, rows: int, block_size: int) -> tuple[str, str]:
    """(a short hash, the readable text it hashes) of what the measurement depends on: the CPU (model name and
    flags), PyTorch's version and threads, the instruction-set caps in the environment, the model's shape and
    the batch timed."""
    name, flags = cpu_model_and_flags()
    shape = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(model.config).items()
                     if k not in ("bos_token_id", "eos_token_id", "max_position_embeddings"))
    shape += f" batch={rows}x{block_size}"
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
