"""Which torch device a run uses: `auto` takes CUDA, else Apple's MPS, else the CPU; a device this machine lacks is
a ValueError naming the flag or setting that asked for it.

    device = pick_device("auto")                       # inference.py --device, evaluate.py --device
    device = pick_device("cuda:1", "train.device")     # train.py's [train] device
    dtype, why = pick_dtype("auto", device)            # train.py's [train] dtype: "bfloat16" or "float32"
"""

import torch


def pick_device(name: str, flag: str = "--device") -> torch.device:
    """The torch device `name` asks for ("auto": cuda, else mps, else cpu); ValueError naming `flag` when it is
    not a device or this machine lacks it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    cpu = f"{flag} cpu" if flag.startswith("--") else f"{flag} = cpu"
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {name!r} is not a device TinyLM runs on; use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"{flag} {name}: {build}; use {cpu} (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: Apple's MPS is not available here; use {cpu} (or auto)")
    return device


def cpu_has_bf16_matrix_units() -> bool:
    """True when this CPU has Intel AMX tiles with bf16 (Sapphire Rapids and later), where oneDNN runs bf16
    matmuls 3-7x its fp32 ones. Asked at run time; False where PyTorch cannot tell."""
    try:
        return bool(torch.cpu._is_amx_tile_supported()) and bool(torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or non-x86 PyTorch build
        return False


def pick_dtype(name: str, device: torch.device) -> tuple[str, str]:
    """(the training precision, why) for train.dtype `name`: "float32", or "bfloat16" (mixed precision: bf16
    matmuls under autocast, fp32 weights, optimizer state, LayerNorm, softmax and loss). "auto" takes bfloat16
    on a CUDA GPU that supports it and on a CPU with bf16 matrix units, float32 elsewhere."""
    if name != "auto":
        return name, "set by train.dtype"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16", "this GPU supports bf16"
    if device.type == "cpu" and cpu_has_bf16_matrix_units():
        return "bfloat16", "this CPU has bf16 matrix units (AMX)"
    return "float32", {"cpu": "this CPU has no bf16 matrix units (AMX)", "mps": "mixed precision is untried on MPS",
                       "cuda": "this GPU has no bf16 support"}[device.type]
