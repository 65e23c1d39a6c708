"""The GPU path in one run: what only a CUDA GPU can prove, each step a row of one summary table.
bench/gpu_check.sh is the entry point (its header has the time estimate and how to run it on a
machine with no package registry).

    python -m bench.gpu_check                 # a CUDA GPU: writes bench/results/<gpu>/gpu_check.{md,json}
    python -m bench.gpu_check --cpu-smoke     # the same steps on the CPU, tiny shapes, Triton interpreter

Steps (in this order, one process where that shares caches; training runs are subprocesses because
one of them is killed):
  kernel_tests   the kernel test files on the device (no interpreter on CUDA: every dtype, forced
                 autotune configs where a test file forces them, awkward and model shapes)
  inductor_ab    a tiny model under torch.compile (Inductor), Triton kernels vs NANOCODE_KERNELS=torch:
                 losses of 3 optimizer steps and the gradients of the third
  bench_kernels  python -m bench.kernels --cases d12 --save   (Triton / eager / compile, % of ceiling)
  bench_mfu      python -m bench.mfu --depth 12 --save         (Triton vs compile, a few steps)
  resume         base_train --depth 12, 20 steps, --save-every 10: one run straight, one killed after
                 step 15 and resumed (--resume) to step 20; the two loss curves compared
  generation     a tiny model that memorized a sequence: greedy generation with the KV cache (Engine)
                 on the device equals the CPU's, token for token
--cpu-smoke runs every step with tiny shapes on the CPU (a cheap subset of the kernel tests, the
Triton interpreter as the "device" kernels, no --save), so a test can run this script in CI.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL_TESTS = [
    "tests/test_rope_qknorm.py",
    "tests/test_relu2_mlp.py",
    "tests/test_softcap_ce.py",
    "tests/test_newton_schulz.py",
    "tests/test_kernel_configs.py",
]
SMOKE_KERNEL_TESTS = "dispatch or bad_inputs or input_errors or small_shapes or every_config"


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="prove the GPU path in a few minutes (see bench/gpu_check.sh)"
    )
    p.add_argument(
        "--cpu-smoke", action="store_true", help="the same steps on the CPU, tiny shapes (CI)"
    )
    p.add_argument("--steps", default="", help="comma-separated subset of the steps (default: all)")
    p.add_argument(
        "--out",
        default="",
        help="results dir (default: bench/results/<gpu>, or a temp dir with --cpu-smoke)",
    )
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# the steps: each returns (ok, detail) and may raise (a failure with its traceback in the log)


def run_logged(cmd, log, env=None, timeout=900):
    """Run a subprocess, its output appended to `log`; returns the exit code."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode


def step_kernel_tests(ctx):
    import pytest

    class Count:
        def __init__(self):
            self.n = {"passed": 0, "failed": 0, "skipped": 0}

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                self.n[report.outcome] = self.n.get(report.outcome, 0) + 1

    files = [f for f in KERNEL_TESTS if (REPO / f).exists()]
    missing = [f for f in KERNEL_TESTS if f not in files]
    args = [*files, "-q", "-p", "no:cacheprovider", "-rfE", "-o", "addopts="]
    if ctx.smoke:
        args += ["-k", SMOKE_KERNEL_TESTS]
    count = Count()
    saved = dict(os.environ)
    try:
        code = pytest.main(args, plugins=[count])
    finally:  # the tests' conftest sets NANOCODE_BASE_DIR and NANOCODE_KERNELS for itself
        os.environ.clear()
        os.environ.update(saved)
    n = count.n
    detail = (
        f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped in {len(files)} files"
    )
    if missing:
        detail += f" (not in this checkout: {', '.join(Path(m).name for m in missing)})"
    return code == 0 and n["failed"] == 0 and n["passed"] > 0, detail


def train_steps(device, impl, depth, T, B, vocab, steps=3):
    """`steps` optimizer steps of a fresh model under torch.compile with `impl` kernels ("" = default
    dispatch, "torch" = references): the losses and the last step's gradients (fp32, on the CPU)."""
    import torch

    from nanocode.common import autocast
    from nanocode.gpt import GPTConfig, build_model

    os.environ["NANOCODE_KERNELS"] = impl  # read at call time by kernels.common.use_triton
    torch._dynamo.reset()  # the compiled graph bakes the dispatch in
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(depth, vocab, T), device)
    # Off the init: its zero output projections leave the residual scalars a gradient of pure rounding
    # noise (~1e-10) at step 1, which Adam turns into a full-size step of either sign, so the two runs
    # would part ways for a reason that has nothing to do with the kernels.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p))
    optimizers = model.setup_optimizers()
    compiled = torch.compile(model, dynamic=False)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (steps, B, T + 1), generator=g).to(device)
    losses, grads = [], {}
    for i in range(steps):
        with autocast(device):
            loss = compiled(data[i, :, :-1], data[i, :, 1:])
        loss.backward()
        losses.append(loss.item())
        if i == steps - 1:
            grads = {n: p.grad.float().cpu() for n, p in model.named_parameters()}
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return losses, grads


