"""devices.py: the device and the training precision a run picks, and what it says when it cannot have one."""

import pytest
import torch

from tinylm import devices
from tinylm.devices import pick_device, pick_dtype


def test_auto_dtype_takes_bf16_only_where_the_cpu_has_matrix_units(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_bf16_matrix_units", lambda: True)
    assert pick_dtype("auto", cpu) == ("bfloat16", "this CPU has bf16 matrix units (AMX)")
    monkeypatch.setattr(devices, "cpu_has_bf16_matrix_units", lambda: False)
    assert pick_dtype("auto", cpu) == ("float32", "this CPU has no bf16 matrix units (AMX)")
    assert pick_dtype("bfloat16", cpu) == ("bfloat16", "set by train.dtype")  # asked for: given, slow or not
    assert pick_dtype("float32", cpu)[0] == "float32"


def test_cpu_detection_reads_the_cpu_and_falls_back_to_false(monkeypatch):
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if "flags" in flags:  # Linux: torch's answer agrees with the kernel's flags
        assert devices.cpu_has_bf16_matrix_units() == ("amx_bf16" in flags.split() and "avx512_bf16" in flags.split())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert devices.cpu_has_bf16_matrix_units() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a PyTorch without the probe: fp32, no error
    assert devices.cpu_has_bf16_matrix_units() is False
    assert pick_dtype("auto", torch.device("cpu"))[0] == "float32"


def test_a_device_this_machine_lacks_is_one_sentence_naming_the_setting():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^train.device cuda: .*; use train.device = cpu \(or auto\)$"):
            pick_device("cuda", "train.device")
    with pytest.raises(ValueError, match="--device 'tpu' is not a device TinyLM runs on"):
        pick_device("tpu")
    assert pick_device("cpu") == torch.device("cpu")
