"""Which torch device a run uses: `auto` takes CUDA, else Apple's MPS, else the CPU; a device this machine lacks is
a ValueError naming the flag or setting that asked for it.

    device = pick_device("auto")                       # inference.py --device, evaluate.py --device
    device = pick_device("cuda:1", "train.device")     # train.py's [train] device
    cpu_bf16_support()                                 # "AMX", "avx512_bf16" or None (training/precision.py asks)
"""

import os
import platform

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


def cpu_bf16_support() -> str | None:
    """The bf16 instructions this CPU has, or None: "AMX" (Intel Sapphire Rapids and later) or "avx512_bf16" (AMD
    Zen 4 and later, Intel Cooper Lake). Without either PyTorch emulates bf16 matmuls, far slower than fp32 ones;
    with either bf16 may or may not be faster, which train.dtype = auto measures (training/precision.py). Asked at
    run time; None where PyTorch cannot tell."""
    try:
        if not torch.cpu._is_avx512_bf16_supported():
            return None
        return "AMX" if torch.cpu._is_amx_tile_supported() else "avx512_bf16"
    except (AttributeError, RuntimeError):  # an older or non-x86 PyTorch build
        return None


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """(the CPU's model name, all its feature flags) from /proc/cpuinfo's first processor; elsewhere (macOS,
    Windows) what platform says, and no flags."""
    name, flags = platform.processor() or platform.machine(), []
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:  # the first processor's block: "key<tabs>: value" lines
            fields = {key.strip(): value.strip() for key, _, value in
                      (line.partition(":") for line in f.read().split("\n\n")[0].splitlines())}
        name = fields.get("model name", name)
        flags = (fields.get("flags") or fields.get("Features") or "").split()
    return name, flags


def cpu_description() -> str:
    """The CPU's model and the features TinyLM's speed depends on, for benchmark headers: "Intel(R) Xeon(R)
    Processor (AMX, avx512_bf16, AVX-512, AVX2)"."""
    name, flags = cpu_model_and_flags()
    features = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "avx512_bf16"), ("avx512f", "AVX-512"),
                                          ("avx2", "AVX2"), ("asimd", "NEON"), ("bf16", "bf16")) if flag in flags]
    return f"{name} ({', '.join(features) or 'none of AMX, avx512_bf16, AVX-512, AVX2'})"
