"""Training-step throughput and MFU: one optimizer step (forward + backward + Muon/AdamW) of the GPT
at a given depth, timed for these variants in one process:

    triton   the Triton kernels (default dispatch) under torch.compile: base_train on a GPU
    fp8      the same with the blocks' matmuls in FP8: base_train --fp8 (not a default variant)
    compile  the PyTorch references (NANOCODE_KERNELS=torch) under torch.compile
    eager    the PyTorch references in eager mode

    python -m bench.mfu --depth 12                  # one GPU, 32 x 2048 tokens per step
    python -m bench.mfu --depth 20 --save           # and bench/results/<gpu>/mfu_d20.{json,md}
    python -m bench.mfu --device cpu --depth 2 --seq-len 128 --device-batch-size 2   # smoke test

MFU = FLOPs per token (GPT.estimate_flops: 6 per non-embedding weight, i.e. 2 for the forward's
multiply-add and 4 for the backward's dx and dw, + attention) x tokens/s,
divided by the GPU's nominal dense bf16 peak, and by the bf16 matmul rate measured in this process
(bench.kernels.measure_ceilings: an 8192^3 matmul), which is what the hardware actually sustains.
The fp8 variant is held to the same bf16 peaks (as nanochat reports it), so its MFU over triton's
is its speedup; an H100's FP8 peak is twice its bf16 one.
Data are random tokens (the loss value does not matter, the work per step does). On a CPU there is
no meaningful bf16 peak, so MFU is shown as n/a and the default dispatch runs the references.
--warmup untimed steps (compilation, autotuning) come before the --steps timed ones.
Only the model's FLOPs count: the optimizer's (Muon's Newton-Schulz) take time but add nothing to
the numerator, so the optimizer's share of the step lowers MFU.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import time
import traceback

import torch

from bench.kernels import markdown, measure_ceilings, results_dir
from nanocode.common import NanocodeError, autocast, nvtx_range, peak_bf16_flops, run_main
from nanocode.gpt import GPT, GPTConfig, build_model
from nanocode.training import posint

# name -> (NANOCODE_KERNELS value, under torch.compile)
VARIANTS = dict(triton=("", True), fp8=("", True), compile=("torch", True), eager=("torch", False))


def add_step_args(p, warmup, steps):
    """The flags of the timed training step, shared with bench/profile_steps.py."""
    p.add_argument("--depth", type=posint, default=12)
    p.add_argument("--seq-len", type=posint, default=2048)
    p.add_argument("--device-batch-size", type=posint, default=32, help="rows per step")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--steps", type=posint, default=steps)
    p.add_argument("--device", default="", help="cuda|cpu (default: cuda when available)")


def check_step_args(args):
    """The device defaults to cuda when one is visible (argparse checks the sizes: posint)."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise NanocodeError("--device cuda asked for, but no CUDA GPU is visible")
    return args


