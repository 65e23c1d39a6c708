"""The GPU path in one run: what only a CUDA GPU can prove, each step a row of one summary table.
bench/gpu_check.sh is the entry point (its header has the time estimate and how to run it on a
machine with no package registry).

    python -m bench.gpu_check              # a CUDA GPU: bench/results/<gpu>/gpu_check.{md,json}
    python -m bench.gpu_check --cpu-smoke  # the same steps on the CPU, tiny, Triton interpreted
    python -m bench.gpu_check --steps resume,generation   # a subset

Steps (in this order, one process where that shares caches; training runs are subprocesses because
one of them is killed):
  kernel_tests   the kernel test files on the device (no interpreter on CUDA: every dtype, forced
                 autotune configs where a test file forces them, awkward and model shapes)
  inductor_ab    a tiny model under torch.compile (Inductor), Triton kernels vs
                 NANOCODE_KERNELS=torch: losses of 3 optimizer steps and the gradients of the third
  bench_kernels  python -m bench.kernels --cases d12 --save (Triton / eager / compile, % of ceiling)
  bench_mfu      python -m bench.mfu --depth 12 --save       (Triton vs compile, a few steps)
  fp8            bench.mfu's triton and fp8 variants at depth 12: the step with and without
                 base_train --fp8 (the kernel bench has the FP8 MLP case); skipped where the GPU
                 has no FP8 matmuls (capability below 8.9)
  resume         base_train --depth 12, 20 steps, --save-every 10: one run straight, one killed
                 after step 15 and resumed (--resume) to step 20; the two loss curves compared
  generation     a tiny model that memorized a sequence: greedy generation with the KV cache
                 (Engine) on the device equals the CPU's, token for token
--cpu-smoke runs every step with tiny shapes on the CPU (a cheap subset of the kernel tests, the
Triton interpreter as the "device" kernels, no --save), so a test can run this script in CI.
"""

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["rope_qknorm", "relu2_mlp", "softcap_ce", "newton_schulz", "kernel_configs", "fp8"]
SMOKE_KERNEL_TESTS = "dispatch or bad_inputs or input_errors or small_shapes or every_config"
# bench.mfu's flags in the smoke run: a depth-1 model on the CPU, one step
SMOKE_MFU = (
    "--device cpu --depth 1 --seq-len 32 --device-batch-size 2 --vocab-size 97 --warmup 1 --steps 1"
)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="prove the GPU path in minutes (bench/gpu_check.sh)")
    p.add_argument("--cpu-smoke", action="store_true", help="the same steps on the CPU, tiny (CI)")
    p.add_argument("--steps", default="", help="comma-separated subset of the steps (default: all)")
    p.add_argument("--out", default="", help="results dir (default: bench/results/<gpu> or temp)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# the steps: each returns (ok, detail) and may raise (a failure with its traceback in the log)


def run_logged(cmd, log, env=None, timeout=900):
    """Run a subprocess, its output appended to `log`; returns the exit code."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        out = dict(stdout=f, stderr=subprocess.STDOUT)
        return subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, **out).returncode


def step_kernel_tests(ctx):
    """The kernel test files in this process (smoke: only the -k subset), their outcomes counted
    by a small pytest plugin; passes when pytest exits 0 with at least one test passed. A test file
    missing from this checkout is named in the detail, not failed."""
    import pytest

    n = collections.Counter()

    class Count:  # a pytest plugin counting the outcomes
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                n[report.outcome] += 1

    names = [f"tests/test_{name}.py" for name in KERNEL_TESTS]
    files = [f for f in names if (REPO / f).exists()]
    args = [*files, "-q", "-p", "no:cacheprovider", "-rfE", "-o", "addopts="]
    args += ["-k", SMOKE_KERNEL_TESTS] if ctx.smoke else []
    with mock.patch.dict(os.environ):  # the tests' conftest sets NANOCODE_BASE_DIR and _KERNELS
        code = pytest.main(args, plugins=[Count()])
    counts = ", ".join(f"{n[outcome]} {outcome}" for outcome in ("passed", "failed", "skipped"))
    detail = f"{counts} in {len(files)} files"
    missing = [Path(f).name for f in names if f not in files]
    detail += f" (not in this checkout: {', '.join(missing)})" if missing else ""
    return code == 0 and n["failed"] == 0 and n["passed"] > 0, detail


def train_steps(device, impl, depth, T, B, vocab, steps=3):
    """`steps` optimizer steps of a fresh model under torch.compile with `impl` kernels ("" =
    default dispatch, "torch" = references): the losses and the last step's gradients (fp32, on
    the CPU)."""
    import torch

    from bench.mfu import build_train_step, kernel_choice

    with kernel_choice(impl):
        step, model = build_train_step(depth, T, B, vocab, device, use_compile=True)
        # Off the init: its zero output projections leave the residual scalars a gradient of pure
        # rounding noise (~1e-10) at step 1, which Adam turns into a full-size step of either sign,
        # so the two runs would part ways for a reason that has nothing to do with the kernels.
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
        losses = [step(i).item() for i in range(steps)]
        return losses, {n: p.grad.float().cpu() for n, p in model.named_parameters()}


def step_inductor_ab(ctx):
    """The same tiny model trained twice under torch.compile, default kernels vs the references:
    the max relative loss difference over 3 steps and the max relative gradient error over the
    parameters at the third, against tolerances sized for fp32 on the CPU and for bf16 on CUDA."""
    import math

    depth, T, B, vocab = (1, 32, 2, 97) if ctx.smoke else (2, 256, 8, 4096)
    la, ga = train_steps(ctx.device, "", depth, T, B, vocab)
    lb, gb = train_steps(ctx.device, "torch", depth, T, B, vocab)
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(la, lb))
    # relative Frobenius error per parameter, the worst one reported (the clamp keeps an all-zero
    # gradient from dividing by zero)
    grad_err = max(((ga[n] - gb[n]).norm() / gb[n].norm().clamp(min=1e-30)).item() for n in gb)
    # bf16 on CUDA: two implementations round differently (bf16 eps 2^-8 = 0.4%); fp32 on the CPU.
    loss_tol, grad_tol = (1e-4, 1e-3) if ctx.smoke else (2e-2, 5e-2)
    detail = (
        f"depth {depth}, {B}x{T}: losses triton {', '.join(f'{x:.4f}' for x in la)} vs torch "
        f"{', '.join(f'{x:.4f}' for x in lb)} (max rel diff {loss_diff:.1e}, tol {loss_tol:.0e}); "
        f"step-3 grads max rel err {grad_err:.1e} (tol {grad_tol:.0e})"
    )
    finite = all(map(math.isfinite, la))
    return finite and loss_diff <= loss_tol and grad_err <= grad_tol, detail


def step_bench_kernels(ctx):
    flags = "--device cpu --tiny --cases rope,relu2_mlp_fp8" if ctx.smoke else "--cases d12 --save"
    code = run_logged([sys.executable, "-m", "bench.kernels", *flags.split()], ctx.log)
    where = "" if ctx.smoke else f"; saved {ctx.results.relative_to(REPO)}/kernels.{{json,md}}"
    return code == 0, f"exit {code}{where}"


def step_bench_mfu(ctx):
    """bench.mfu in a subprocess; on the GPU its saved mfu_d12.json is read back so the detail
    names each variant's tok/s, and a variant that recorded an error fails the step."""
    flags = "--depth 12 --warmup 3 --steps 5 --variants triton,compile --save"
    flags = SMOKE_MFU + " --variants eager" if ctx.smoke else flags
    code = run_logged([sys.executable, "-m", "bench.mfu", *flags.split()], ctx.log)
    detail = f"exit {code}"
    result = ctx.results / "mfu_d12.json"
    if not ctx.smoke and code == 0 and result.exists():
        rows = json.loads(result.read_text())["rows"]
        cells = [r.get("error") or f"{r['tok_per_s']:,.0f} tok/s" for r in rows]
        detail += "; " + ", ".join(f"{r['variant']} {cell}" for r, cell in zip(rows, cells))
        code = code or int(any("error" in r for r in rows))
    return code == 0, detail


