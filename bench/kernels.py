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

Cases are a flat list: each kernel file contributes a function building its cases (see
CASE_BUILDERS at the bottom of the cases sections).
"""

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Model shapes (GPTConfig.from_depth): width 64 * depth, head dim 128, n_kv_head = n_head,
# T = 2048 and 65,536 tokens per GPU, i.e. B = 32. MLP hidden = 4 * width.
SEQ_LEN, TOKENS_PER_GPU, HEAD_DIM = 2048, 65536, 128
DEPTHS = (12, 20)
IMPLS = ("ours", "liger", "eager", "compile")


@dataclass
class Case:
    """One benchmark case.

    make_inputs() -> list of positional args; tensors that need gradients have requires_grad=True.
    triton(*args) / reference(*args) return a tensor or a tuple of tensors.
    floor: {"fwd": work, "fwd+bwd": work}, the minimum work of the kernel docstring: bytes when
    unit == "GB/s", FLOPs when unit == "TFLOP/s". A forward-only case has just "fwd".
    liger: Liger-Kernel's op on the same args, or None (no matching op, or Liger unavailable).
    """

    name: str
    shape: str
    make_inputs: Callable[[], list]
    triton: Callable
    reference: Callable
    unit: str
    floor: dict
    liger: Callable | None = None


def liger_functional(device):
    """liger_kernel.transformers.functional, or (None, why not)."""
    if device != "cuda":
        return None, "Liger-Kernel skipped: its Triton kernels need CUDA"
    try:
        import liger_kernel.transformers.functional as lf
    except ImportError:
        return (
            None,
            "Liger-Kernel not installed (pip install liger-kernel, the `bench` extra): its column is empty",
        )
    return lf, None


def first(out):
    return out[0] if isinstance(out, tuple) else out


def model_shape(depth):
    C = 64 * depth
    return dict(
        B=TOKENS_PER_GPU // SEQ_LEN, T=SEQ_LEN, C=C, H=C // HEAD_DIM, D=HEAD_DIM, hidden=4 * C
    )


# ---- kernels I cases: fused RoPE + QK-norm, ReLU² MLP ----


def rope_qknorm_cases(device, dtype, tiny):
    from kernels.rope_qknorm import rope_qknorm_floor, rope_qknorm_reference, rope_qknorm_triton

    eps = 1e-6
    shapes = (
        [("tiny", dict(B=2, T=16, H=2, D=16))]
        if tiny
        else [(f"d{d}", model_shape(d)) for d in DEPTHS]
    )
    cases = []
    for tag, s in shapes:
        B, T, H, D = s["B"], s["T"], s["H"], s["D"]

        def make_inputs(B=B, T=T, H=H, D=D):
            q = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
            ang = torch.rand(T, D // 2, device=device)
            return [q, k, ang.cos().to(dtype), ang.sin().to(dtype), eps]

        floor = rope_qknorm_floor(B, T, H, H, D, torch.finfo(dtype).bits // 8)
        cases.append(
            Case(
                f"rope_qknorm {tag}",
                f"q,k ({B},{T},{H},{D}) {str(dtype)[6:]}",
                make_inputs,
                rope_qknorm_triton,
                rope_qknorm_reference,
                "GB/s",
                floor,
                liger_rope_rmsnorm(device),
            )
        )
    return cases


def liger_rope_rmsnorm(device):
    """Liger's RoPE, then its RMSNorm on q and k: the unfused peer of rope_qknorm. Liger takes
    (B, H, T, D) and HF's rotate-half tables (cos, sin repeated over D), where ours rotates the
    other way: sin enters negated."""
    lf, _ = liger_functional(device)
    if lf is None:
        return None

    def fn(q, k, cos, sin, eps):
        cos_f, sin_f = torch.cat([cos, cos], -1)[None], torch.cat([-sin, -sin], -1)[None]
        q, k = lf.liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos_f, sin_f)
        ones = torch.ones(q.shape[-1], device=q.device, dtype=q.dtype)
        return lf.liger_rms_norm(q, ones, eps), lf.liger_rms_norm(k, ones, eps)

    return fn


def relu2_mlp_cases(device, dtype, tiny):
    from kernels.relu2_mlp import relu2_mlp_floor, relu2_mlp_reference, relu2_mlp_triton

    shapes = (
        [("tiny", dict(B=2, T=16, C=32, hidden=64))]
        if tiny
        else [(f"d{d}", model_shape(d)) for d in DEPTHS]
    )
    cases = []
    for tag, s in shapes:
        M, C, Hd = s["B"] * s["T"], s["C"], s["hidden"]

        def make_inputs(M=M, C=C, Hd=Hd):
            x = torch.randn(M, C, device=device, dtype=dtype, requires_grad=True)
            w_fc = (torch.randn(Hd, C, device=device) / C**0.5).to(dtype).requires_grad_()
            w_proj = (torch.randn(C, Hd, device=device) / Hd**0.5).to(dtype).requires_grad_()
            return [x, w_fc, w_proj]

        floor = relu2_mlp_floor(M, C, Hd)
        cases.append(
            Case(
                f"relu2_mlp {tag}",
                f"x ({M},{C}) hidden {Hd} {str(dtype)[6:]}",
                make_inputs,
                relu2_mlp_triton,
                relu2_mlp_reference,
                "TFLOP/s",
                floor,
            )
        )
    return cases


# ---- softcap CE, fused linear + softcap CE, Newton-Schulz cases ----
# softcap CE, fused linear + softcap CE, Newton-Schulz: builders with the signature
# f(device, dtype, tiny) -> list[Case], appended to CASE_BUILDERS below.

VOCAB = 32768


def softcap_ce_cases(device, dtype, tiny):
    """Cross-entropy of the softcapped logits of one GPU's batch (65,536 tokens, V = 32768), "mean"."""
    from kernels.softcap_ce import (
        softcap_cross_entropy_floor,
        softcap_cross_entropy_reference,
        softcap_cross_entropy_triton,
    )

    N, V = (64, 300) if tiny else (TOKENS_PER_GPU, VOCAB)

    def make_inputs():
        logits = (
            torch.randn(N, V, device=device, dtype=dtype).mul_(10).requires_grad_()
        )  # well beyond the cap
        return [logits, torch.randint(0, V, (N,), device=device)]

    floor = softcap_cross_entropy_floor(N, V, torch.finfo(dtype).bits // 8)
    lf, _ = liger_functional(device)
    liger = (
        (lambda logits, t: first(lf.liger_cross_entropy(logits, t, ignore_index=-1, softcap=15.0)))
        if lf
        else None
    )
    # one case for both depths: the shape is one GPU's batch x the vocabulary, whatever the depth
    return [
        Case(
            "softcap_ce tiny" if tiny else "softcap_ce d12/d20",
            f"logits ({N},{V}) {str(dtype)[6:]}",
            make_inputs,
            softcap_cross_entropy_triton,
            softcap_cross_entropy_reference,
            "GB/s",
            floor,
            liger,
        )
    ]


def linear_softcap_ce_cases(device, dtype, tiny):
    """The model's loss head: x (65,536 tokens, C) @ weight (V, C)ᵀ, softcap, CE, "mean". Only
    fwd+bwd: with grad mode on, the Triton forward already computes the gradients (the backward
    scales them), so a forward-only time would compare different work."""
    from kernels.softcap_ce import (
        linear_softcap_cross_entropy_floor,
        linear_softcap_cross_entropy_reference,
        linear_softcap_cross_entropy_triton,
    )

    shapes = (
        [("tiny", 64, 300, 32)]
        if tiny
        else [(f"d{d}", TOKENS_PER_GPU, VOCAB, 64 * d) for d in DEPTHS]
    )
    cases = []
    for tag, N, V, C in shapes:

        def make_inputs(N=N, V=V, C=C):
            x = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
            w = (torch.randn(V, C, device=device) * (4 / C**0.5)).to(dtype).requires_grad_()
            return [x, w, torch.randint(0, V, (N,), device=device)]

        lf, _ = liger_functional(device)
        liger = (
            (
                lambda x, w, t: first(
                    lf.liger_fused_linear_cross_entropy(x, w, t, ignore_index=-1, softcap=15.0)
                )
            )
            if lf
            else None
        )
        cases.append(
            Case(
                f"linear_softcap_ce {tag}",
                f"x ({N},{C}) w ({V},{C}) {str(dtype)[6:]}",
                make_inputs,
                linear_softcap_cross_entropy_triton,
                linear_softcap_cross_entropy_reference,
                "TFLOP/s",
                linear_softcap_cross_entropy_floor(N, V, C),
                liger,
            )
        )
    return cases


def newton_schulz_cases(device, dtype, tiny):
    """One Muon step's matrices, stacked by shape as Muon stacks them: per layer c_q, c_k, c_v,
    attn c_proj (C x C), c_fc (4C x C), mlp c_proj (C x 4C); fp32 momentum in, `dtype` math."""
    from kernels.newton_schulz import (
        newton_schulz_floor,
        newton_schulz_reference,
        newton_schulz_triton,
    )

    shapes = [("tiny", 2, 32)] if tiny else [(f"d{d}", d, 64 * d) for d in DEPTHS]
    cases = []
    for tag, L, C in shapes:
        stacks = [(4 * L, C, C), (L, 4 * C, C), (L, C, 4 * C)]

        def make_inputs(stacks=stacks):
            return [torch.randn(*s, device=device) for s in stacks]

        def triton_fn(*Gs):
            return tuple(newton_schulz_triton(G, 5, dtype) for G in Gs)

        def reference_fn(*Gs):
            return tuple(newton_schulz_reference(G, 5, dtype) for G in Gs)

        floor = {"fwd": sum(newton_schulz_floor(*s)["fwd"] for s in stacks)}
        cases.append(
            Case(
                f"newton_schulz {tag}",
                " + ".join(f"({b},{m},{n})" for b, m, n in stacks) + f" {str(dtype)[6:]}",
                make_inputs,
                triton_fn,
                reference_fn,
                "TFLOP/s",
                floor,
            )
        )
    return cases


def ce_peak_memory(device, dtype, tiny=False):
    """Peak memory of one forward+backward of each CE case, above what its inputs hold, for ours,
    Liger (when available), eager and torch.compile (torch.cuda.max_memory_allocated). Returns rows
    {case, shape, impl, peak_mib, vs_eager}; empty on the CPU (no allocator statistics)."""
    if device != "cuda":
        return []
    rows = []
    for case in softcap_ce_cases(device, dtype, tiny) + linear_softcap_ce_cases(
        device, dtype, tiny
    ):
        args = case.make_inputs()
        peaks = {}
        impls = [("ours", case.triton)] + ([("liger", case.liger)] if case.liger else [])
        for impl, fn in impls + [
            ("eager", case.reference),
            ("compile", torch.compile(case.reference)),
        ]:
            step = make_step(fn, args, "fwd+bwd")
            step()  # compile and warm up outside the measurement
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peaks[impl] = (torch.cuda.max_memory_allocated() - base) / 2**20
            del step
        rows += [
            dict(
                case=case.name,
                shape=case.shape,
                impl=impl,
                peak_mib=mib,
                vs_eager=mib / peaks["eager"],
            )
            for impl, mib in peaks.items()
        ]
        del args
        torch.cuda.empty_cache()
    return rows


def format_memory_table(rows):
    lines = [
        "| case | shape | impl | peak MiB (fwd+bwd, above inputs) | vs eager |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['shape']} | {r['impl']} | {r['peak_mib']:.0f} | {100 * r['vs_eager']:.1f}% |"
        for r in rows
    ]
    return "\n".join(lines)


# ---- end of cases ----

CASE_BUILDERS = [rope_qknorm_cases, relu2_mlp_cases]
CASE_BUILDERS += [softcap_ce_cases, linear_softcap_ce_cases, newton_schulz_cases]


def build_cases(device, dtype, tiny=False, only=None):
    cases = [c for build in CASE_BUILDERS for c in build(device, dtype, tiny)]
    return [c for c in cases if not only or any(o in c.name for o in only)]


def make_step(fn, args, pass_):
    """A zero-argument callable running one forward, or one forward+backward (autograd.grad with a
    fixed random output gradient, so nothing accumulates into .grad between repetitions)."""
    if pass_ == "fwd":
        return lambda: fn(*args)
    leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]

    def step():
        outs = fn(*args)
        torch.autograd.grad(outs if isinstance(outs, tuple) else (outs,), leaves, grads)

    return step