def step_inductor_ab(ctx):
    import torch

    depth, T, B, vocab = (1, 32, 2, 97) if ctx.smoke else (2, 256, 8, 4096)
    saved = os.environ.get("NANOCODE_KERNELS")
    try:
        la, ga = train_steps(ctx.device, "", depth, T, B, vocab)
        lb, gb = train_steps(ctx.device, "torch", depth, T, B, vocab)
    finally:
        os.environ.pop("NANOCODE_KERNELS", None) if saved is None else os.environ.update(
            NANOCODE_KERNELS=saved
        )
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(la, lb))
    grad_err = max(((ga[n] - gb[n]).norm() / gb[n].norm().clamp(min=1e-30)).item() for n in gb)
    # bf16 on CUDA: two implementations round differently (bf16 eps 2^-8 = 0.4%); fp32 on the CPU.
    loss_tol, grad_tol = (1e-4, 1e-3) if ctx.smoke else (2e-2, 5e-2)
    detail = (
        f"depth {depth}, {B}x{T}: losses triton {', '.join(f'{l:.4f}' for l in la)} vs torch "
        f"{', '.join(f'{l:.4f}' for l in lb)} (max rel diff {loss_diff:.1e}, tol {loss_tol:.0e}); "
        f"step-3 grads max rel err {grad_err:.1e} (tol {grad_tol:.0e})"
    )
    return all(
        map(torch.isfinite, map(torch.tensor, la))
    ) and loss_diff <= loss_tol and grad_err <= grad_tol, detail


def step_bench_kernels(ctx):
    cmd = [sys.executable, "-m", "bench.kernels"]
    cmd += (
        ["--device", "cpu", "--tiny", "--cases", "rope"]
        if ctx.smoke
        else ["--cases", "d12", "--save"]
    )
    code = run_logged(cmd, ctx.log)
    where = "" if ctx.smoke else f"; saved bench/results/{ctx.slug}/kernels.{{json,md}}"
    return code == 0, f"exit {code}{where}"


