"""pytest-benchmark entry points for the softcap CE, fused linear + softcap CE and
Newton-Schulz cases of bench/kernels.py (CUDA only):

    pytest bench/test_kernels_ii.py --benchmark-columns=median,min,max

Same cases, inputs and steps as `python -m bench.kernels` (which is the one that prints rates
against measured ceilings and saves results); this file lets pytest-benchmark compare runs over
time (--benchmark-autosave, --benchmark-compare). The peak-memory test records the fused
cross-entropy's memory next to eager's; the aim is <= 10% of eager's (it never holds the full logits).
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("kernel benchmarks need a CUDA GPU", allow_module_level=True)

from bench.kernels import (ce_peak_memory, format_memory_table, linear_softcap_ce_cases,  # noqa: E402
                           make_step, newton_schulz_cases, softcap_ce_cases)

DTYPE = torch.bfloat16
CASES = [c for build in (softcap_ce_cases, linear_softcap_ce_cases, newton_schulz_cases)
         for c in build("cuda", DTYPE, False)]
PARAMS = [(c, p, impl) for c in CASES for p in c.floor for impl in ("triton", "eager", "compile")]


@pytest.mark.parametrize("case, pass_, impl", PARAMS, ids=[f"{c.name}-{p}-{i}" for c, p, i in PARAMS])
def test_kernel(benchmark, case, pass_, impl):
    fn = {"triton": case.triton, "eager": case.reference, "compile": torch.compile(case.reference)}[impl]
    args = case.make_inputs()
    step = make_step(fn, args, pass_)
    step()  # compile / autotune outside the timed rounds
    torch.cuda.synchronize()

    def run():
        step()
        torch.cuda.synchronize()
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(shape=case.shape, floor=case.floor[pass_], unit=case.unit)
    del args, step
    torch.cuda.empty_cache()


def test_ce_peak_memory(record_property):
    rows = ce_peak_memory("cuda", DTYPE)
    print("\n" + format_memory_table(rows))
    for r in rows:
        record_property(f"{r['case']}|{r['impl']}|peak_mib", round(r["peak_mib"], 1))
    for r in rows:
        if r["case"].startswith("linear") and r["impl"] == "triton":
            assert r["vs_eager"] <= 0.10, f"{r['case']}: peak {r['peak_mib']:.0f} MiB is {100 * r['vs_eager']:.1f}% of eager"