def timeit(step, device):
    """Median milliseconds: do_bench on CUDA; a few plain wall-clock runs in the CPU smoke mode."""
    step()  # compile / autotune first: do_bench sizes its repetitions on its first calls
    if device == "cuda":
        from triton.testing import do_bench

        torch.cuda.synchronize()
        return do_bench(step, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device, tiny):
    """This device's bandwidth (GB/s, read + write of a large copy) and bf16 matmul rate (TFLOP/s)."""
    n = 2**16 if tiny else 2**29  # bf16 elements: 1 GiB per buffer on the GPU
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), device)
    gbps = 2 * n * src.element_size() / ms / 1e6
    del src, dst
    m = 256 if tiny else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = timeit(lambda: a @ b, device)
    tflops = 2 * m**3 / ms / 1e9
    return {"GB/s": gbps, "TFLOP/s": tflops}


def run_case(case, device):
    """Time every (pass, impl) of one case; returns rows {case, shape, pass_, impl, ms, rate, unit}
    (rate: the docstring floor over this impl's time, so the impls compare on the same work)."""
    impls = {"ours": case.triton}
    if case.liger is not None:
        impls["liger"] = case.liger
    impls["eager"] = case.reference
    try:
        impls["compile"] = torch.compile(
            case.reference, dynamic=False
        )  # static shapes, as in training
    except Exception as e:  # noqa: BLE001 (reported, not hidden)
        print(f"  {case.name}: torch.compile failed: {e}")
    args = case.make_inputs()
    rows = []
    for pass_ in case.floor:
        for impl, fn in impls.items():
            try:
                ms = timeit(make_step(fn, args, pass_), device)
            except Exception as e:  # noqa: BLE001 (one failing impl should not hide the others)
                print(f"  {case.name} {pass_} {impl} failed: {type(e).__name__}: {e}")
                continue
            rate = case.floor[pass_] / ms / (1e6 if case.unit == "GB/s" else 1e9)
            rows.append(
                dict(
                    case=case.name,
                    shape=case.shape,
                    pass_=pass_,
                    impl=impl,
                    ms=ms,
                    rate=rate,
                    unit=case.unit,
                )
            )
    del args
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows, ceilings):
    """One line per (case, pass): each impl's ms, our rate and % of the measured ceiling, and our
    speedup over each other impl ("-" where an impl did not run)."""
    head = [
        "case",
        "shape",
        "pass",
        *(f"{i} ms" for i in IMPLS),
        "ours rate",
        "% ceil",
        *(f"vs {i}" for i in IMPLS[1:]),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["shape"], r["pass_"]), {})[r["impl"]] = r
    for (case, shape, pass_), by in groups.items():
        ms = {i: by[i]["ms"] if i in by else None for i in IMPLS}
        ours = by.get("ours")
        cells = [case, shape, pass_, *("-" if ms[i] is None else f"{ms[i]:.3f}" for i in IMPLS)]
        if ours is None:
            cells += ["-", "-"]
        else:
            cells += [
                f"{ours['rate']:.1f} {ours['unit']}",
                f"{100 * ours['rate'] / ceilings[ours['unit']]:.0f}%",
            ]
        cells += [
            "-" if ours is None or ms[i] is None else f"{ms[i] / ours['ms']:.2f}x"
            for i in IMPLS[1:]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", type=str, default="", help="comma-separated substrings of case names"
    )
    parser.add_argument(
        "--save", action="store_true", help="write bench/results/<gpu>/kernels.{json,md}"
    )
    parser.add_argument("--device", type=str, default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (logic smoke test)")
    args = parser.parse_args()

    from nanocode.common import NanocodeError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise NanocodeError(
            "bench/kernels.py needs a CUDA GPU (none is visible); "
            "`--device cpu --tiny` only smoke-tests the script"
        )
    if args.device == "cpu":
        # Must be set before the kernels are imported (build_cases imports them): Triton on the CPU.
        os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("NANOCODE_KERNELS") == "torch":
        raise NanocodeError(
            "NANOCODE_KERNELS=torch is set: unset it to benchmark the Triton kernels"
        )
    dtype = (
        torch.bfloat16 if args.device == "cuda" else torch.float32
    )  # the interpreter has no bf16 tl.dot
    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    )
    cases = build_cases(args.device, dtype, args.tiny, [s for s in args.cases.split(",") if s])
    if not cases:
        raise NanocodeError(f"no case matches --cases {args.cases!r}")

    ceilings = measure_ceilings(args.device, args.tiny)
    print(
        f"device: {device_name}, torch {torch.__version__}, triton {__import__('triton').__version__}"
    )
    _, liger_note = liger_functional(args.device)
    if liger_note:
        print(liger_note)
    print(
        f"ceilings: copy {ceilings['GB/s']:.0f} GB/s (read + write), bf16 matmul {ceilings['TFLOP/s']:.0f} TFLOP/s"
    )
    rows = []
    for case in cases:
        print(f"running {case.name} ({case.shape}) ...", flush=True)
        rows += run_case(case, args.device)
    table = format_table(rows, ceilings)
    if liger_note:
        table += f"\n\n{liger_note}."
    print(table)
    memory = (
        ce_peak_memory(args.device, dtype, args.tiny) if any("ce" in c.name for c in cases) else []
    )
    if memory:
        table += "\n\nPeak memory of the cross-entropy variants:\n\n" + format_memory_table(memory)
        print(format_memory_table(memory))

    if args.save:
        slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
        out = Path(__file__).resolve().parent / "results" / slug
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(
            device=device_name,
            torch=torch.__version__,
            triton=__import__("triton").__version__,
            tiny=args.tiny,
            ceilings=ceilings,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        )
        (out / "kernels.json").write_text(
            json.dumps(dict(meta, rows=rows, memory=memory), indent=2) + "\n"
        )
        (out / "kernels.md").write_text(
            f"# Kernel benchmarks on {device_name}\n\n{meta['date']}, torch {meta['torch']}, triton {meta['triton']}. "
            f"Ceilings measured in the same run: copy {ceilings['GB/s']:.0f} GB/s, bf16 matmul "
            f"{ceilings['TFLOP/s']:.0f} TFLOP/s. Median ms of triton.testing.do_bench; rate = docstring floor / time.\n\n"
            f"{table}\n"
        )
        print(f"saved {out}/kernels.json and kernels.md")


if __name__ == "__main__":
    from nanocode.common import run_main

    run_main(main)