def step_bench_mfu(ctx):
    cmd = [sys.executable, "-m", "bench.mfu"]
    cmd += (
        [
            "--device",
            "cpu",
            "--depth",
            "1",
            "--seq-len",
            "32",
            "--device-batch-size",
            "2",
            "--vocab-size",
            "97",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--variants",
            "eager",
        ]
        if ctx.smoke
        else [
            "--depth",
            "12",
            "--warmup",
            "3",
            "--steps",
            "5",
            "--variants",
            "triton,compile",
            "--save",
        ]
    )
    code = run_logged(cmd, ctx.log)
    detail = f"exit {code}"
    result = REPO / "bench" / "results" / ctx.slug / "mfu_d12.json"
    if not ctx.smoke and code == 0 and result.exists():
        rows = json.loads(result.read_text())["rows"]
        detail += "; " + ", ".join(
            f"{r['variant']} {r['tok_per_s']:,.0f} tok/s"
            if "error" not in r
            else f"{r['variant']} {r['error']}"
            for r in rows
        )
        code = code or int(any("error" in r for r in rows))
    return code == 0, detail


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
    from nanocode.checkpoint import checkpoint_dir, load_meta

    base = ctx.work / "resume"
    saved_base = os.environ.get("NANOCODE_BASE_DIR")
    try:
        prepare_corpus(base, 300 if ctx.smoke else 4096)
        shape = (
            [
                "--depth",
                "1",
                "--max-seq-len",
                "32",
                "--device-batch-size",
                "2",
                "--total-batch-size",
                "64",
                "--eval-tokens",
                "64",
                "--device-type",
                "cpu",
                "--compile",
                "0",
            ]
            if ctx.smoke
            else [
                "--depth",
                "12",
                "--max-seq-len",
                "1024",
                "--device-batch-size",
                "16",
                "--total-batch-size",
                "16384",
                "--eval-tokens",
                "16384",
            ]
        )
        args = [
            sys.executable,
            "-m",
            "scripts.base_train",
            *shape,
            "--num-iterations",
            "20",
            "--save-every",
            "10",
            "--eval-every",
            "-1",
            "--sample-every",
            "-1",
        ]
        env = dict(os.environ, NANOCODE_BASE_DIR=str(base))
        if (
            ctx.smoke
        ):  # interpreted Triton kernels would take seconds per step; the other steps run them
            env["NANOCODE_KERNELS"] = "torch"
        code = run_logged(args + ["--model-tag", "straight"], ctx.log, env)
        if code:
            return False, f"the uninterrupted run failed (exit {code})"
        # the second run: killed (SIGKILL, no cleanup) once it prints step 15, then resumed from step 10
        with open(ctx.log, "a") as log:
            proc = subprocess.Popen(
                args + ["--model-tag", "resumed"],
                cwd=REPO,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
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
    finally:
        os.environ.pop("NANOCODE_BASE_DIR", None) if saved_base is None else os.environ.update(
            NANOCODE_BASE_DIR=saved_base
        )
    if sorted(a) != list(range(1, 21)) or sorted(b) != list(range(1, 21)):
        return False, f"loss curves cover steps {sorted(a)} and {sorted(b)}, not 1..20"
    before = max(abs(a[s] - b[s]) for s in range(1, 11))  # two fresh runs: the run-to-run noise
    after = max(abs(a[s] - b[s]) for s in range(11, 21))  # the resumed steps
    exact = sum(a[s] == b[s] for s in range(11, 21))
    # fp32 on the CPU is deterministic: exact. On the GPU autotuning may pick other configs in another
    # process, so the resumed steps may differ by the noise two fresh runs already show.
    tol = 0.0 if ctx.smoke else max(4 * before, 5e-3)
    detail = (
        f"steps 11-20 after resume: max |loss diff| {after:.2e} ({exact}/10 identical; tol {tol:.1e}); "
        f"steps 1-10 of two fresh runs: {before:.2e}; final loss {a[20]:.4f} vs {b[20]:.4f}"
    )
    return after <= tol, detail


class StubTokenizer:
    """What Engine needs: the special tokens' ids (0-11, as in nanocode.tokenizer)."""

    bos_id = 0

    def special_id(self, name):
        from nanocode.tokenizer import SPECIAL_TOKENS

        return SPECIAL_TOKENS.index(name)


def step_generation(ctx):
    """A tiny model trained (CPU, fp32) until it has memorized one sequence, so its greedy choices have
    wide margins; then Engine.generate (KV cache) on the CPU with the reference kernels and on the
    device with its own (CUDA: Triton, bf16 autocast; smoke: the interpreted Triton kernels)."""
    import torch

    from nanocode.engine import Engine
    from nanocode.gpt import GPTConfig, build_model

    vocab, T = 97, 64
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(12, vocab, (T + 1,), generator=g)  # no special token inside
    saved = os.environ.get("NANOCODE_KERNELS")
    try:
        os.environ["NANOCODE_KERNELS"] = "torch"
        torch.manual_seed(0)
        model = build_model(GPTConfig.from_depth(2, vocab, T), "cpu")
        opts = model.setup_optimizers()
        for _ in range(60 if ctx.smoke else 150):
            loss = model(seq[None, :-1], seq[None, 1:])
            loss.backward()
            for o in opts:
                o.step()
            model.zero_grad(set_to_none=True)
        prompt, n = seq[:8].tolist(), 16 if ctx.smoke else 48
        cpu_out = Engine(model.eval(), StubTokenizer()).generate_batch(
            prompt, max_tokens=n, temperature=0.0
        )[0]
        os.environ["NANOCODE_KERNELS"] = ""
        dev_model = model.to(ctx.device)
        dev_out = Engine(dev_model, StubTokenizer()).generate_batch(
            prompt, max_tokens=n, temperature=0.0
        )[0]
    finally:
        os.environ.pop("NANOCODE_KERNELS", None) if saved is None else os.environ.update(
            NANOCODE_KERNELS=saved
        )
    memorized = sum(int(a == b) for a, b in zip(cpu_out, seq[8 : 8 + n].tolist()))
    same = cpu_out == dev_out
    first = next((i for i, (a, b) in enumerate(zip(cpu_out, dev_out)) if a != b), None)
    kind = "interpreted Triton kernels" if ctx.smoke else "Triton kernels, bf16 autocast"
    detail = (
        f"{n} greedy tokens, KV cache: {ctx.device} ({kind}) {'==' if same else '!='} cpu (references, fp32)"
        + ("" if same else f" (first difference at token {first})")
        + f"; final train loss {loss.item():.3f}, {memorized}/{n} tokens of the memorized sequence"
    )
    return same and len(cpu_out) == n, detail


STEPS = {
    "kernel_tests": step_kernel_tests,
    "inductor_ab": step_inductor_ab,
    "bench_kernels": step_bench_kernels,
    "bench_mfu": step_bench_mfu,
    "resume": step_resume,
    "generation": step_generation,
}


# ---------------------------------------------------------------------------------------------


class Context:
    pass


def gpu_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip(
        "-"
    )  # as bench.kernels and bench.mfu name it


def main(argv=None):
    args = get_args(argv)
    steps = [s for s in args.steps.split(",") if s] or list(STEPS)
    for s in steps:
        if s not in STEPS:
            from nanocode.common import NanocodeError

            raise NanocodeError(f"unknown step {s!r}: choose from {', '.join(STEPS)}")
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is imported: Triton on the CPU
    import torch
    import triton

    from nanocode.common import NanocodeError

    ctx = Context()
    ctx.smoke = args.cpu_smoke
    if ctx.smoke:
        ctx.device, ctx.name = torch.device("cpu"), "cpu-smoke"
    else:
        if not torch.cuda.is_available():
            raise NanocodeError(
                "no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                "`bash bench/gpu_check.sh --cpu-smoke` checks the script's logic on a CPU"
            )
        torch.set_float32_matmul_precision("high")  # as compute_init sets it for training
        ctx.device, ctx.name = torch.device("cuda"), torch.cuda.get_device_name()
    ctx.slug = gpu_slug(ctx.name)
    out = (
        Path(args.out)
        if args.out
        else (
            Path(tempfile.mkdtemp(prefix="gpu_check-"))
            if ctx.smoke
            else REPO / "bench" / "results" / ctx.slug
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    ctx.work = Path(tempfile.mkdtemp(prefix="gpu_check-work-"))
    ctx.log = out / "gpu_check.log"
    ctx.log.write_text("")
    os.environ.pop("NANOCODE_KERNELS", None)  # default dispatch unless a step says otherwise
    header = (
        f"{ctx.name}, torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}"
        + (
            f", CUDA {torch.version.cuda}, capability {'.'.join(map(str, torch.cuda.get_device_capability()))}"
            if not ctx.smoke
            else ""
        )
    )
    print(f"gpu_check: {header}; log {ctx.log}", flush=True)

    rows, t_all = [], time.time()
    for name in steps:
        print(f"\n=== {name}", flush=True)
        t0 = time.time()
        try:
            ok, detail = STEPS[name](ctx)
        except Exception as e:  # noqa: BLE001 (one failing step must not hide the others)
            traceback.print_exc()
            with open(ctx.log, "a") as f:
                traceback.print_exc(file=f)
            ok, detail = (
                False,
                f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            )
        rows.append(dict(step=name, ok=ok, seconds=round(time.time() - t0, 1), detail=detail))
        print(
            f"{name}: {'PASS' if ok else 'FAIL'} ({rows[-1]['seconds']:.0f}s) {detail}", flush=True
        )
    total = time.time() - t_all

    table = "\n".join(
        ["| step | result | seconds | detail |", "|---|---|---|---|"]
        + [
            f"| {r['step']} | {'PASS' if r['ok'] else 'FAIL'} | {r['seconds']:.0f} | {r['detail']} |"
            for r in rows
        ]
    )
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "gpu_check.json").write_text(
        json.dumps(
            dict(device=ctx.name, header=header, date=date, total_s=round(total, 1), rows=rows),
            indent=2,
        )
        + "\n"
    )
    (out / "gpu_check.md").write_text(
        f"# GPU check on {ctx.name}\n\n{date}; {header}; {total:.0f} s in all "
        f"(bench/gpu_check.sh).\n\n{table}\n"
    )
    print(
        f"\n## gpu_check summary: {header}; {total:.0f} s\n\n{table}\n\nresults: {out}/gpu_check.{{md,json}}, "
        f"log {ctx.log}",
        flush=True,
    )
    if not all(r["ok"] for r in rows):
        raise NanocodeError(
            f"{sum(not r['ok'] for r in rows)} of {len(rows)} steps failed (see the table above and {ctx.log})"
        )


if __name__ == "__main__":
    from nanocode.common import run_main

    run_main(main)
