"""devices.py: the device a run picks, what it says when it cannot have one, and what the CPU has."""

import pytest
import torch

from tinylm import devices
from tinylm.devices import pick_device


def test_cpu_detection_reads_the_cpu_and_falls_back_to_false(monkeypatch):
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if "flags" in flags:  # Linux: torch's answer agrees with the kernel's flags
        words = flags.split()
        assert devices.cpu_bf16_support() == (None if "avx512_bf16" not in words else
                                              "AMX" if "amx_bf16" in words else "avx512_bf16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert devices.cpu_bf16_support() is None
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a PyTorch without the probe: fp32, no error
    assert devices.cpu_bf16_support() is None


def test_a_device_this_machine_lacks_is_one_sentence_naming_the_setting():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^train.device cuda: .*; use train.device = cpu \(or auto\)$"):
            pick_device("cuda", "train.device")
    with pytest.raises(ValueError, match="--device 'tpu' is not a device TinyLM runs on"):
        pick_device("tpu")
    assert pick_device("cpu") == torch.device("cpu")


def test_the_cpu_description_names_the_model_and_the_flags_speed_depends_on():
    import os
    described = devices.cpu_description()
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo on this system: the description is platform.processor()'s")
    first = open("/proc/cpuinfo").read().split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    assert described.startswith(fields.get("model name", ""))
    assert ("AMX" in described) == ("amx_bf16" in flags) and ("avx512_bf16" in described) == ("avx512_bf16" in flags)
    assert ("AVX2" in described) == ("avx2" in flags)
