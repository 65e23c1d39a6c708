#!/usr/bin/env bash
# The whole pipeline, from nothing to a report card:
#   data -> tokenizer -> pretraining (FIM) -> base eval -> synthetic SFT/DPO data -> SFT -> DPO -> RL
#   -> HumanEval -> agent eval (verified coding tasks) -> one agent demo -> $NANOCODE_BASE_DIR/report/report.md
#
#   bash runs/speedrun.sh                        # GPUs: torchrun on all of them, depth 20; CPU: a tiny run
#   DEPTH=12 bash runs/speedrun.sh               # a smaller model
#   DATA_FILES=0 bash runs/speedrun.sh           # offline corpus (code installed on this machine) on GPUs too
#   NANOCODE_BASE_DIR=/tmp/nc bash runs/speedrun.sh   # artifacts elsewhere (default ~/.cache/nanocode)
#
# On GPUs: torchrun --nproc_per_node=<GPUs>, depth 20, pretraining data downloaded from the hub
# (DATA_FILES parquet files). On a CPU: depth 4, vocab 4096, sequences of 256 tokens, the offline
# corpus, a few hundred steps per stage, HumanEval on a few problems: every stage runs, none of it is
# meant to produce a useful model beyond the agent demo (see the README for its time).
#
# Idempotent: each finished stage writes $NANOCODE_BASE_DIR/speedrun/<stage>.done (its wall and CPU
# time, as JSON) and a rerun skips it; delete the marker to redo a stage. A failed stage stops the run and names
# its log ($NANOCODE_BASE_DIR/speedrun/logs/<stage>.log; every stage's output is tee'd there).
#
# Overrides (environment): DEPTH, DATA_FILES (hub parquet files; 0 = offline), DATA_MB (offline corpus
# size), VOCAB_SIZE, SEQ_LEN, NUM_ITERATIONS (pretraining steps; default from the tokens:params ratio),
# NPROC (processes/GPUs; 0 = CPU), GPU_HOUR_COST (dollars, for the report), SKIP_SETUP=1 (use the
# current environment instead of runs/setup_env.sh), PYTHON (interpreter), TORCHRUN.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_SETUP:-0}" != 1 ]; then
    SETUP_START=$(date +%s)
    source runs/setup_env.sh
    SETUP_SECONDS=$(( $(date +%s) - SETUP_START ))
fi
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
export NANOCODE_BASE_DIR=${NANOCODE_BASE_DIR:-$HOME/.cache/nanocode}
BASE=$NANOCODE_BASE_DIR
RUN_DIR=$BASE/speedrun
LOGS=$RUN_DIR/logs
mkdir -p "$LOGS"

# ---- configuration: GPUs or CPU
if [ -z "${NPROC:-}" ]; then
    NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    # GPUs the driver sees but torch does not (a CPU-only wheel, or a CUDA wheel newer than the driver):
    # stop, rather than silently running the tiny CPU configuration on a GPU machine.
    NVIDIA_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
    if [ "$NPROC" -eq 0 ] && [ "${NVIDIA_GPUS:-0}" -gt 0 ]; then
        echo "speedrun: nvidia-smi lists $NVIDIA_GPUS GPU(s) but torch sees none" \
             "(torch $("$PYTHON" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)")):" \
             "install a torch wheel built for this driver's CUDA, or set NPROC=0 to run on the CPU anyway" >&2
        exit 1
    fi
fi
if [ "$NPROC" -gt 0 ]; then
    DEVICE=cuda
    LAUNCH=("$TORCHRUN" --standalone --nproc_per_node="$NPROC")
    DATA_FILES=${DATA_FILES:-40}
    # The offline corpus (DATA_FILES=0, at most DATA_MB of this machine's code, ~130M tokens at 500 MB) feeds
    # depth 8 at the tokens:params ratio 12 in ~4 epochs; depth 20 would read it ~40 times (base_train
    # prints the epochs and warns): a depth-20 run on it is an overfitting demo, not a pretraining run.
    DEPTH=${DEPTH:-$([ "$DATA_FILES" -gt 0 ] && echo 20 || echo 8)}
    DATA_MB=${DATA_MB:-500}
    VOCAB_SIZE=${VOCAB_SIZE:-32768}
    SEQ_LEN=${SEQ_LEN:-2048}
    TRAIN_ARGS=(--device-batch-size 32)  # the batch from the horizon (depth 20: 2**20 tokens), LRs scaled to it
    [ -n "${NUM_ITERATIONS:-}" ] && TRAIN_ARGS+=(--num-iterations "$NUM_ITERATIONS")
    BASE_EVAL_ARGS=()
    SYNTH_ARGS=()
    SFT_ARGS=()
    DPO_ARGS=()
    RL_ARGS=(--source dpo --tasks programs,corpus,agent --steps 200 --tasks-per-step 16 --group-size 8 --max-new-tokens 512)
    CODE_EVAL_ARGS=(-a humaneval -k 1)
    EVAL_SOURCES=(base sft dpo)
    AGENT_EVAL_ARGS=(--batch-size 28)  # the shipped suite, all 28 tasks
    DEMO_TOKENS=512
    DEMO_TEMPERATURE=0.6
