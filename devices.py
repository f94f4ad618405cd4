"""Which torch device a run uses: `auto` takes CUDA, else Apple's MPS, else the CPU; a device this machine lacks is
a ValueError naming the flag or setting that asked for it.

    device = pick_device("auto")                       # inference.py --device, evaluate.py --device
    device = pick_device("cuda:1", "train.device")     # train.py's [train] device
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
