"""Training-step throughput and MFU: one optimizer step (forward + backward + Muon/AdamW) of the GPT
at a given depth, timed for three variants in one process:

    triton   the Triton kernels (default dispatch) under torch.compile  -- what base_train runs on GPUs
    compile  the PyTorch references (NANOCODE_KERNELS=torch) under torch.compile
    eager    the PyTorch references in eager mode

    python -m bench.mfu --depth 12                  # one GPU, 32 x 2048 tokens per step
    python -m bench.mfu --depth 20 --save           # also write bench/results/<gpu>/mfu_d20.{json,md}
    python -m bench.mfu --device cpu --depth 2 --seq-len 128 --device-batch-size 2   # smoke test

MFU = FLOPs per token (GPT.estimate_flops: 6 per non-embedding weight + attention) x tokens/s,
divided by the GPU's nominal dense bf16 peak, and by the bf16 matmul rate measured in this process
(bench.kernels.measure_ceilings: an 8192^3 matmul), which is what the hardware actually sustains.
Data are random tokens (the loss value does not matter, the work per step does). On a CPU there is
no meaningful bf16 peak, so MFU is shown as n/a and the default dispatch runs the references.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import time
import traceback
from pathlib import Path

import torch

from nanocode.common import NanocodeError, autocast, nvtx_range, peak_bf16_flops, run_main
from nanocode.gpt import GPT, GPTConfig, build_model

VARIANTS = {  # name -> (NANOCODE_KERNELS value, torch.compile?)
    "triton": ("", True),
    "compile": ("torch", True),
    "eager": ("torch", False),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="time training steps and report tokens/s and MFU")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per step")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)"
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument(
        "--variants",
        default="triton,compile,eager",
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    p.add_argument("--device", default="", help="cuda|cpu (default: cuda when available)")
    p.add_argument(
        "--save", action="store_true", help="write bench/results/<device>/mfu_d<depth>.{json,md}"
    )
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            raise NanocodeError(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
    return check_step_args(args)


def check_step_args(args):
    """The size flags must be >= 1; the device defaults to cuda when one is visible. Shared with
    bench/profile_steps.py, which takes the same flags."""
    for name in ("depth", "seq_len", "device_batch_size", "steps"):
        if getattr(args, name) < 1:
            raise NanocodeError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
            )
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise NanocodeError("--device cuda asked for, but no CUDA GPU is visible")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def label(name):
    """A named range on both timelines: nsys (NVTX, when enabled) and torch.profiler."""
    with nvtx_range(name), torch.profiler.record_function(name):
        yield


def build_train_step(depth, seq_len, batch_size, vocab_size, device, use_compile):
    """The model and optimizers as base_train sets them up, and a `step(i)` closure doing one optimizer
    step (forward, backward, Muon + AdamW) on random tokens; returns (step, model). Also used by
    bench/profile_steps.py."""
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(depth, vocab_size, seq_len), device)
    optimizers = model.setup_optimizers()
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    amp = autocast(device)
    g = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, vocab_size, (4, batch_size, seq_len + 1), device=device, generator=g)

    def step(i):
        batch = data[i % len(data)]
        with label("forward"), amp:
            loss = train_model(batch[:, :-1], batch[:, 1:])
        with label("backward"):
            loss.backward()
        with label("optimizer"):
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        return loss

    return step, model


def time_variant(name, args, device):
    """A fresh model + optimizers, args.warmup untimed steps, then args.steps timed ones."""
    kernels_env, use_compile = VARIANTS[name]
    os.environ["NANOCODE_KERNELS"] = (
        kernels_env  # read at call time by kernels/common.py use_triton
    )
    torch._dynamo.reset()  # compiled graphs of the previous variant baked in its kernel choice
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, model = build_train_step(
        args.depth, args.seq_len, args.device_batch_size, args.vocab_size, device, use_compile
    )
    t0 = time.perf_counter()
    for i in range(args.warmup):
        loss = step(i)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    sync(device)
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise NanocodeError(f"variant {name}: the loss is {loss.item()} (not finite)")
    tokens = args.device_batch_size * args.seq_len * args.steps
    return dict(
        variant=name,
        kernels="torch" if kernels_env else "triton",
        compile=use_compile,
        ms_per_step=1e3 * elapsed / args.steps,
        tok_per_s=tokens / elapsed,
        warmup_s=warmup_s,
        loss=loss.item(),
        num_params=model.num_params(),
        peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    )


def fmt(v, f, missing="n/a"):
    return missing if v is None else f.format(v)


def format_table(rows, flops_per_token, nominal, measured):
    head = [
        "variant",
        "kernels",
        "compiled",
        "ms/step",
        "tok/s",
        f"MFU (nominal {fmt(nominal, '{:.0f}')} TF)",
        f"MFU (measured {fmt(measured, '{:.0f}')} TF)",
        "peak mem GiB",
        "vs compile",
    ]
    ref = next(
        (r["tok_per_s"] for r in rows if r["variant"] == "compile" and "error" not in r), None
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['variant']} | " + " | ".join(["-"] * (len(head) - 2)) + f" | {r['error']} |"
            )
            continue
        flops = flops_per_token * r["tok_per_s"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["variant"],
                    r["kernels"],
                    "yes" if r["compile"] else "no",
                    f"{r['ms_per_step']:.1f}",
                    f"{r['tok_per_s']:,.0f}",
                    fmt(nominal and 100 * flops / (nominal * 1e12), "{:.1f}%"),
                    fmt(measured and 100 * flops / (measured * 1e12), "{:.1f}%"),
                    fmt(r["peak_mem_gib"], "{:.1f}"),
                    fmt(ref and r["tok_per_s"] / ref, "{:.2f}x", "-"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision(
            "high"
        )  # as compute_init does (the one API that mixes safely)
        device_name = torch.cuda.get_device_name(device)
        from bench.kernels import measure_ceilings

        measured = measure_ceilings("cuda", tiny=False)["TFLOP/s"]
        peak = peak_bf16_flops(device_name)
        nominal = peak / 1e12 if peak else None
    else:
        device_name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
        measured = nominal = None
    B, T = args.device_batch_size, args.seq_len
    config = GPTConfig.from_depth(args.depth, args.vocab_size, T)
    with torch.device(
        "meta"
    ):  # the same for every variant: counted once, without allocating the model
        flops_per_token = GPT(config).estimate_flops()
    print(
        f"device: {device_name}, torch {torch.__version__}; depth {args.depth} (width {config.n_embd}, "
        f"{config.n_head} heads), {B} x {T} = {B * T:,} tokens per step, vocab {args.vocab_size}, "
        f"{flops_per_token:.3e} FLOPs/token"
    )
    print(
        f"peak bf16: nominal {fmt(nominal, '{:.0f} TFLOP/s')}, measured {fmt(measured, '{:.0f} TFLOP/s')}"
        + (
            ""
            if device.type == "cuda"
            else " (CPU: MFU not computed; default dispatch = references)"
        )
    )

    rows = []
    saved_env = os.environ.get("NANOCODE_KERNELS")
    try:
        for name in args.variants:
            print(f"timing {name}: {args.warmup} warmup + {args.steps} timed steps ...", flush=True)
            try:
                r = time_variant(name, args, device)
                print(
                    f"  {r['ms_per_step']:.1f} ms/step, {r['tok_per_s']:,.0f} tok/s (warmup {r['warmup_s']:.0f}s)"
                )
            except torch.OutOfMemoryError:
                r = dict(variant=name, error="out of memory")
                print(f"  {name}: out of memory at batch {B} x {T}")
            except Exception as e:  # noqa: BLE001 (one failing variant should not hide the others)
                r = dict(
                    variant=name,
                    error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                )
                print(f"  {name} failed: {r['error']}")
                traceback.print_exc()
            rows.append(r)
    finally:
        if saved_env is None:
            os.environ.pop("NANOCODE_KERNELS", None)
        else:
            os.environ["NANOCODE_KERNELS"] = saved_env
    table = format_table(rows, flops_per_token, nominal, measured)
    print(table)

    if args.save:
        slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
        out = Path(__file__).resolve().parent / "results" / slug
        out.mkdir(parents=True, exist_ok=True)
        import triton

        meta = dict(
            device=device_name,
            torch=torch.__version__,
            triton=triton.__version__,
            depth=args.depth,
            device_batch_size=B,
            seq_len=T,
            vocab_size=args.vocab_size,
            warmup=args.warmup,
            steps=args.steps,
            flops_per_token=flops_per_token,
            nominal_tflops=nominal,
            measured_tflops=measured,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        )
        (out / f"mfu_d{args.depth}.json").write_text(
            json.dumps(dict(meta, rows=rows), indent=2) + "\n"
        )
        (out / f"mfu_d{args.depth}.md").write_text(
            f"# Training-step MFU, depth {args.depth}, on {device_name}\n\n"
            f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}. One step = forward + backward + "
            f"Muon/AdamW on {B} x {T} tokens (bf16 autocast), mean over {args.steps} steps after {args.warmup} "
            f"warmup steps. FLOPs/token {flops_per_token:.3e} (GPT.estimate_flops). Measured peak: "
            f"8192^3 bf16 matmul in the same process.\n\n{table}\n"
        )
        print(f"saved {out}/mfu_d{args.depth}.json and .md")


if __name__ == "__main__":
    run_main(main)