else
    DEVICE=cpu
    LAUNCH=("$PYTHON")
    DEPTH=${DEPTH:-4}
    DATA_FILES=${DATA_FILES:-0}
    DATA_MB=${DATA_MB:-40}
    VOCAB_SIZE=${VOCAB_SIZE:-4096}
    SEQ_LEN=${SEQ_LEN:-256}
    TRAIN_ARGS=(--device-batch-size 8 --total-batch-size 2048 --num-iterations "${NUM_ITERATIONS:-500}"
                --eval-every 100 --eval-tokens 32768 --sample-every -1)
    BASE_EVAL_ARGS=(--max-docs 64 --max-tokens 32768 --sample-tokens 32)
    # SFT rows of 384 tokens hold every run-a-program-and-report conversation (the demo's task, median 117
    # tokens) and a whole write_file call; validity gets 160 tokens, the longest call of a short program.
    # A 7M-parameter model in 200 SFT steps learns few of the 24 kinds well: the data over-weights the
    # demo's kind (run_report 20 instead of 5: 28% of the conversations; every kind still appears), and
    # SFT starts at 0.3 of the pretraining LRs (at 0.1, the demo read the wrong files: val loss 1.28 vs 0.68).
    SYNTH_ARGS=(--num-train 1000 --num-val 60 --num-prompts 60 --max-docs 4000 --workers 2 --weights run_report=20)
    SFT_ARGS=(--batch-size 8 --steps 200 --max-seq-len 384 --init-lr-frac 0.3 --eval-every -1 --eval-convs 16
              --eval-prompts 32 --gen-tokens 160)
    DPO_ARGS=(--batch-size 4 --steps 30 --eval-every -1 --eval-prompts 32)
    RL_ARGS=(--source dpo --tasks programs --steps 8 --tasks-per-step 2 --group-size 4 --max-new-tokens 160
             --eval-every -1 --eval-tasks 16 --eval-samples 2)
    CODE_EVAL_ARGS=(-a humaneval -k 1 --max-problems 32 --max-tokens 128)
    EVAL_SOURCES=(dpo)
    AGENT_EVAL_ARGS=(--num-tasks 7 --batch-size 7 --max-tokens 96)  # one task per kind; the context is 256
    DEMO_TOKENS=128
    DEMO_TEMPERATURE=0  # greedy: what the tiny model learned, not a lucky sample
fi
echo "speedrun: $DEVICE x $([ "$DEVICE" = cuda ] && echo "$NPROC GPUs" || echo "$(nproc) cores"), depth $DEPTH," \
     "vocab $VOCAB_SIZE, seq len $SEQ_LEN, data $([ "$DATA_FILES" -gt 0 ] && echo "$DATA_FILES hub files" || echo "offline ${DATA_MB}MB")," \
     "artifacts in $BASE"

# ---- stage runner: skip when done, tee to the log, stop with the log's name on failure, record wall time
stage() {
    local name=$1; shift
    if [ -f "$RUN_DIR/$name.done" ]; then
        echo "== $name: already done, skipping (delete $RUN_DIR/$name.done to rerun it)"
        return 0
    fi
    echo "== $name: $*"
    local start cpu0; start=$(date +%s); children_cpu_seconds; cpu0=$CPU_SECONDS
    if ! "$@" 2>&1 | tee "$LOGS/$name.log"; then
        echo "speedrun: stage '$name' failed; its log is $LOGS/$name.log" >&2
        exit 1
    fi
    local gpus=0; [ "$DEVICE" = cuda ] && gpus=$NPROC
    children_cpu_seconds
    printf '{"seconds": %d, "cpu_seconds": %.1f, "gpus": %d, "device": "%s", "finished": "%s"}\n' \
        $(( $(date +%s) - start )) "$(awk "BEGIN { print $CPU_SECONDS - $cpu0 }")" "$gpus" "$DEVICE" \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$RUN_DIR/$name.done"
}

# User + system CPU seconds of this shell's finished children (bash's `times`, second line: "1m2.5s 0m3.1s").
# The per-stage difference is the stage's CPU time, which on a loaded machine says more than wall time.
children_cpu_seconds() {  # sets CPU_SECONDS; no pipe or $(): `times` must run in this very shell
    times > "$RUN_DIR/.times"
    CPU_SECONDS=$(tail -1 "$RUN_DIR/.times" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); print u[1] * 60 + u[2] + s[1] * 60 + s[2] }')
}

