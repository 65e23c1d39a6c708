"""Newton-Schulz quintic orthogonalization for Muon.

For each matrix of a batch (b, m, n), transposed first when tall so that m <= n, normalized by its
Frobenius norm (+1e-7), then `steps` times:

    A = X Xᵀ                 (m, m), symmetric
    B = b·A + c·A·A          (m, m), symmetric too (A is, so A·A = A·Aᵀ is)
    X = a·X + B·X            (m, n)

with (a, b, c) = (3.4445, -4.7750, 2.0315). In exact arithmetic each singular value σ of X goes
through p(σ) = aσ + bσ³ + cσ⁵ on its own; five steps take every σ in [0.01, 1] into
[0.68, 1.14] (and [0.0015, 1] into [0.68, 1.21]): roughly orthogonal, which is all Muon needs.
After the Frobenius normalization every σ is <= 1; a σ below ~0.0015 stays below 0.68.

Symmetry: both products A = X Xᵀ and A·A are "P Pᵀ" products, so one Triton kernel computes only
the tiles above (and on) the diagonal, pid_m <= pid_n, and writes each off-diagonal tile twice,
as itself and mirrored; b·A is fused into its epilogue. Half of the tiles, so half of those FLOPs.
B·X is a general product: cuBLAS baddbmm with a·X fused as its beta term.

Floor (compute-bound), per matrix and step, with m <= n:
    full products:        2m²n (X Xᵀ) + 2m³ (A·A) + 2m²n (B·X) = 4m²n + 2m³ FLOPs (the reference)
    with symmetry:         m²n        +  m³        + 2m²n        = 3m²n +  m³ FLOPs (this kernel)
The benchmark's floor is the symmetric count, times steps and batch. Worked numbers, 5 steps,
Muon's stacks for depth 12 (C = 768: 4·12 = 48 matrices C x C; 12 of 4C x C and 12 of C x 4C,
both m = 768, n = 3072): 0.435 + 0.353 + 0.353 = 1.14 TFLOP (~1.4 ms at 800 TFLOP/s);
depth 20 (C = 1280: 80 of C x C, 20 + 20 of C x 4C): 3.36 + 2.72 + 2.72 = 8.81 TFLOP (~11 ms).
The reference does 1.5x (square) and 1.38x (C x 4C) more FLOPs, plus five elementwise passes.
"""
import os

import torch
import triton
import triton.language as tl

from kernels.common import check, use_triton

