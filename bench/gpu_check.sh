#!/usr/bin/env bash
# One command that proves the CUDA path on one GPU (H100 / H200): the kernel tests on the device, a
# Triton-vs-PyTorch A/B under Inductor, the d12 kernel and MFU benchmarks, the d12 step with and
# without FP8, a killed-and-resumed depth-12 run against an uninterrupted one, and greedy generation
# on the GPU == on the CPU. One summary table at the end; results in bench/results/<gpu>/
# (gpu_check.{md,json,log}, kernels.*, mfu_d12.*). Steps and pass criteria: bench/gpu_check.py.
#
#   bash bench/gpu_check.sh                  # a CUDA GPU
#   bash bench/gpu_check.sh --steps resume   # a subset (kernel_tests,inductor_ab,bench_kernels,bench_mfu,fp8,resume,generation)
#   bash bench/gpu_check.sh --cpu-smoke      # the same steps on a CPU, tiny shapes (CI runs this, ~1-2 min)
#
# Time, cold caches (no Triton / Inductor cache yet), one H100 or H200: about 7-9 minutes, not yet
# measured end to end (no GPU run so far). What dominates is compilation, not compute. The Triton
# JIT part is built on measured compile times: `python -m bench.static_check` compiled each of the
# 186 16-bit and fp32 kernel variants for sm_90 once (every config of every kernel in bf16, fp16
# and fp32; fp32 has its own small, spill-free configs) in 46 s with Triton 3.6 and 77 s with 3.9
# on an idle 2-core CPU, 0.25-0.4 s a variant; the 8 FP8 ones take 0.4-1.5 s each (on a busy CPU:
# bench/results/static/). The kernel tests compile those variants again at
# a few specializations each (ragged and aligned shapes, strided inputs, every dtype that
# autotunes): some 500 compiles by a count of their shapes, so ~2-4 minutes of JIT. Inductor
# compiling the model (tiny A/B twice, bench.mfu four times at depth 12, two of them FP8,
# bench.kernels' compile column, base_train three times; the later ones hit the on-disk caches) is
# an estimated ~4-5 min. The GPU work itself (20+10 steps at 16k tokens, 3 x 5 timed MFU steps)
# is well under a minute.
#
# No package registry needed: torch (>= 2.11), triton (>= 3.6), numpy, pyarrow, tiktoken, tqdm and
# pytest must be installed (a prepared .venv, or the machine's python3). The one project-built piece
# is the rustbpe extension (tokenizer training for the resume step); build its wheel where a Rust
# toolchain is, once (abi3: one wheel for every Python >= 3.10):
#     maturin build --release -o .whl          # writes .whl/nanocode-*-abi3-*.whl (holds rustbpe)
# carry .whl/ to the GPU machine beside the checkout (on this workplace's device tool: `carry: [".whl"]`,
# with `/.whl/` in .git/info/exclude); this script installs it into a temp dir (pip --no-index
# --target, nothing fetched) when `import rustbpe` fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if ! "$PYTHON" -c "import rustbpe" 2>/dev/null; then
    wheel=$(ls .whl/nanocode-*.whl .whl/rustbpe-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then
        site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"  # python -m puts the checkout first anyway
        echo "gpu_check: rustbpe from $wheel"
    else
        echo "gpu_check: rustbpe is not importable and no .whl/ wheel is here: the resume step will fail" \
             "(build it with: maturin build --release -o .whl)" >&2
    fi
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m bench.gpu_check "$@"
