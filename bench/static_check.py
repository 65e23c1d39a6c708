"""Every kernel compiled for the GPUs our users have, on a CPU: no GPU, nothing launched.

    python -m bench.static_check                        # sm_80, sm_90, sm_100; bf16, fp16, fp32
    python -m bench.static_check --arch 90 --dtypes bf16 --out /tmp/static

Each Triton kernel goes through its own launcher (the code that runs it in training) at the
shapes of bench/kernels.py's cases, once per GPU config and dtype (the FP8 variant of relu2_mlp's
kernel, e4m3/e5m2 operands and bf16 out, once, on sm_90 and sm_100: Triton has no e4m3 before
Ada's sm_89, so sm_80 leaves it out; its pass/fail rules are bf16's), while a stand-in Triton driver
names the target GPU. Triton compiles for that target (it bundles ptxas); the compiled kernel
loads its binary only at its first launch, and there the stand-in stops it and keeps the cubin.
From the cubin (cuobjdump, bundled too): registers per thread, stack bytes, spill instructions
(STL/LDL), shared memory, tensor-core instructions in the SASS (HMMA on sm_80; HGMMA, or QGMMA
for FP8, on sm_90; UTCHMMA / UTCQMMA, i.e. tcgen05, on sm_100), and the blocks that fit on one
SM. An arch the installed Triton cannot target is reported and skipped. Writes OUT.{md,json}
(default bench/results/static/static); exits 1 naming each variant that fails to compile, needs
more shared memory than the GPU has, spills in bf16/fp16/fp8, or is such a dot kernel without
tensor-core instructions. fp32 runs only in tests and may spill: reported, not failed.
What this cannot tell is speed: a kernel that compiles clean can still be slow.
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (read when kernels are imported)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="static-check-")  # cold: honest times
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from bench.kernels import build_cases, markdown  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# name, then per SM: register file, shared memory, max blocks, max warps; max shared per block
# (32-bit registers and bytes, from the CUDA C++ Programming Guide's table per compute capability)
GPUS = {
    80: ("A100", 65536, 164 << 10, 32, 64, 163 << 10),
    90: ("H100", 65536, 228 << 10, 32, 64, 227 << 10),
    100: ("B200", 65536, 228 << 10, 32, 64, 227 << 10),
}
TENSOR_CORE = re.compile(r"\b(HMMA|HGMMA|QGMMA|IMMA|UTC[A-Z]*MMA)\b")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class Loaded(Exception):
    """Raised where the compiled kernel would load its binary: the launch stops there."""


class StandInDriver:
    """What Triton's launch path asks its driver before loading a binary: the target, device and
    stream, the shared-memory limit (checked per arch below, to report it). The device is the
    arch: each arch gets its own JIT cache."""

    def __init__(self, arch):
        """`utils` is the driver itself: Triton asks driver.active.utils for load_binary and the
        device properties. The shared-memory limit is huge so that Triton's own check never
        fires: problems() reports the real one per arch. launcher_cls makes no launcher: nothing
        is launched."""
        self.utils = self
        self.get_current_target = lambda: GPUTarget("cuda", arch, 32)
        self.get_current_device = lambda: arch
        self.get_current_stream = lambda device: 0
        self.get_device_properties = lambda device: {"max_shared_mem": 1 << 30}
        self.launcher_cls = lambda src, metadata: None

    def load_binary(self, name, cubin, shared, device):
        raise Loaded(cubin, shared)


def launches(name, args, dtype):
    """{variant: (autotuned kernel, a call of its launcher)} for one case's (CPU) inputs."""
    mod = importlib.import_module(f"kernels.{name.removesuffix('_fp8')}")
    if name == "rope_qknorm":
        q, k, cos, sin = args
        qr, kr = (torch.empty(t.shape[:3]) for t in (q, k))
        fwd = partial(mod._rope_qknorm_fwd, q, k, cos, sin, 1e-6)
        bwd = partial(mod._rope_qknorm_bwd, [q, qr, k, kr, cos, sin], q, k)
        kernels = mod._rope_qknorm_fwd_kernel, mod._rope_qknorm_bwd_kernel
        return {"fwd": (kernels[0], fwd), "bwd": (kernels[1], bwd)}
    if name == "relu2_mlp":  # x stands in for dy, (M, C) too
        x, w_fc, w_proj = args
        h = x.new_empty(x.shape[0], w_fc.shape[0])
        relu2 = partial(mod._launch, x, w_fc.T, mod.RELU2)
        grad = partial(mod._launch, x, w_proj, mod.RELU2_GRAD, h)
        return {"relu2": (mod._matmul_kernel, relu2), "relu2_grad": (mod._matmul_kernel, grad)}
    if name == "relu2_mlp_fp8":  # e4m3 x and weights (w_proj K-major), e5m2 dy, bf16 h
        x, w_fc, w_proj = args
        x8, fc8, proj8 = (torch.empty(t.shape, dtype=torch.float8_e4m3fn) for t in args)
        dy8, one = torch.empty(x.shape, dtype=torch.float8_e5m2), torch.ones(())
        h = torch.empty(x.shape[0], w_fc.shape[0], dtype=torch.bfloat16)
        relu2 = partial(mod._launch, x8, fc8.T, mod.RELU2, None, one, torch.bfloat16)
        grad = partial(mod._launch, dy8, proj8.T.contiguous().T, mod.RELU2_GRAD, h, one, h.dtype)
        kernel = mod._matmul_fp8_kernel
        return {"relu2": (kernel, relu2), "relu2_grad": (kernel, grad)}
    if name == "softcap_ce":
        logits, targets = args
        loss, lse = torch.empty(len(targets)), torch.empty(len(targets))
        dloss = torch.empty(()).expand(len(targets))  # "mean": one scalar gradient, stride 0
        bwd = partial(mod._launch_ce, mod.BWD, logits, targets, lse, 15.0, -1, dloss=dloss)
        out = {"bwd": (mod._ce_grad_kernel, partial(bwd, dlogits=logits))}
        for cap, path in ((15.0, "fixed max"), (50.0, "running max")):
            fwd = partial(mod._launch_ce, mod.FWD, logits, targets, lse, cap, -1, loss=loss)
            grad = partial(mod._launch_ce, mod.FWD_GRAD, logits, targets, lse, cap, -1, loss=loss)
            out[f"fwd {path}"] = (mod._ce_kernel, fwd)
            out[f"fwd+grad {path}"] = (mod._ce_grad_kernel, partial(grad, dlogits=logits))
        return out
    # newton_schulz, at Muon's stacks: X Xᵀ (wide), Xᵀ X (tall: X strided), then A·A
    out, sym = {}, mod._sym_matmul_kernel
    for G in args:
        X, m = torch.empty(G.shape, dtype=dtype), min(G.shape[-2:])
        A = X.new_empty(G.shape[0], m, m)
        tall = G.shape[-2] > G.shape[-1]
        gram = partial(mod._launch_sym_matmul, X.mT if tall else X, A)
        out["Xᵀ X" if tall else "X Xᵀ"] = (sym, gram)
        square = partial(mod._launch_sym_matmul, A, torch.empty_like(A), 0.5, A, -1.0, 2.0)
        out["A·A + b·A + a·I"] = (sym, square)
    return out


