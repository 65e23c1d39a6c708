"""Kernel microbenchmarks: every Triton kernel beside Liger-Kernel's matching op, PyTorch eager and
torch.compile of its reference.

    python -m bench.kernels                 # all cases, model shapes, bf16, needs a CUDA GPU
    python -m bench.kernels --cases rope    # only cases whose name contains "rope"
    python -m bench.kernels --cases d12     # the depth-12 cases (what bench/gpu_check.sh runs)
    python -m bench.kernels --save          # also write bench/results/<gpu>/kernels.{json,md}
    python -m bench.kernels --device cpu --tiny   # smoke test of this script's logic (Triton
                                                  # interpreter, tiny shapes; timings meaningless)

First it measures this device's own ceilings: memory bandwidth from a large device-to-device copy
(counting read + write) and bf16 matmul FLOP/s from a large square matmul. Then, for each case,
it times the forward and the forward+backward (median of triton.testing.do_bench, grad mode on,
as in training) of up to four implementations in the same run, on the same inputs: ours (the
Triton kernel), Liger-Kernel's op where one exists (softcapped CE, fused linear + softcapped CE,
and its RoPE followed by its RMSNorm as the unfused peer of ours; only when `liger-kernel` is
installed and on CUDA, else skipped with a note), the PyTorch reference in eager mode, and
torch.compile of the reference. The rate column divides the floor stated in the kernel's
docstring (bytes for memory-bound kernels, FLOPs for matmul kernels) by our median time; "% ceil"
compares that rate with the measured ceiling. For the CE cases a second table gives the peak
memory of one forward+backward of each implementation.
Liger's cross-entropy writes its gradient over the input logits in the forward (so it moves
2*N*V*e bytes where a split forward/backward moves 3*N*V*e); its timings reuse those overwritten
logits, which changes the values but not the work.

The cases (build_cases) are the one list of kernel shapes: bench/static_check.py compiles every
kernel at them too, on the "meta" device (shapes without data).
"""

import argparse
import importlib
import json
import os
import platform
import re
import statistics
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# Model shapes (GPTConfig.from_depth): width 64 * depth, head dim 128, n_kv_head = n_head,
# T = 2048 and 65,536 tokens per GPU, i.e. B = 32. MLP hidden = 4 * width.
SEQ_LEN, TOKENS_PER_GPU, HEAD_DIM, VOCAB = 2048, 65536, 128, 32768
BATCH = TOKENS_PER_GPU // SEQ_LEN
DEPTHS = (12, 20)
IMPLS = ("ours", "liger", "eager", "compile")


@dataclass
class Case:
    """One benchmark case.

    make_inputs() -> list of positional args; tensors that need gradients have requires_grad=True.
    triton(*args) / reference(*args) return a tensor or a tuple of tensors.
    liger: Liger-Kernel's op on the same args, or None (no matching op, or Liger unavailable).
    floor: {"fwd": work, "fwd+bwd": work}, the minimum work of the kernel docstring: bytes when
    unit == "GB/s", FLOPs when unit == "TFLOP/s". A forward-only case has just "fwd".
    """

    name: str
    shape: str
    make_inputs: Callable[[], list]
    triton: Callable
    reference: Callable
    liger: Callable | None
    unit: str
    floor: dict


def liger_functional(device):
    """liger_kernel.transformers.functional, or (None, why not)."""
    if device != "cuda":
        return None, "Liger-Kernel skipped: its Triton kernels need CUDA"
    try:
        import liger_kernel.transformers.functional as lf
    except ImportError:
        return None, "Liger-Kernel not installed (pip install liger-kernel): its column is empty"
    return lf, None


