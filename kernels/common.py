"""What every kernel file shares: the dispatch rule of docs/DESIGN.md ("Kernels") and input checks."""

import os

import torch


def use_triton(*tensors: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernel; CPU tensors run the reference, except under
    TRITON_INTERPRET=1 where the Triton kernel runs on the CPU. NANOCODE_KERNELS=torch forces
    the references everywhere (A/B runs, benchmarks)."""
    if os.environ.get("NANOCODE_KERNELS", "") == "torch":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return all(t.is_cuda for t in tensors)


def check(cond: bool, fn: str, msg: str) -> None:
    """Raise a clear ValueError naming the kernel, instead of a traceback from inside Triton."""
    if not cond:
        raise ValueError(f"{fn}: {msg}")


def check_same(fn: str, *named: tuple[str, torch.Tensor]) -> None:
    """All tensors on one device with one floating dtype."""
    name0, t0 = named[0]
    for name, t in named[1:]:
        check(t.device == t0.device, fn, f"{name} is on {t.device} but {name0} is on {t0.device}")
        check(
            t.dtype == t0.dtype,
            fn,
            f"{name} is {t.dtype} but {name0} is {t0.dtype} (no dtype mixing)",
        )