if [ -n "${SETUP_SECONDS:-}" ] && [ ! -f "$RUN_DIR/setup.done" ]; then
    printf '{"seconds": %d, "gpus": 0, "device": "%s"}\n' "$SETUP_SECONDS" "$DEVICE" > "$RUN_DIR/setup.done"
fi

# ---- the pipeline (a stage made of several commands returns at its first failure: `set -e` does
# not apply inside a function that runs as an `if` condition, as stage() runs it)
data_stage() {
    if [ "$DATA_FILES" -gt 0 ]; then
        "$PYTHON" -m nanocode.dataset -n "$DATA_FILES" || return 1
    else
        "$PYTHON" -m nanocode.dataset --local --max-mb "$DATA_MB" || return 1
    fi
    "$PYTHON" - <<'EOF'
import pyarrow.parquet as pq
from nanocode.dataset import list_shards
from nanocode.report import log_stage
shards = list_shards()
rows = [pq.ParquetFile(s).metadata.num_rows for s in shards]
log_stage("dataset", ["train_docs", "val_docs", "shards", "parquet_mb"], shards=len(shards),
          train_docs=sum(rows[:-1]), val_docs=rows[-1],
          parquet_mb=round(sum(s.stat().st_size for s in shards) / 2 ** 20, 1))
EOF
}
stage dataset data_stage

tokenizer_stage() {
    "$PYTHON" -m scripts.tok_train --vocab-size "$VOCAB_SIZE" || return 1
    "$PYTHON" -m scripts.tok_eval
}
stage tokenizer tokenizer_stage

stage base_train "${LAUNCH[@]}" -m scripts.base_train --depth "$DEPTH" --max-seq-len "$SEQ_LEN" --fim-rate 0.5 \
    "${TRAIN_ARGS[@]}"
stage base_eval "${LAUNCH[@]}" -m scripts.base_eval "${BASE_EVAL_ARGS[@]}"
synth_stage() {
    "$PYTHON" -m scripts.gen_synth "${SYNTH_ARGS[@]}" || return 1
    "$PYTHON" - <<'EOF'
from nanocode.common import get_base_dir
from nanocode.report import log_stage
count = lambda name: sum(1 for _ in open(get_base_dir() / "sft" / name))
log_stage("synth", ["train_conversations", "train_pairs"], train_conversations=count("synth_train.jsonl"),
          val_conversations=count("synth_val.jsonl"), train_pairs=count("dpo_train.jsonl"),
          val_pairs=count("dpo_val.jsonl"))
EOF
}
stage synth synth_stage
stage sft "${LAUNCH[@]}" -m scripts.code_sft "${SFT_ARGS[@]}"
stage dpo "${LAUNCH[@]}" -m scripts.code_dpo "${DPO_ARGS[@]}"
stage rl "${LAUNCH[@]}" -m scripts.code_rl "${RL_ARGS[@]}"
for source in "${EVAL_SOURCES[@]}"; do
    stage "code_eval_$source" "${LAUNCH[@]}" -m scripts.code_eval -i "$source" "${CODE_EVAL_ARGS[@]}"
done
for source in sft dpo rl; do  # the agent on verifiable coding tasks, after each post-training stage
    stage "agent_eval_$source" "${LAUNCH[@]}" -m scripts.agent_eval -i "$source" "${AGENT_EVAL_ARGS[@]}"
    # the same tasks with calls held to our tools' schemas: what decoding enforces beyond what was learned
    stage "agent_eval_${source}_constrained" "${LAUNCH[@]}" -m scripts.agent_eval -i "$source" \
        "${AGENT_EVAL_ARGS[@]}" --constrained
done

agent_demo() {
    # A scratch project for the agent to work in; every tool call auto-approved (--yes).
    local work=$RUN_DIR/agent_workdir
    rm -rf "$work" && mkdir -p "$work"
    printf 'def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n' > "$work/main.py"
    local prompt="Run main.py with python and tell me what it prints."
    "$PYTHON" -m scripts.code_cli -i dpo -p "$prompt" --yes --workdir "$work" --max-tokens "$DEMO_TOKENS" \
        -t "$DEMO_TEMPERATURE" \
        | tee "$RUN_DIR/agent_demo.txt" || return 1
    PROMPT=$prompt "$PYTHON" - "$RUN_DIR/agent_demo.txt" <<'EOF'
import os, sys
from nanocode.report import log_stage
log_stage("agent_demo", prompt=os.environ["PROMPT"], transcript=open(sys.argv[1]).read()[-4000:])
EOF
}
stage agent_demo agent_demo

"$PYTHON" -m nanocode.report --gpu-hour-cost "${GPU_HOUR_COST:-3.0}" 2>&1 | tee "$LOGS/report.log"
echo "speedrun: done; the report card is $BASE/report/report.md"