def get_args(argv=None):
    p = argparse.ArgumentParser(description="time training steps and report tokens/s and MFU")
    add_step_args(p, warmup=5, steps=20)
    p.add_argument("--variants", default="triton,compile,eager", help=",".join(VARIANTS))
    p.add_argument("--save", action="store_true", help="bench/results/<device>/mfu_d<depth>.*")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        raise NanocodeError(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    return check_step_args(args)


@contextlib.contextmanager
def kernel_choice(impl: str):
    """NANOCODE_KERNELS=impl ("" = the default dispatch, "torch" = the references) inside the block,
    as before after it; torch.compile's graphs are reset, since they bake the dispatch in."""
    saved = os.environ.get("NANOCODE_KERNELS")
    os.environ["NANOCODE_KERNELS"] = impl  # read at call time by kernels/common.py use_triton
    torch._dynamo.reset()
    try:
        yield
    finally:
        os.environ.pop("NANOCODE_KERNELS", None)
        if saved is not None:
            os.environ["NANOCODE_KERNELS"] = saved


def sync(device):
    """Wait for the GPU: CUDA runs asynchronously, so a host clock read means nothing until the
    queue of launched kernels has drained."""
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def label(name):
    """A named range on both timelines: nsys (NVTX, when enabled) and torch.profiler."""
    with nvtx_range(name), torch.profiler.record_function(name):
        yield


def build_train_step(depth, seq_len, batch_size, vocab_size, device, use_compile, fp8=False):
    """The model and optimizers as base_train sets them up (fp8: with --fp8), and a `step(i)`
    closure doing one optimizer step (forward, backward, Muon + AdamW) on random tokens; returns
    (step, model). The gradients of the last step stay on the parameters. Also used by
    bench/profile_steps.py and bench/gpu_check.py."""
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(depth, vocab_size, seq_len), device)
    if fp8:
        model.enable_fp8()
    optimizers = model.setup_optimizers()
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    amp = autocast(device)
    g = torch.Generator(device=device).manual_seed(0)
    # made once, already on the device: no data loading or host-to-device copy in the timed steps
    # (bench/dataloader.py measures the loader on its own)
    data = torch.randint(0, vocab_size, (4, batch_size, seq_len + 1), device=device, generator=g)

    def step(i):
        """One optimizer step on batch i of 4 fixed random ones (cycled). The loss comes back as
        a tensor, not .item(): no device sync per step, so the timed steps queue back to back."""
        batch = data[i % len(data)]
        model.zero_grad(set_to_none=True)
        with label("forward"), amp:
            loss = train_model(batch[:, :-1], batch[:, 1:])
        with label("backward"):
            loss.backward()
        with label("optimizer"):
            for opt in optimizers:
                opt.step()
        return loss

    return step, model


def time_variant(name, args, device):
    """A fresh model + optimizers, args.warmup untimed steps, then args.steps timed ones."""
    impl, use_compile = VARIANTS[name]
    gc.collect()  # the previous variant's tensors freed first, so empty_cache can release them
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # peak_mem_gib is this variant's alone: weights, gradients, optimizer state, activations
        torch.cuda.reset_peak_memory_stats(device)
    with kernel_choice(impl):
        shape = (args.depth, args.seq_len, args.device_batch_size, args.vocab_size)
        step, model = build_train_step(*shape, device, use_compile, fp8=name == "fp8")
        t0 = time.perf_counter()
        for i in range(args.warmup):
            step(i)
        sync(device)  # the warmup's queued work must not spill into the timed region
        warmup_s, t0 = time.perf_counter() - t0, time.perf_counter()
        # Back to back, one sync at the end: throughput as training sees it, the host queueing
        # step i+1 while the GPU runs step i. A sync per step would drain the queue and add idle
        # gaps, so there are no per-step times, and ms/step is the mean over the timed steps.
        for i in range(args.steps):
            loss = step(i)
        sync(device)
        elapsed = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise NanocodeError(f"variant {name}: the loss is {loss.item()} (not finite)")
    cuda = device.type == "cuda"
    return dict(
        variant=name,
        kernels=impl or "triton",
        compile=use_compile,
        ms_per_step=1e3 * elapsed / args.steps,
        tok_per_s=args.device_batch_size * args.seq_len * args.steps / elapsed,
        warmup_s=warmup_s,
        loss=loss.item(),
        num_params=model.num_params(),
        peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    )


def fmt(v, f, missing="n/a"):
    return missing if v is None else f.format(v)


