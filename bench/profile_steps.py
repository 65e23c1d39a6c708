"""A few training steps under torch.profiler: a Chrome trace (open it in https://ui.perfetto.dev or
chrome://tracing) and a per-op table of where the time goes. bench/profile.sh uses this when nsys
is not installed.

    python -m bench.profile_steps --depth 12                           # one GPU
    python -m bench.profile_steps --device cpu --depth 2 --seq-len 128 --device-batch-size 2

The model, optimizers, compilation and autocast are base_train's (bench.mfu.build_train_step), on
random tokens. Steps are labelled forward / backward / optimizer in the trace (record_function),
and on CUDA each kernel family of the model shows up as its own Triton kernels. --warmup unprofiled
steps (compilation, autotuning) come first; the per-op table has --rows rows.
"""

import argparse
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.mfu import add_step_args, build_train_step, check_step_args, sync
from nanocode.common import get_base_dir, run_main, set_nvtx


def get_args(argv=None):
    p = argparse.ArgumentParser(description="profile a few training steps with torch.profiler")
    add_step_args(p, warmup=3, steps=3)
    p.add_argument("--compile", type=int, default=-1, help="torch.compile (default: on CUDA)")
    p.add_argument("--out", default="", help="output dir (default: $NANOCODE_BASE_DIR/profile)")
    p.add_argument("--rows", type=int, default=25)
    return check_step_args(p.parse_args(argv))


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    set_nvtx(True)  # the model's per-kernel ranges also land in nsys if someone wraps this in it
    shape = (args.depth, args.seq_len, args.device_batch_size, args.vocab_size)
    step, model = build_train_step(*shape, device, use_compile)
    kernels = os.environ.get("NANOCODE_KERNELS") or "default"
    print(
        f"depth {args.depth}, {model.num_params():,} parameters, {args.device_batch_size} x "
        f"{args.seq_len} tokens per step on {device}, compile={use_compile}, kernels={kernels}"
    )
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    print(f"warmup: {args.warmup} steps in {time.perf_counter() - t0:.1f}s")

    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    with profile(activities=activities) as prof:
        for i in range(args.steps):
            with record_function(f"train_step_{i}"):
                step(args.warmup + i)
            # a sync per step: step i's kernels end before step i+1 launches, so the trace
            # separates the steps (bench.mfu times them back to back, without this idle gap)
            sync(device)

    out = Path(os.path.abspath(args.out)) if args.out else get_base_dir() / "profile"
    out.mkdir(parents=True, exist_ok=True)
    name = f"d{args.depth}_{device.type}"
    prof.export_chrome_trace(str(out / f"trace_{name}.json.gz"))
    # self_cuda_time_total or self_cpu_time_total: an op's own time without its children's, so a
    # matmul is not counted again in the aten::linear that calls it
    sort_by = f"self_{device.type}_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=args.rows)
    (out / f"ops_{name}.txt").write_text(table + "\n")
    print(table)
    print(f"chrome trace: {out}/trace_{name}.json.gz (open in https://ui.perfetto.dev)")
    print(f"per-op table: {out}/ops_{name}.txt")


if __name__ == "__main__":
    run_main(main)