def step_fp8(ctx):
    """bench.mfu's triton and fp8 variants timed in this process: tok/s, MFU against the bf16
    peak (GPU only) and the fp8 / triton speedup. Passes unless a variant raises; skipped (a pass)
    where the device has no FP8 matmuls."""
    import torch

    from bench.mfu import get_args, time_variant
    from nanocode.common import peak_bf16_flops
    from nanocode.fp8 import fp8_supported
    from nanocode.gpt import GPT, GPTConfig

    ok, why = fp8_supported(ctx.device)
    if not ok:
        return True, f"skipped: {why}"
    flags = SMOKE_MFU if ctx.smoke else "--depth 12 --warmup 3 --steps 5"
    args = get_args([*flags.split(), "--variants", "triton,fp8"])
    config = GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len)
    with torch.device("meta"):
        flops = GPT(config).estimate_flops()
    peak = None if ctx.smoke else peak_bf16_flops(ctx.name)
    # time_variant raises on a non-finite loss
    tok_s = {v: time_variant(v, args, ctx.device)["tok_per_s"] for v in args.variants}
    # FLOPs per token x tok/s over the peak, both in FLOP/s here (bench.mfu's table uses TFLOP/s)
    mfu = {v: f" (MFU {100 * flops * t / peak:.1f}%)" if peak else "" for v, t in tok_s.items()}
    cells = ", ".join(f"{v} {t:,.0f} tok/s{mfu[v]}" for v, t in tok_s.items())
    detail = f"depth {args.depth}: {cells}; fp8 / triton {tok_s['fp8'] / tok_s['triton']:.2f}x"
    return True, detail + "; MFU against the bf16 peak" * bool(peak)


