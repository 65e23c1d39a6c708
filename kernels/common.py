"""What every kernel file shares: the dispatch rule of docs/DESIGN.md ("Kernels"), input checks,
output allocation, and the config list each autotuned kernel gets."""

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as the kernels were made (import time)
POISON_OUTPUTS = False  # tests set this: outputs start as NaN, so an element never written shows
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(*tensors: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernel; CPU tensors run the reference, except under
    TRITON_INTERPRET=1 where the Triton kernel runs on the CPU. NANOCODE_KERNELS=torch forces
    the references everywhere (A/B runs, benchmarks)."""
    if os.environ.get("NANOCODE_KERNELS", "") == "torch":
        return False
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or all(t.is_cuda for t in tensors)


def check(cond: bool, fn: str, msg: str) -> None:
    """Raise a clear ValueError naming the kernel, instead of a traceback from inside Triton."""
    if not cond:
        raise ValueError(f"{fn}: {msg}")


def check_same(fn: str, *named: tuple[str, torch.Tensor]) -> None:
    """All tensors on one device with one floating dtype."""
    name0, t0 = named[0]
    for name, t in named[1:]:
        check(t.device == t0.device, fn, f"{name} is on {t.device} but {name0} is on {t0.device}")
        check(t.dtype == t0.dtype, fn, f"{name} is {t.dtype}, {name0} {t0.dtype} (no dtype mixing)")


def check_triton(fn: str, t: torch.Tensor, dtype=None) -> None:
    """What the Triton path needs beyond the reference's checks: a device it runs on, and a
    dtype it computes in (t's own, or `dtype` where the kernel computes in another)."""
    where = os.environ.get("TRITON_INTERPRET", "0") == "1" or t.is_cuda
    check(where, fn, f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1): {t.device}")
    dtype = dtype or t.dtype
    check(dtype in FLOATS, fn, f"the Triton kernel takes float32, float16 or bfloat16, got {dtype}")


def empty(shape, dtype, device) -> torch.Tensor:
    """An output tensor: uninitialized, or NaN when a test poisons outputs."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def autotune_configs(gpu, interpreter, fp32=(), ptr=""):
    """The autotune arguments of a kernel: its one small config under the interpreter; on a GPU
    its GPU configs, and where fp32 has its own list (IEEE fp32 dots run on the FMA units, where
    the large tensor-core tiles spill: fp32 runs only in tests), the list matching the dtype of
    the tensor `ptr`. Tests and bench/static_check.py force each config by setting .configs."""
    if INTERPRET:
        return dict(configs=interpreter)
    if not fp32:
        return dict(configs=gpu)

    def by_dtype(configs, args, **kwargs):
        want_fp32 = args[ptr].dtype == torch.float32
        return [c for c in configs if any(c is f for f in fp32) == want_fp32]

    return dict(configs=gpu + fp32, prune_configs_by={"early_config_prune": by_dtype})
