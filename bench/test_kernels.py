"""pytest-benchmark entry points for the cases of bench/kernels.py (same cases, same inputs).

    pytest bench/test_kernels.py --benchmark-columns=median,iqr,rounds   # needs a CUDA GPU

bench/ is not in the default testpaths: these run only when asked for, and skip without CUDA.
The table with GB/s, TFLOP/s and % of the device's ceilings comes from `python -m bench.kernels`.
"""
import os

import pytest
import torch

from bench.kernels import IMPLS, build_cases, make_step

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="kernel benchmarks need a CUDA GPU")
CASES = build_cases("cuda", torch.bfloat16) if HAS_CUDA else []
PASSES = ("fwd", "fwd+bwd")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_kernel(benchmark, case, pass_, impl):
    if pass_ not in case.floor:
        pytest.skip(f"{case.name} has no {pass_} pass")
    if os.environ.get("NANOCODE_KERNELS") == "torch":
        pytest.skip("NANOCODE_KERNELS=torch: the Triton column would be the reference")
    fn = {"triton": case.triton, "eager": case.reference}.get(impl) or torch.compile(case.reference, dynamic=False)
    step = make_step(fn, case.make_inputs(), pass_)
    step()  # compile / autotune outside the timing
    torch.cuda.synchronize()

    def run():
        step()
        torch.cuda.synchronize()
    benchmark.extra_info.update(case=case.name, shape=case.shape, unit=case.unit, floor=case.floor[pass_])
    benchmark.pedantic(run, warmup_rounds=3, rounds=20)