def randn(device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()


def rope_qknorm_case(device, dtype, B, T, H, D):
    """RoPE then RMSNorm of one layer's q and k (B, T, H heads of D), fused; as many kv heads as
    query heads, cos/sin tables (T, D/2) of random angles. Liger's peer is its RoPE followed by
    its RMSNorm (`liger` below)."""
    rq = importlib.import_module("kernels.rope_qknorm")
    lf, _ = liger_functional(device)

    def make_inputs():
        q, k = randn(device, dtype, B, T, H, D), randn(device, dtype, B, T, H, D)
        angle = torch.rand(T, D // 2, device=device)
        return [q, k, angle.cos().to(dtype), angle.sin().to(dtype)]  # eps: the default, 1e-6

    def liger(q, k, cos, sin, eps=1e-6):
        """Liger's RoPE, then its RMSNorm on q and k: the unfused peer of rope_qknorm. Liger
        takes (B, H, T, D) and HF's rotate-half tables (cos, sin repeated over D), where ours
        rotates the other way: sin enters negated."""
        cos_f, sin_f = torch.cat([cos, cos], -1)[None], torch.cat([-sin, -sin], -1)[None]
        q, k = lf.liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos_f, sin_f)
        ones = torch.ones(q.shape[-1], device=q.device, dtype=q.dtype)
        return lf.liger_rms_norm(q, ones, eps), lf.liger_rms_norm(k, ones, eps)

    fns = rq.rope_qknorm_triton, rq.rope_qknorm_reference, lf and liger
    floor = rq.rope_qknorm_floor(B, T, H, H, D, dtype.itemsize)
    return Case("rope_qknorm", f"q,k ({B},{T},{H},{D})", make_inputs, *fns, "GB/s", floor)


def relu2_mlp_case(device, dtype, M, C):
    """The MLP relu(x w_fcᵀ)² w_projᵀ on M tokens of width C, hidden 4C, each weight scaled by
    1/sqrt(its fan-in) so the activations stay O(1). Liger has no such op."""
    mlp, H = importlib.import_module("kernels.relu2_mlp"), 4 * C

    def make_inputs():
        x, w_fc = randn(device, dtype, M, C), randn(device, dtype, H, C, scale=C**-0.5)
        return [x, w_fc, randn(device, dtype, C, H, scale=H**-0.5)]

    fns = mlp.relu2_mlp_triton, mlp.relu2_mlp_reference, None
    floor = mlp.relu2_mlp_floor(M, C, H)
    return Case("relu2_mlp", f"x ({M},{C}) hidden {H}", make_inputs, *fns, "TFLOP/s", floor)


def relu2_mlp_fp8_case(device, dtype, M, C):
    """The MLP with its six matmuls in FP8 (base_train --fp8): ours runs the two around relu² on
    the FP8 Triton kernel; its peer (the "eager" and "compile" columns) is torch._scaled_mm,
    relu² in PyTorch, torch._scaled_mm. Rates against the FP8 matmul ceiling."""
    import nanocode.fp8 as fp8

    fns = dict(triton=fp8.fp8_relu2_mlp, reference=fp8.fp8_relu2_mlp_unfused)
    case = relu2_mlp_case(device, dtype, M, C)
    return replace(case, name="relu2_mlp_fp8", unit="FP8 TFLOP/s", **fns)


def softcap_ce_case(device, dtype, N, V):
    """Cross-entropy of the softcapped logits of one GPU's batch (65,536 tokens, V = 32768), "mean"
    (one case for both depths: the shape does not depend on the depth)."""
    ce = importlib.import_module("kernels.softcap_ce")
    lf, _ = liger_functional(device)

    def make_inputs():  # logits well beyond the cap
        return [randn(device, dtype, N, V, scale=10.0), torch.randint(0, V, (N,), device=device)]

    def liger(logits, targets):
        return as_tuple(lf.liger_cross_entropy(logits, targets, ignore_index=-1, softcap=15.0))[0]

    fns = ce.softcap_cross_entropy_triton, ce.softcap_cross_entropy_reference, lf and liger
    floor = ce.softcap_cross_entropy_floor(N, V, dtype.itemsize)
    return Case("softcap_ce", f"logits ({N},{V})", make_inputs, *fns, "GB/s", floor)


def linear_softcap_ce_case(device, dtype, N, V, C):
    """The model's loss head: x (65,536 tokens, C) @ weight (V, C)ᵀ, softcap, CE, "mean". Only
    fwd+bwd: with grad mode on, the Triton forward already computes the gradients (the backward
    scales them), so a forward-only time would compare different work."""
    ce = importlib.import_module("kernels.softcap_ce")
    lf, _ = liger_functional(device)

    def make_inputs():
        x, w = randn(device, dtype, N, C), randn(device, dtype, V, C, scale=4 / C**0.5)
        return [x, w, torch.randint(0, V, (N,), device=device)]

    def liger(x, w, targets):
        loss = lf.liger_fused_linear_cross_entropy(x, w, targets, ignore_index=-1, softcap=15.0)
        return as_tuple(loss)[0]

    fns = ce.linear_softcap_cross_entropy_triton, ce.linear_softcap_cross_entropy_reference
    floor = ce.linear_softcap_cross_entropy_floor(N, V, C)
    shape = f"x ({N},{C}) w ({V},{C})"
    return Case("linear_softcap_ce", shape, make_inputs, *fns, lf and liger, "TFLOP/s", floor)


def newton_schulz_case(device, dtype, L, C):
    """One Muon step's matrices, stacked by shape as Muon stacks them: per layer c_q, c_k, c_v,
    attn c_proj (C x C), c_fc (4C x C), mlp c_proj (C x 4C); fp32 momentum in, `dtype` math."""
    ns = importlib.import_module("kernels.newton_schulz")
    stacks = [(4 * L, C, C), (L, 4 * C, C), (L, C, 4 * C)]

    def make_inputs():
        return [torch.randn(*s, device=device) for s in stacks]

    def on_each(newton_schulz):  # 5 iterations on every stack
        return lambda *Gs: tuple(newton_schulz(G, 5, dtype) for G in Gs)

    floor = {"fwd": sum(ns.newton_schulz_floor(*s)["fwd"] for s in stacks)}
    shape = " + ".join(f"({b},{m},{n})" for b, m, n in stacks)
    fns = on_each(ns.newton_schulz_triton), on_each(ns.newton_schulz_reference), None
    return Case("newton_schulz", shape, make_inputs, *fns, "TFLOP/s", floor)


# Each case: its builder, its tiny smoke-test shape, and its shape at a model depth d (or one
# shape for every depth: one case "d12/d20").
CASES = [
    (rope_qknorm_case, (2, 16, 2, 16), lambda d: (BATCH, SEQ_LEN, d // 2, HEAD_DIM)),
    (relu2_mlp_case, (32, 32), lambda d: (TOKENS_PER_GPU, 64 * d)),
    (relu2_mlp_fp8_case, (32, 32), lambda d: (TOKENS_PER_GPU, 64 * d)),
    (softcap_ce_case, (64, 300), (TOKENS_PER_GPU, VOCAB)),
    (linear_softcap_ce_case, (64, 300, 32), lambda d: (TOKENS_PER_GPU, VOCAB, 64 * d)),
    (newton_schulz_case, (2, 32), lambda d: (d, 64 * d)),
]


def build_cases(device, dtype, tiny=False, only=None):
    """Every builder of CASES at its tiny shape (`tiny`) or at each of DEPTHS (one "d12/d20" case
    where the shape is the same at every depth), the tag appended to the case's name. `only`: keep
    the cases whose name contains one of these substrings (all are built first)."""
    cases = []
    for build, tiny_shape, at_depth in CASES:
        one = not callable(at_depth)  # the same shape at every depth: one case
        shapes = {"d12/d20": at_depth} if one else {f"d{d}": at_depth(d) for d in DEPTHS}
        for tag, shape in ({"tiny": tiny_shape} if tiny else shapes).items():
            cases.append(build(device, dtype, *shape))
            cases[-1].name += f" {tag}"
    return [c for c in cases if not only or any(o in c.name for o in only)]


def make_step(fn, args, pass_):
    """A zero-argument callable running one forward, or one forward+backward (autograd.grad with a
    fixed random output gradient, so nothing accumulates into .grad between repetitions)."""
    if pass_ == "fwd":  # grad mode on: the forward saves what its backward needs, as in training
        return lambda: fn(*args)
    # A random output gradient, made once here and outside the timed call: out.sum().backward()
    # would add a reduction kernel to every timing and feed the backward all-ones gradients.
    leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    grads = [torch.randn_like(o) for o in as_tuple(fn(*args))]
    return lambda: torch.autograd.grad(as_tuple(fn(*args)), leaves, grads)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def median_ms(step, device, cpu_repeat=3):
    """Median milliseconds: do_bench on CUDA; `cpu_repeat` plain wall-clock runs on a CPU (a few
    in the kernels' smoke mode, where each run is an interpreted kernel).

    do_bench times each call between two CUDA events recorded on the stream around it: GPU time,
    idle gaps included where the host launches (Python, autograd, a wrapper) more slowly than the
    kernels run. No CUDA graph hides that overhead, as none does in base_train's steps. It
    zeroes a 256 MB buffer before each call (outside the events) to evict the L2 cache, so inputs
    come from HBM as they do in training. The median, not the mean, so that a few slow calls (a
    clock change, another process on the GPU) do not move the result."""
    step()  # compile / autotune first: do_bench sizes its repetitions on its first calls
    if device != "cuda":
        return 1e3 * statistics.median(timeit.repeat(step, number=1, repeat=cpu_repeat))
    from triton.testing import do_bench  # not at the top: --device cpu sets TRITON_INTERPRET first

    torch.cuda.synchronize()
    # warmup and rep are milliseconds, not counts: about 25 ms of untimed calls, then as many
    # timed calls as fit in about 100 ms (from an estimate made on 5 calls)
    return do_bench(step, warmup=25, rep=100, return_mode="median")


def measure_ceilings(device, tiny):
    """This device's bandwidth (GB/s, read + write of a large copy), bf16 matmul rate (TFLOP/s)
    and, where it has them, FP8 matmul rate (e4m3 _scaled_mm, fast accumulation).

    Measured, not taken from a datasheet: what this card, at its clocks, actually sustains, so
    "% ceil" says how far a kernel is from the practical limit. A copy is the simplest way to move
    bytes and a large square matmul is cuBLAS's best case: a kernel near 100% of either has little
    left to gain."""
    from nanocode.fp8 import E4M3, fp8_supported

    n = 2**16 if tiny else 2**29  # bf16 elements: 1 GiB per buffer on the GPU
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    # a copy reads n elements and writes n; bytes / ms / 1e6 = GB/s (1 GB = 1e9 bytes). 1 GiB
    # buffers are ~20x an H100's 50 MB L2, so this is HBM bandwidth, not cache bandwidth.
    gbps = 2 * n * src.element_size() / median_ms(lambda: dst.copy_(src), device) / 1e6
    m = 256 if tiny else 8192
    a, b = (torch.randn(m, m, device=device, dtype=torch.bfloat16) for _ in range(2))
    # an m x m x m matmul does m³ multiply-adds = 2m³ FLOPs; FLOPs / ms / 1e9 = TFLOP/s
    out = {"GB/s": gbps, "TFLOP/s": 2 * m**3 / median_ms(lambda: a @ b, device) / 1e9}
    if fp8_supported(device)[0]:
        # _scaled_mm (cuBLAS) wants its second operand column-major: .t() of a row-major matrix
        a8, b8, one = a.to(E4M3), b.to(E4M3).t(), torch.ones((), device=device)
        # fast accumulation: _scaled_mm's fastest mode, the one nanocode.fp8's forward uses
        kw = dict(scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)
        ms = median_ms(lambda: torch._scaled_mm(a8, b8, **kw), device)
        out["FP8 TFLOP/s"] = 2 * m**3 / ms / 1e9
    return out


def run_case(case, device):
    """Time every (pass, impl) of one case; returns rows {case, shape, pass_, impl, ms, rate, unit}
    (rate: the docstring floor over this impl's time, so the impls compare on the same work),
    and for the CE cases on CUDA the peak memory of one forward+backward (peak_mib)."""
    print(f"running {case.name} ({case.shape}) ...", flush=True)
    args, rows = case.make_inputs(), []
    impls = {"ours": case.triton, "liger": case.liger, "eager": case.reference}
    # static shapes, as in training; the default mode, so no CUDA graphs ("reduce-overhead" would
    # capture them), like every other impl here. Compilation happens in the first, untimed
    # calls (make_step's and median_ms's).
    impls["compile"] = torch.compile(case.reference, dynamic=False)
    impls = {name: fn for name, fn in impls.items() if fn is not None}  # Liger: where it has one
    for pass_ in case.floor:
        for impl, fn in impls.items():
            try:
                ms = median_ms(step := make_step(fn, args, pass_), device)
            except Exception as e:  # noqa: BLE001 (one failing impl should not hide the others)
                print(f"  {case.name} {pass_} {impl} failed: {type(e).__name__}: {e}")
                continue
            # the same floor (the kernel docstring's minimum work) for every impl, so an impl that
            # moves more bytes or does more FLOPs than the floor shows up as a lower rate.
            # bytes / ms / 1e6 = GB/s; FLOPs / ms / 1e9 = TFLOP/s
            rate = case.floor[pass_] / ms / (1e6 if case.unit == "GB/s" else 1e9)
            rows.append(dict(case=case.name, shape=case.shape, pass_=pass_, impl=impl, ms=ms))
            rows[-1].update(rate=rate, unit=case.unit)
            if device == "cuda" and pass_ == "fwd+bwd" and "softcap_ce" in case.name:
                rows[-1]["peak_mib"] = peak_mib(step)
    del args
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def peak_mib(step):
    """Peak memory of one call of step above what was allocated before it (MiB): the inputs and
    anything else alive are in `base`, so this is what the impl itself adds (outputs, saved
    tensors, temporaries, gradients)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def results_dir(device_name):
    """bench/results/<device name as a slug>: where --save writes (bench.kernels, bench.mfu)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return Path(__file__).resolve().parent / "results" / slug


def markdown(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def format_memory_table(rows):
    """The CE cases' peak memory per impl, and as a share of eager's."""
    rows = [r for r in rows if "peak_mib" in r]
    eager = {r["case"]: r["peak_mib"] for r in rows if r["impl"] == "eager"}
    cells = [(r["case"], r["shape"], r["impl"], f"{r['peak_mib']:.0f}") for r in rows]
    vs = [f"{100 * r['peak_mib'] / eager.get(r['case'], float('nan')):.1f}%" for r in rows]
    head = ["case", "shape", "impl", "peak MiB (fwd+bwd, above inputs)", "vs eager"]
    return markdown(head, [(*c, v) for c, v in zip(cells, vs)]) if rows else ""


def format_table(rows, ceilings):
    """One line per (case, pass): each impl's ms, our rate and % of the measured ceiling, and our
    speedup over each other impl ("-" where an impl did not run).

    Columns: "<impl> ms" is that impl's median time; "ours rate" the kernel docstring's floor over
    ours' time, in GB/s for memory-bound kernels, TFLOP/s for matmul kernels; "% ceil" that rate
    over the ceiling of the same unit measured in this run; "vs <impl>" that impl's time over ours
    (2.00x: ours takes half the time)."""
    head = ["case", "shape", "pass", *(f"{i} ms" for i in IMPLS), "ours rate", "% ceil"]
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["shape"], r["pass_"]), {})[r["impl"]] = r
    lines = []
    for key, by in groups.items():
        ms = {i: by[i]["ms"] if i in by else None for i in IMPLS}
        ours = by.get("ours") or dict(ms=None, rate=None, unit="")
        cells = [*key, *("-" if ms[i] is None else f"{ms[i]:.3f}" for i in IMPLS)]
        if ours["ms"] is None:
            cells += ["-", "-"]
        else:
            percent = 100 * ours["rate"] / ceilings.get(ours["unit"], float("nan"))
            cells += [f"{ours['rate']:.1f} {ours['unit']}", f"{percent:.0f}%"]
        ratios = [ms[i] / ours["ms"] if ms[i] and ours["ms"] else None for i in IMPLS[1:]]
        lines.append(cells + ["-" if r is None else f"{r:.2f}x" for r in ratios])
    return markdown(head + [f"vs {i}" for i in IMPLS[1:]], lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names")
    parser.add_argument("--save", action="store_true", help="write bench/results/<gpu>/kernels.*")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (logic smoke test)")
    args = parser.parse_args()

    from nanocode.common import NanocodeError

    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        raise NanocodeError("bench.kernels needs a CUDA GPU (`--device cpu --tiny` smoke-tests)")
    if cpu:  # before the kernels are imported (build_cases imports them): Triton on the CPU
        os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("NANOCODE_KERNELS") == "torch":
        raise NanocodeError("NANOCODE_KERNELS=torch is set: unset it to benchmark the kernels")
    dtype = torch.float32 if cpu else torch.bfloat16  # the interpreter has no bf16 tl.dot
    device_name = (platform.processor() or "cpu") if cpu else torch.cuda.get_device_name()
    cases = build_cases(args.device, dtype, args.tiny, [s for s in args.cases.split(",") if s])
    if not cases:
        raise NanocodeError(f"no case matches --cases {args.cases!r}")

    import triton

    ceilings = measure_ceilings(args.device, args.tiny)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    summary = (
        f"{date}, {str(dtype)[6:]}, torch {torch.__version__}, triton {triton.__version__}. "
        f"Ceilings measured in the same run: copy {ceilings['GB/s']:.0f} GB/s (read + write), "
        f"bf16 matmul {ceilings['TFLOP/s']:.0f} TFLOP/s, FP8 matmul "
        f"{ceilings.get('FP8 TFLOP/s', float('nan')):.0f} TFLOP/s. Median ms of do_bench; "
        "rate = docstring floor / time."
    )
    print(f"{device_name}: {summary}")
    rows = [row for case in cases for row in run_case(case, args.device)]
    _, liger_note = liger_functional(args.device)
    table = format_table(rows, ceilings) + (f"\n\n{liger_note}." if liger_note else "")
    if memory := format_memory_table(rows):
        table += "\n\nPeak memory of the cross-entropy variants:\n\n" + memory
    print(table)
    if args.save:
        out = results_dir(device_name)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(device=device_name, summary=summary, tiny=args.tiny, ceilings=ceilings)
        (out / "kernels.json").write_text(json.dumps(dict(meta, rows=rows)))
        md = f"# Kernel benchmarks on {device_name}\n\n{summary}\n\n{table}\n"
        (out / "kernels.md").write_text(md)
        print(f"saved {out}/kernels.json and kernels.md")


if __name__ == "__main__":
    from nanocode.common import run_main

    run_main(main)
