import os
import sys

# Tests never touch the network: the hub is treated as offline before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# The device the parity (against transformers), KV-cache and sampling tests run on: TINYLM_TEST_DEVICE=cuda on a
# GPU machine, else the CPU. Everything else runs on the CPU.
DEVICE = torch.device(os.environ.get("TINYLM_TEST_DEVICE", "cpu"))
# fp32 logits agree to 1e-5 of the largest logit on the CPU; GPU kernels (cuBLAS, fused SDPA) sum in other orders
FP32_TOLERANCE = 1e-5 if DEVICE.type == "cpu" else 1e-4