NS_COEFFS = (3.4445, -4.7750, 2.0315)
POISON_OUTPUTS = False  # tests set this: outputs start as NaN, so an element never written shows
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def newton_schulz_reference(G, steps=5, dtype=torch.bfloat16):
    """A = X Xᵀ; X <- a X + (b A + c A A) X, on the last two dims, batched over the rest."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


def newton_schulz_floor(batch, rows, cols, steps=5):
    """Minimum FLOPs with symmetry (see the module docstring), for the TFLOP/s column."""
    m, n = min(rows, cols), max(rows, cols)
    return {"fwd": steps * batch * (3 * m * m * n + m ** 3)}


# ---------------------------------------------------------------------------------------------
# The symmetric product out = alpha · P Pᵀ (+ beta · add), P (batch, M, K), out (batch, M, M).
# Grid (tiles, tiles, batch); programs below the diagonal return at once. Autotuned on the GPU
# (Muon has a few fixed shapes, so this runs once per shape); one small config in the interpreter.

if _INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                for bm, bk, w, st in [(128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 8, 4), (64, 64, 4, 4), (64, 32, 4, 3)]]


@triton.autotune(configs=_CONFIGS, key=["M", "K", "HAS_ADD"])
@triton.jit
def _sym_matmul_kernel(p_ptr, out_ptr, add_ptr, M, K, alpha, beta,
                       stride_pb, stride_pm, stride_pk, stride_ob, stride_om, stride_on,
                       HAS_ADD: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m > pid_n:
        return
    batch = tl.program_id(2).to(tl.int64)
    p_ptr += batch * stride_pb
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = p_ptr + rm[:, None] * stride_pm + rk[None, :] * stride_pk  # rows rm of P, (BLOCK_M, BLOCK_K)
    b_ptrs = p_ptr + rn[:, None] * stride_pm + rk[None, :] * stride_pk  # rows rn of P
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k < K), other=0.0)
        b = tl.load(b_ptrs, mask=(rn[:, None] < M) & (rk[None, :] + k < K), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_pk
        b_ptrs += BLOCK_K * stride_pk
    acc = acc * alpha
    out_ptr += batch * stride_ob
    mask = (rm[:, None] < M) & (rn[None, :] < M)
    if HAS_ADD:  # add is (batch, M, M) with out's strides
        add = tl.load(add_ptr + batch * stride_ob + rm[:, None] * stride_om + rn[None, :] * stride_on, mask=mask)
        acc += beta * add.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out, mask=mask)
    if pid_m != pid_n:  # the mirrored tile: out[rn, rm] = out[rm, rn]ᵀ
        tl.store(out_ptr + rn[:, None] * stride_om + rm[None, :] * stride_on, tl.trans(out),
                 mask=(rn[:, None] < M) & (rm[None, :] < M))


def _launch_sym_matmul(P, out, alpha=1.0, add=None, beta=0.0):
    """out = alpha · P @ Pᵀ + beta · add, for P (batch, M, K); out and add (batch, M, M) contiguous,
    add symmetric (only its upper tiles are read; the lower ones are written as their mirror)."""
    batch, M, K = P.shape
    if batch == 0 or M == 0:
        return out

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"])
        return (tiles, tiles, batch)
    _sym_matmul_kernel[grid](
        P, out, add if add is not None else out, M, K, alpha, beta, *P.stride(), *out.stride(),
        HAS_ADD=add is not None, PRECISION="ieee" if P.dtype == torch.float32 else "tf32")
    return out


def _new(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("nanocode::newton_schulz", mutates_args=())
def _newton_schulz(G: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:]).contiguous()  # (batch, m, n), m <= n
    batch, m, _ = X.shape
    A = _new((batch, m, m), dtype, G.device)
    B = _new((batch, m, m), dtype, G.device)
    for _ in range(steps):
        _launch_sym_matmul(X, A)                        # A = X Xᵀ
        _launch_sym_matmul(A, B, alpha=c, add=A, beta=b)  # B = c·A Aᵀ + b·A
        X = torch.baddbmm(X, B, X, beta=a)              # X = a·X + B·X
    X = X.reshape(shape)
    return (X.mT if tall else X).contiguous()


@_newton_schulz.register_fake
def _(G, steps, dtype):
    return G.new_empty(G.shape, dtype=dtype)


def _check_inputs(G, steps, dtype):
    fn = "newton_schulz"
    check(G.ndim >= 2, fn, f"G must have at least 2 dims, got {tuple(G.shape)}")
    check(G.dtype.is_floating_point, fn, f"G must be floating point, got {G.dtype}")
    check(isinstance(steps, int) and steps >= 0, fn, f"steps must be an int >= 0, got {steps!r}")
    check(isinstance(dtype, torch.dtype) and dtype.is_floating_point, fn, f"dtype must be a floating torch.dtype, got {dtype!r}")


def newton_schulz_triton(G, steps=5, dtype=torch.bfloat16):
    """The Triton path, whatever the device (the benchmark and tests call it directly)."""
    _check_inputs(G, steps, dtype)
    check(dtype in (torch.float32, torch.float16, torch.bfloat16), "newton_schulz",
          f"the Triton kernel computes in float32, float16 or bfloat16, got dtype={dtype}")
    return _newton_schulz(G, steps, dtype)


def newton_schulz(G, steps=5, dtype=torch.bfloat16):
    if use_triton(G):
        return newton_schulz_triton(G, steps, dtype)
    _check_inputs(G, steps, dtype)
    return newton_schulz_reference(G, steps, dtype)
