"""pytest-benchmark entry points for the cases of bench/kernels.py (CUDA only; same cases, inputs
and steps):

    pytest bench/test_kernels.py --benchmark-columns=median,iqr,rounds

bench/ is not in the default testpaths: these run only when asked for, and skip without CUDA.
`python -m bench.kernels` is the one that prints rates against measured ceilings and saves
results; this file lets pytest-benchmark compare runs over time (--benchmark-autosave,
--benchmark-compare). The peak-memory test records each CE variant's memory next to eager's;
the target for the fused linear CE is <= 10% of eager.
"""

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("kernel benchmarks need a CUDA GPU", allow_module_level=True)

from bench.kernels import IMPLS, build_cases, ce_peak_memory, format_memory_table, make_step  # noqa: E402

DTYPE = torch.bfloat16
CASES = build_cases("cuda", DTYPE)
PARAMS = [(c, p, impl) for c in CASES for p in c.floor for impl in IMPLS]


@pytest.mark.parametrize(
    "case, pass_, impl", PARAMS, ids=[f"{c.name}-{p}-{i}".replace(" ", "-") for c, p, i in PARAMS]
)
def test_kernel(benchmark, case, pass_, impl):
    if impl == "ours" and os.environ.get("NANOCODE_KERNELS") == "torch":
        pytest.skip("NANOCODE_KERNELS=torch: our column would be the reference")
    if impl == "liger" and case.liger is None:
        pytest.skip("no Liger-Kernel op for this case, or liger-kernel not installed")
    fn = {"ours": case.triton, "liger": case.liger, "eager": case.reference}.get(
        impl
    ) or torch.compile(case.reference, dynamic=False)
    args = case.make_inputs()
    step = make_step(fn, args, pass_)
    step()  # compile / autotune outside the timed rounds
    torch.cuda.synchronize()

    def run():
        step()
        torch.cuda.synchronize()

    benchmark.extra_info.update(
        case=case.name, shape=case.shape, unit=case.unit, floor=case.floor[pass_]
    )
    benchmark.pedantic(run, warmup_rounds=3, rounds=20)
    del args, step
    torch.cuda.empty_cache()


def test_ce_peak_memory(record_property):
    rows = ce_peak_memory("cuda", DTYPE)
    print("\n" + format_memory_table(rows))
    for r in rows:
        record_property(f"{r['case']}|{r['impl']}|peak_mib", round(r["peak_mib"], 1))
    for r in rows:
        if r["case"].startswith("linear") and r["impl"] == "ours":
            assert r["vs_eager"] <= 0.10, (
                f"{r['case']}: peak {r['peak_mib']:.0f} MiB is {100 * r['vs_eager']:.1f}% of eager"
            )