@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr, 1.0)


def why(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"


def can_target(arch):
    """None if the installed Triton compiles for this arch, else why not."""
    driver.set_active(StandInDriver(arch))
    try:
        _probe[(1,)](torch.empty(1))
    except Loaded:
        return None
    except Exception as e:  # noqa: BLE001 (e.g. a ptxas too old for the arch)
        return why(e)


def compile_one(kernel, cfg, call):
    """Compile one variant through its launcher: (seconds, cubin, shared bytes), or an error."""
    # one config: the autotuner has nothing to choose, so it compiles that one without
    # benchmarking (which would launch every config on a GPU)
    saved, kernel.configs = kernel.configs, [cfg]
    start = time.perf_counter()
    try:
        call()
        return "the launcher returned without launching"
    except Loaded as e:
        return (round(time.perf_counter() - start, 2), *e.args)
    except Exception as e:  # noqa: BLE001 (a compile error is a result: reported, then failed)
        return why(e)
    finally:
        kernel.configs = saved


def measure(arch, cubin, shared, warps):
    """Registers, stack, spill instructions and tensor-core instructions from the cubin; resident
    blocks per SM from registers (allocated per warp in units of 256) and shared memory (1 KB per
    block reserved by the system), capped by the SM's block and warp limits."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = partial(subprocess.run, capture_output=True, text=True, check=True)
        res, sass = (run([CUOBJDUMP, flag, f.name]).stdout for flag in ("-res-usage", "-sass"))
    regs, stack = (int(re.search(rf"{key}:(\d+)", res).group(1)) for key in ("REG", "STACK"))
    stl, ldl = (len(re.findall(rf"\b{op}\b", sass)) for op in ("STL", "LDL"))
    ops = TENSOR_CORE.findall(sass)
    tensor_core = {op: ops.count(op) for op in sorted(set(ops))}
    _, reg_file, smem, max_blocks, max_warps, _ = GPUS[arch]
    # a warp's registers: regs x 32 threads, rounded up to the 256-register unit; then whole blocks
    by_regs = reg_file // (-(-regs * 32 // 256) * 256) // warps
    blocks = min(max_blocks, max_warps // warps, by_regs, smem // (shared + 1024))
    return dict(regs=regs, stack=stack, stl=stl, ldl=ldl, tensor_core=tensor_core, blocks=blocks)


def problems(row, arch, dot):
    """Why one row fails (empty: it passes): its compile error; else more shared memory than a
    block may have on `arch` and, except in fp32 (tests only: may spill), any spill or a dot
    kernel without tensor-core instructions.

    Each rule catches what a test run on one GPU can miss. Too much shared memory: the launch
    fails on that arch (Triton's OutOfResources), though the same tile runs on a GPU with more.
    A spill (stack bytes, STL/LDL): registers saved to local memory, which lives in DRAM behind
    the caches: memory traffic and latency the kernel's tiling exists to avoid. A bf16/fp16/fp8
    dot with no tensor-core instruction runs on the FMA units at a fraction of the rate; its
    results are still right, so no test fails, and only speed would show it."""
    if "error" in row:
        return [row["error"]]
    out, half = [], row["dtype"] != "fp32"
    if row["shared"] > GPUS[arch][5]:
        out.append(f"shared memory {row['shared']} B > {GPUS[arch][5]} B per block")
    if half and (row["stl"] or row["ldl"] or row["stack"]):
        out.append(f"spills ({row['stack']} B stack, {row['stl']} STL / {row['ldl']} LDL)")
    if half and dot and not row["tensor_core"]:
        out.append("a bf16/fp16/fp8 dot without tensor-core instructions")
    return out


def run(arch, dtype_name, case, seen):
    """Compile every variant of one case for one arch, a row each (a kernel compiled at another
    case's shapes to a cubin already seen is left out)."""
    name, dtype, rows = case.name.split()[0], DTYPES[dtype_name], []
    fp8 = name.endswith("_fp8")  # FP8 operands, bf16 out: once per arch, from Ada (sm_89) on
    # linear_softcap_ce's kernels are softcap_ce's, on chunks of the same logits
    if name == "linear_softcap_ce" or (fp8 and (dtype != torch.bfloat16 or arch < 89)):
        return rows
    mod = importlib.import_module(f"kernels.{name.removesuffix('_fp8')}")
    fp32 = dtype == torch.float32 and hasattr(mod, "FP32_CONFIGS")
    configs = mod.FP8_CONFIGS if fp8 else mod.FP32_CONFIGS if fp32 else mod.GPU_CONFIGS
    # CPU tensors of the case's shapes and strides, never written (no memory is touched)
    args = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype) for a in case.make_inputs()]
    for variant, (kernel, call) in launches(name, args, dtype).items():
        base = dict(arch=arch, dtype="fp8" if fp8 else dtype_name, kernel=name, variant=variant)
        for cfg in configs:
            row, result = dict(base, config=config_name(cfg)), compile_one(kernel, cfg, call)
            if isinstance(result, str):
                row["error"] = result
            elif result[1] in seen:
                continue
            else:
                seen.add(result[1])
                row.update(seconds=result[0], shared=result[2])
                row.update(measure(arch, *result[1:], cfg.num_warps))
            row["problems"] = problems(row, arch, "tl.dot(" in kernel.fn.src)
            rows.append(row)
            print(" | ".join(map(str, format_row(row))), flush=True)
    return rows


def config_name(cfg):
    tiles = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in cfg.kwargs.items())
    return f"{tiles} w{cfg.num_warps} s{cfg.num_stages}"