def prepare_corpus(base, vocab):
    """A small corpus of real code (this Python's standard library) and a tokenizer trained on it:
    offline, so the check needs no hub."""
    from nanocode.dataset import ShardWriter, data_dir
    from nanocode.tokenizer import Tokenizer

    os.environ["NANOCODE_BASE_DIR"] = str(base)
    stdlib = Path(os.__file__).parent
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:200]]
    writer = ShardWriter(data_dir("code"), shard_chars=2_000_000, val_fraction=0.1, seed=0)
    for t in texts:
        writer.add(t, "python")
    writer.close()
    Tokenizer.train(texts, vocab_size=vocab).save(base / "tokenizer")


def step_resume(ctx):
    """Two base_train runs on a stdlib corpus in a temporary base dir: one straight to step 20,
    one SIGKILLed after step 15 and resumed from its step-10 checkpoint. Passes when the resumed
    run's losses at steps 11-20 match the straight run's: exactly on the CPU, on the GPU within a
    tolerance scaled by how far two fresh runs already differ at steps 1-10."""
    from nanocode.checkpoint import checkpoint_dir, load_meta

    base = ctx.work / "resume"
    shape = "--depth 12 --max-seq-len 1024 --device-batch-size 16 --total-batch-size 16384 "
    shape += "--eval-tokens 16384"
    if ctx.smoke:
        shape = "--depth 1 --max-seq-len 32 --device-batch-size 2 --total-batch-size 64 "
        shape += "--eval-tokens 64 --device-type cpu --compile 0"
    loop = " --num-iterations 20 --save-every 10 --eval-every -1 --sample-every -1"
    args = [sys.executable, "-m", "scripts.base_train", *(shape + loop).split()]
    env = dict(os.environ, NANOCODE_BASE_DIR=str(base))
    if ctx.smoke:  # interpreted Triton kernels would take seconds per step; other steps run them
        env["NANOCODE_KERNELS"] = "torch"
    with mock.patch.dict(os.environ):  # prepare_corpus sets NANOCODE_BASE_DIR in this process
        prepare_corpus(base, 300 if ctx.smoke else 4096)
        code = run_logged(args + ["--model-tag", "straight"], ctx.log, env)
        if code:
            return False, f"the uninterrupted run failed (exit {code})"
        # the second run: killed (SIGKILL, no cleanup) once it prints step 15, then resumed from 10
        with open(ctx.log, "a") as log:
            out = dict(text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            proc = subprocess.Popen(args + ["--model-tag", "resumed"], cwd=REPO, env=env, **out)
            killed = False
            for line in proc.stdout:
                log.write(line)
                if re.match(r"step 0*15/", line):
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
            proc.wait()
        if not killed:
            return False, f"the run to be killed never printed step 15 (exit {proc.returncode})"
        code = run_logged(args + ["--model-tag", "resumed", "--resume"], ctx.log, env)
        if code:
            return False, f"the resumed run failed (exit {code})"
        a = dict(load_meta(checkpoint_dir("base", "straight"))["curves"]["loss"])
        b = dict(load_meta(checkpoint_dir("base", "resumed"))["curves"]["loss"])
    if sorted(a) != list(range(1, 21)) or sorted(b) != list(range(1, 21)):
        return False, f"loss curves cover steps {sorted(a)} and {sorted(b)}, not 1..20"
    before = max(abs(a[s] - b[s]) for s in range(1, 11))  # two fresh runs: the run-to-run noise
    after = max(abs(a[s] - b[s]) for s in range(11, 21))  # the resumed steps
    exact = sum(a[s] == b[s] for s in range(11, 21))
    # fp32 on the CPU is deterministic: exact. On the GPU autotuning may pick other configs in
    # another process, so the resumed steps may differ by the noise two fresh runs already show.
    tol = 0.0 if ctx.smoke else max(4 * before, 5e-3)
    detail = (
        f"steps 11-20 after resume: max |loss diff| {after:.2e} ({exact}/10 identical; tol "
        f"{tol:.1e}); steps 1-10 of two fresh runs: {before:.2e}; final loss {a[20]:.4f} vs "
        f"{b[20]:.4f}"
    )
    return after <= tol, detail


def step_generation(ctx):
    """A tiny model trained (CPU, fp32) until it has memorized one sequence, so its greedy choices
    have wide margins; then Engine.generate (KV cache) on the CPU with the reference kernels and on
    the device with its own (CUDA: Triton, bf16 autocast; smoke: the interpreted Triton kernels)."""
    import torch

    from bench.mfu import kernel_choice
    from nanocode.engine import Engine
    from nanocode.gpt import GPTConfig, build_model
    from nanocode.tokenizer import SPECIAL_TOKENS

    # what Engine needs of a tokenizer: the special tokens' ids (0-11, as in nanocode.tokenizer)
    tokenizer = SimpleNamespace(bos_id=0, special_id=SPECIAL_TOKENS.index)
    vocab, T = 97, 64
    seq = torch.randint(12, vocab, (T + 1,), generator=torch.Generator().manual_seed(0))
    prompt, n = seq[:8].tolist(), 16 if ctx.smoke else 48
    with kernel_choice("torch"):  # no special token inside the sequence
        torch.manual_seed(0)
        model = build_model(GPTConfig.from_depth(2, vocab, T), "cpu")
        opts = model.setup_optimizers()
        for _ in range(60 if ctx.smoke else 150):
            loss = model(seq[None, :-1], seq[None, 1:])
            loss.backward()
            for o in opts:
                o.step()
            model.zero_grad(set_to_none=True)
        engine = Engine(model.eval(), tokenizer)
        cpu_out = engine.generate_batch(prompt, max_tokens=n, temperature=0.0)[0]
    with kernel_choice(""):
        engine = Engine(model.to(ctx.device), tokenizer)
        dev_out = engine.generate_batch(prompt, max_tokens=n, temperature=0.0)[0]
    memorized = sum(int(a == b) for a, b in zip(cpu_out, seq[8 : 8 + n].tolist()))
    same = cpu_out == dev_out
    first = next((i for i, (a, b) in enumerate(zip(cpu_out, dev_out)) if a != b), None)
    kind = "interpreted Triton kernels" if ctx.smoke else "Triton kernels, bf16 autocast"
    detail = (
        f"{n} greedy tokens, KV cache: {ctx.device} ({kind}) {'==' if same else '!='} cpu "
        f"(references, fp32){'' if same else f' (first difference at token {first})'}; final "
        f"train loss {loss.item():.3f}, {memorized}/{n} tokens of the memorized sequence"
    )
    return same and len(cpu_out) == n, detail


STEPS = {
    "kernel_tests": step_kernel_tests,
    "inductor_ab": step_inductor_ab,
    "bench_kernels": step_bench_kernels,
    "bench_mfu": step_bench_mfu,
    "fp8": step_fp8,
    "resume": step_resume,
    "generation": step_generation,
}


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    steps = [s for s in args.steps.split(",") if s] or list(STEPS)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is imported: Triton on the CPU
    import torch
    import triton

    from bench.kernels import markdown, results_dir
    from nanocode.common import NanocodeError

    if unknown := [s for s in steps if s not in STEPS]:
        raise NanocodeError(f"unknown step {unknown[0]!r}: choose from {', '.join(STEPS)}")
    ctx = SimpleNamespace(smoke=args.cpu_smoke, device=torch.device("cpu"), name="cpu-smoke")
    python = sys.version.split()[0]
    header = f"torch {torch.__version__}, triton {triton.__version__}, python {python}"
    if not ctx.smoke:
        if not torch.cuda.is_available():
            raise NanocodeError(
                "no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                "`bash bench/gpu_check.sh --cpu-smoke` checks the script's logic on a CPU"
            )
        torch.set_float32_matmul_precision("high")  # as compute_init sets it for training
        ctx.device, ctx.name = torch.device("cuda"), torch.cuda.get_device_name()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        header += f", CUDA {torch.version.cuda}, capability {capability}"
    header = f"{ctx.name}, {header}"
    ctx.results = results_dir(ctx.name)  # where bench.kernels and bench.mfu --save write
    out = Path(args.out or (tempfile.mkdtemp(prefix="gpu_check-") if ctx.smoke else ctx.results))
    out.mkdir(parents=True, exist_ok=True)
    ctx.work = Path(tempfile.mkdtemp(prefix="gpu_check-work-"))
    ctx.log = out / "gpu_check.log"
    ctx.log.write_text("")
    os.environ.pop("NANOCODE_KERNELS", None)  # default dispatch unless a step says otherwise
    print(f"gpu_check: {header}; log {ctx.log}", flush=True)

    rows, cells, t_all = [], [], time.time()
    for name in steps:
        print(f"\n=== {name}", flush=True)
        t0 = time.time()
        try:
            ok, detail = STEPS[name](ctx)
        except Exception as e:  # noqa: BLE001 (one failing step must not hide the others)
            traceback.print_exc()
            with open(ctx.log, "a") as f:
                traceback.print_exc(file=f)
            ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}".splitlines()[0]
        verdict, seconds = "PASS" if ok else "FAIL", round(time.time() - t0, 1)
        rows.append(dict(step=name, ok=ok, seconds=seconds, detail=detail))
        cells.append((name, verdict, f"{seconds:.0f}", detail))
        print(f"{name}: {verdict} ({seconds:.0f}s) {detail}", flush=True)
    total = time.time() - t_all
    shutil.rmtree(ctx.work, ignore_errors=True)  # the resume step: 4 depth-12 checkpoints

    table = markdown(["step", "result", "seconds", "detail"], cells)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    summary = dict(device=ctx.name, header=header, date=date, total_s=round(total, 1), rows=rows)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu_check.md").write_text(
        f"# GPU check on {ctx.name}\n\n{date}; {header}; {total:.0f} s in all "
        f"(bench/gpu_check.sh).\n\n{table}\n"
    )
    print(
        f"\n## gpu_check summary: {header}; {total:.0f} s\n\n{table}\n\nresults: "
        f"{out}/gpu_check.{{md,json}}, log {ctx.log}",
        flush=True,
    )
    if failed := sum(not r["ok"] for r in rows):
        raise NanocodeError(f"{failed} of {len(rows)} steps failed (see the table and {ctx.log})")


if __name__ == "__main__":
    from nanocode.common import run_main

    run_main(main)
