"""Test-wide setup: an isolated base dir, the Triton interpreter on CPU-only machines, and the
PyTorch references as the default kernels (kernel tests opt in to Triton with NANOCODE_KERNELS)."""
import os
import tempfile

import torch

# Must be set before any @triton.jit function is created (i.e. before kernels are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NANOCODE_KERNELS", "torch")
os.environ["NANOCODE_BASE_DIR"] = tempfile.mkdtemp(prefix="nanocode-test-")
