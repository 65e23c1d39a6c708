#!/usr/bin/env bash
# Profile a few training steps.
#   - nsys installed: `nsys profile` around scripts.base_train --profile (NVTX ranges for data, forward,
#     backward, optimizer and each kernel family), real data; needs the tokenizer and the corpus built.
#     Then `nsys stats` prints the NVTX and GPU-kernel summaries. Open the .nsys-rep in Nsight Systems.
#   - otherwise: torch.profiler via bench/profile_steps.py (same model/optimizer setup, random tokens):
#     a Chrome trace (.json.gz, open in https://ui.perfetto.dev) and a per-op table printed.
#
# Usage: bash bench/profile.sh                         # depth 12 on a GPU, depth 2 tiny on a CPU
#        DEPTH=20 STEPS=5 bash bench/profile.sh
#        PROFILER=torch bash bench/profile.sh           # torch.profiler even when nsys is there
# Output: $NANOCODE_BASE_DIR/profile/ (default ~/.cache/nanocode/profile), or OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BASE=${NANOCODE_BASE_DIR:-$HOME/.cache/nanocode}
OUT_DIR=${OUT_DIR:-$BASE/profile}
STEPS=${STEPS:-5}
mkdir -p "$OUT_DIR"

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEPTH=${DEPTH:-12}; SHAPE=(--max-seq-len 2048 --device-batch-size 32); GPU=1
else
    DEPTH=${DEPTH:-2}; SHAPE=(--max-seq-len 128 --device-batch-size 2); GPU=0
fi

if [ "${PROFILER:-}" != torch ] && command -v nsys >/dev/null 2>&1; then
    # base_train on real data; a model tag of its own so no real checkpoint is overwritten.
    B=${SHAPE[3]}; T=${SHAPE[1]}
    nsys profile --trace=cuda,nvtx,osrt --force-overwrite=true -o "$OUT_DIR/base_train_d$DEPTH" \
        "$PYTHON" -m scripts.base_train --profile --depth "$DEPTH" "${SHAPE[@]}" --total-batch-size $((B * T)) \
        --num-iterations "$STEPS" --eval-every -1 --eval-tokens $((B * T)) --sample-every -1 \
        --model-tag "profile_d$DEPTH"
    nsys stats --report nvtx_sum,cuda_gpu_kern_sum "$OUT_DIR/base_train_d$DEPTH.nsys-rep"
    echo "nsys report: $OUT_DIR/base_train_d$DEPTH.nsys-rep"
else
    [ "${PROFILER:-}" = torch ] || echo "nsys not found: profiling with torch.profiler instead"
    ARGS=(--depth "$DEPTH" --seq-len "${SHAPE[1]}" --device-batch-size "${SHAPE[3]}" --steps "$STEPS" --out "$OUT_DIR")
    [ "$GPU" = 1 ] || ARGS+=(--device cpu --warmup 1)
    "$PYTHON" -m bench.profile_steps "${ARGS[@]}"
fi