HEAD = "kernel|variant|dtype|config|regs|stack B|STL/LDL|shared KB|tensor-core ops|blocks/SM"
HEAD = HEAD.split("|") + ["compile s", "problems"]


def format_row(r):
    """One row's cells in HEAD's order; a variant that did not compile has "-" in the measured
    columns."""
    cells = [r["kernel"], r["variant"], r["dtype"], r["config"]] + ["-"] * 7
    if "regs" in r:
        tc = ", ".join(f"{op} {n}" for op, n in r["tensor_core"].items()) or "-"
        spills, shared = f"{r['stl']}/{r['ldl']}", round(r["shared"] / 1024, 1)
        cells[4:] = [r["regs"], r["stack"], spills, shared, tc, r["blocks"], r["seconds"]]
    return cells + ["; ".join(r["problems"]) or "ok"]


def write(out, rows, skipped):
    """OUT.md (one table per arch) and OUT.json (every row); returns compile seconds per arch."""
    seconds = {a: round(sum(r.get("seconds", 0) for r in rows if r["arch"] == a)) for a in skipped}
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Static check, Triton {triton.__version__}\n\n{date}, torch {torch.__version__}, "
        "`python -m bench.static_check`: every kernel compiled through its launcher at every GPU "
        "config and dtype, without a GPU. Compile s: one cold compile on this machine's CPU.\n"
    ]
    for arch, why in skipped.items():
        lines += [f"## sm_{arch} ({GPUS[arch][0]})", ""]
        if why:
            lines += [f"Not compiled: this Triton cannot target it ({why}).", ""]
            continue
        ours = [r for r in rows if r["arch"] == arch]
        failed = sum(bool(r["problems"]) for r in ours)
        summary = f"{len(ours)} variants, {failed} with problems, {seconds[arch]} s of compilation."
        lines += [summary, "", markdown(HEAD, [format_row(r) for r in ours]), ""]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text("\n".join(lines))
    meta = dict(triton=triton.__version__, torch=torch.__version__, date=date, seconds=seconds)
    Path(f"{out}.json").write_text(json.dumps(dict(meta, skipped=skipped, rows=rows), indent=1))
    return seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90,100", help=f"comma-separated, of {list(GPUS)}")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help=f"comma-separated, of {list(DTYPES)}")
    p.add_argument("--only", default="", help="only cases whose name contains this")
    p.add_argument("--out", default="bench/results/static/static", help="writes OUT.md, OUT.json")
    args = p.parse_args(argv)
    archs, dtypes = args.arch.split(","), args.dtypes.split(",")
    if not set(archs) <= set(map(str, GPUS)) or not set(dtypes) <= set(DTYPES):
        p.error(f"--arch takes {list(GPUS)}, --dtypes {list(DTYPES)}")
    rows, skipped = [], {}
    for arch in map(int, archs):
        skipped[arch] = can_target(arch)
        print(f"sm_{arch}: " + (f"skipped, {skipped[arch]}" if skipped[arch] else "compiling"))
        seen = set()  # cubins
        for dtype in [] if skipped[arch] else dtypes:
            for case in build_cases("meta", DTYPES[dtype], only=[args.only]):
                rows += run(arch, dtype, case, seen)
    seconds = write(args.out, rows, skipped)
    failed = [r for r in rows if r["problems"]]
    for r in failed:
        where = f"sm_{r['arch']} {r['kernel']} {r['variant']} {r['dtype']} {r['config']}"
        print(f"FAIL {where}: " + "; ".join(r["problems"]), file=sys.stderr)
    print(f"{len(rows)} variants, {len(failed)} failed; compile seconds per arch: {seconds}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