def format_table(rows, flops_per_token, nominal, measured):
    """A markdown table of the timed variants, MFU against both peaks (TFLOP/s, None: n/a).

    Columns: ms/step and tok/s (B x T tokens per step) of the timed steps; MFU = FLOPs per token x
    tok/s over the nominal datasheet peak, then over the matmul rate measured in this process;
    peak memory allocated by the variant; "vs compile": tok/s over the compile variant's. That is
    the fair baseline for our kernels: the same model under the same compiler, with PyTorch's
    references instead of the Triton kernels, i.e. the speed without hand-written kernels."""
    peaks = dict(nominal=nominal, measured=measured)
    head = ["variant", "kernels", "compiled", "ms/step", "tok/s"]
    head += [f"MFU ({k} {fmt(v, '{:.0f}')} TF)" for k, v in peaks.items()]
    head += ["peak mem GiB", "vs compile"]
    ok = [r for r in rows if "error" not in r]
    ref = next((r["tok_per_s"] for r in ok if r["variant"] == "compile"), None)
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["variant"], *["-"] * (len(head) - 2), r["error"]])
            continue
        flops = flops_per_token * r["tok_per_s"] / 1e12  # achieved TFLOP/s
        cells = [r["variant"], r["kernels"], "yes" if r["compile"] else "no"]
        cells += [f"{r['ms_per_step']:.1f}", f"{r['tok_per_s']:,.0f}"]
        cells += [fmt(peak and 100 * flops / peak, "{:.1f}%") for peak in peaks.values()]
        cells += [fmt(r["peak_mem_gib"], "{:.1f}")]
        lines.append(cells + [fmt(ref and r["tok_per_s"] / ref, "{:.2f}x", "-")])
    return markdown(head, lines)


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    nominal = measured = None
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as compute_init does
        device_name = torch.cuda.get_device_name(device)
        measured = measure_ceilings("cuda", tiny=False)["TFLOP/s"]
        # dense bf16 (no 2:4 sparsity) from nanocode.common's table; an unknown GPU gives None: n/a
        nominal = (peak_bf16_flops(device_name) or 0) / 1e12 or None
    else:
        device_name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    B, T = args.device_batch_size, args.seq_len
    config = GPTConfig.from_depth(args.depth, args.vocab_size, T)
    with torch.device("meta"):  # the same for every variant: counted once, nothing allocated
        flops_per_token = GPT(config).estimate_flops()
    print(
        f"device: {device_name}, torch {torch.__version__}; depth {args.depth} (width "
        f"{config.n_embd}, {config.n_head} heads), {B} x {T} = {B * T:,} tokens per step, vocab "
        f"{args.vocab_size}, {flops_per_token:.3e} FLOPs/token; peak bf16: nominal "
        f"{fmt(nominal, '{:.0f} TFLOP/s')}, measured {fmt(measured, '{:.0f} TFLOP/s')}"
    )

    rows = []
    for name in args.variants:
        print(f"timing {name}: {args.warmup} warmup + {args.steps} timed steps ...", flush=True)
        try:
            r = time_variant(name, args, device)
            print(f"  {r['ms_per_step']:.1f} ms/step, {r['tok_per_s']:,.0f} tok/s")
        except torch.OutOfMemoryError:
            r = dict(variant=name, error="out of memory")
        except Exception as e:  # noqa: BLE001 (one failing variant should not hide the others)
            traceback.print_exc()
            r = dict(variant=name, error=f"{type(e).__name__}: {str(e)[:200]}".splitlines()[0])
        rows.append(r)
    table = format_table(rows, flops_per_token, nominal, measured)
    print(table)

    if args.save:
        import triton

        out = results_dir(device_name)
        out.mkdir(parents=True, exist_ok=True)
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        versions = dict(device=device_name, torch=torch.__version__, triton=triton.__version__)
        shape = dict(depth=args.depth, device_batch_size=B, seq_len=T, vocab_size=args.vocab_size)
        meta = dict(versions, **shape, warmup=args.warmup, steps=args.steps, date=date)
        meta.update(
            flops_per_token=flops_per_token, nominal_tflops=nominal, measured_tflops=measured
        )
        path = out / f"mfu_d{args.depth}"
        path.with_suffix(".json").write_text(json.dumps(dict(meta, rows=rows), indent=2) + "\n")
        path.with_suffix(".md").write_text(
            f"# Training-step MFU, depth {args.depth}, on {device_name}\n\n{date}, torch "
            f"{torch.__version__}, triton {triton.__version__}. One step = forward + backward + "
            f"Muon/AdamW on {B} x {T} tokens (bf16 autocast), mean over {args.steps} steps after "
            f"{args.warmup} warmup steps. FLOPs/token {flops_per_token:.3e} "
            f"(GPT.estimate_flops). Measured peak: 8192^3 bf16 matmul in the same process.\n\n"
            f"{table}\n"
        )
        print(f"saved {path}.json and .md")


if __name__ == "__main__":
    run_main(main)
