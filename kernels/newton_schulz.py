"""Newton-Schulz orthogonalization for Muon, with per-step polynomial coefficients.

For each matrix X of a batch (..., m, n), normalized by its Frobenius norm (x 1.02, + 1e-6), then
for each step i with coefficients (a, b, c) = coeffs[i] (the last triple repeats if steps > len):

    wide (m <= n):  A = X Xᵀ (m, m)    X <- a·X + (b·A + c·A·A)·X
    tall (m > n):   A = Xᵀ X (n, n)    X <- a·X + X·(b·A + c·A·A)

Both are the same map on the singular values: each σ goes through p_i(σ) = aσ + bσ³ + cσ⁵ on its
own, and the Gram matrix is always the smaller one (no transposes, no copies of X).

Coefficients:
    POLAR_EXPRESS (the default): Amsel, Persson, Musco, Gower 2025 ("The Polar Express",
        arXiv 2505.16932), 5 steps computed for safety factor 2e-2 and cushion 2, as nanochat's
        and modded-nanogpt's Muon use them: a different, minimax-optimal polynomial per step, so 5
        steps take every normalized σ in [0.001, 1] into [0.859, 1.141] (the classic quintic
        takes [0.01, 1] only into [0.68, 1.13], and σ = 0.001 to 0.47). The 1.02 of the
        normalization is the paper's safety margin against bf16 rounding pushing a σ above 1.
    CLASSIC_QUINTIC: (3.4445, -4.7750, 2.0315) every step (Keller Jordan's Muon, nanochat of
        October 2025), kept for A/B runs.

Symmetry: A = X Xᵀ (or Xᵀ X) and A·A are both "P Pᵀ" products (A is symmetric), so one Triton
kernel computes only the tiles above (and on) the diagonal, pid_m <= pid_n, and writes each
off-diagonal tile twice, as itself and mirrored; b·A + a·I is fused into its epilogue (in fp32,
rounded once), so the update is one plain product X <- (a·I + B)·X. Xᵀ X is the same kernel on the
strided view Xᵀ (it indexes through strides). Half of the tiles, so half of those FLOPs. The
update is cuBLAS bmm into a second buffer (the two X buffers alternate): no a·X term, so no copy
of X into the output and no read of it in the epilogue, which baddbmm(X, B, X) does (3·m·n·e
bytes per matrix and step; at depth 12, 5 steps, bf16: ~2.5 GB, ~0.75 ms at 3.35 TB/s).

Floor (compute-bound), per matrix and step, with m <= n the short side:
    full products:        2m²n (Gram) + 2m³ (A·A) + 2m²n (B·X) = 4m²n + 2m³ FLOPs (the reference)
    with symmetry:         m²n        +  m³        + 2m²n        = 3m²n +  m³ FLOPs (this kernel)
The benchmark's floor is the symmetric count, times steps and batch. Worked numbers, 5 steps,
Muon's stacks for depth 12 (C = 768: 4·12 = 48 matrices C x C; 12 of 4C x C and 12 of C x 4C,
both m = 768, n = 3072): 0.435 + 0.353 + 0.353 = 1.14 TFLOP (~1.4 ms at 800 TFLOP/s);
depth 20 (C = 1280: 80 of C x C, 20 + 20 of C x 4C): 3.36 + 2.72 + 2.72 = 8.81 TFLOP (~11 ms).
The reference does 1.5x (square) and 1.38x (C x 4C) more FLOPs, plus five elementwise passes.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import autotune_configs, check, check_triton, empty, use_triton

# Per-step (a, b, c); see the module docstring.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
CLASSIC_QUINTIC = ((3.4445, -4.7750, 2.0315),)


def step_coeffs(coeffs, steps):
    """The (a, b, c) of each of `steps` steps: coeffs in order, the last one repeated."""
    return [tuple(coeffs[min(i, len(coeffs) - 1)]) for i in range(steps)]


def _normalize(X):
    return X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)


def newton_schulz_reference(G, steps=5, dtype=torch.bfloat16, coeffs=POLAR_EXPRESS):
    """The iteration of the module docstring in plain PyTorch, batched over leading dims."""
    X = _normalize(G.to(dtype))
    tall = G.size(-2) > G.size(-1)
    for a, b, c in step_coeffs(coeffs, steps):
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * A @ A
        X = a * X + (X @ B if tall else B @ X)
    return X


def newton_schulz_floor(batch, rows, cols, steps=5):
    """Minimum FLOPs with symmetry (see the module docstring), for the TFLOP/s column."""
    m, n = min(rows, cols), max(rows, cols)
    return {"fwd": steps * batch * (3 * m * m * n + m**3)}


# ---------------------------------------------------------------------------------------------
# The symmetric product out = alpha · P Pᵀ (+ beta · add + diag · I), P (batch, M, K) through its
# strides, out and add (batch, M, M) contiguous. Grid (tiles, tiles, batch); programs below the
# diagonal return at once.

# GPU_CONFIGS (bf16, fp16): tuned on the GPU (Muon has a few fixed shapes, so tuning runs once
# per shape). FP32_CONFIGS: fp32 runs only in tests, as IEEE dots on the FMA units, where the
# large tiles spill (bench/static_check.py). The interpreter runs one small config (tests force
# each GPU config in turn).
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bm, bk, w, st in [
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 32, 8, 4),
        (64, 64, 4, 4),
        (64, 32, 4, 3),
    ]
]
FP32_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": 32}, num_warps=w, num_stages=3)
    for bm, w in [(64, 4), (128, 8)]
]
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]


CONFIGS = autotune_configs(GPU_CONFIGS, INTERPRETER_CONFIGS, FP32_CONFIGS, "p_ptr")


@triton.autotune(key=["M", "K", "HAS_ADD"], **CONFIGS)
@triton.jit
def _sym_matmul_kernel(
    p_ptr,
    out_ptr,
    add_ptr,
    M,
    K,
    alpha,
    beta,
    diag,
    sp,  # P's strides (batch, row, column)
    HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = alpha · P Pᵀ, + beta · add + diag · I with HAS_ADD (fp32 accumulation, rounded once
    to out's dtype). Grid (tiles, tiles, batch), tiles = cdiv(M, BLOCK_M): program (i, j, b) with
    i <= j computes tile (i, j) of matrix b and stores it twice, at (i, j) and transposed at
    (j, i); programs with i > j return at once (the product is symmetric)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m > pid_n:
        return
    batch = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    p_ptr += batch * sp[0]
    a_ptrs = p_ptr + rm[:, None] * sp[1] + rk[None, :] * sp[2]  # rows rm of P, (BLOCK_M, BLOCK_K)
    b_ptrs = p_ptr + rn[:, None] * sp[1] + rk[None, :] * sp[2]  # rows rn of P
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k < K), other=0.0)
        b = tl.load(b_ptrs, mask=(rn[:, None] < M) & (rk[None, :] + k < K), other=0.0)
        # "ieee": fp32 inputs (tests) get exact fp32 products; bf16/fp16 use the tensor cores
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        a_ptrs += BLOCK_K * sp[2]
        b_ptrs += BLOCK_K * sp[2]
    acc = acc * alpha
    square = batch * M * M  # out and add: (batch, M, M) contiguous
    mask = (rm[:, None] < M) & (rn[None, :] < M)
    if HAS_ADD:
        add = tl.load(add_ptr + square + rm[:, None] * M + rn[None, :], mask=mask)
        acc += beta * add.to(tl.float32) + tl.where(rm[:, None] == rn[None, :], diag, 0.0)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + square + rm[:, None] * M + rn[None, :], out, mask=mask)
    if pid_m != pid_n:  # the mirrored tile: out[rn, rm] = out[rm, rn]ᵀ
        mirror = out_ptr + square + rn[:, None] * M + rm[None, :]
        tl.store(mirror, tl.trans(out), mask=(rn[:, None] < M) & (rm[None, :] < M))


def _launch_sym_matmul(P, out, alpha=1.0, add=None, beta=0.0, diag=0.0):
    """out = alpha · P @ Pᵀ + beta · add + diag · I (the last two only with add), for P (batch, M,
    K); out and add (batch, M, M) contiguous, add symmetric (only its upper tiles are read; the
    lower ones are written as their mirror)."""
    batch, M, K = P.shape

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"])
        return (tiles, tiles, batch)

    add, has_add = (out, False) if add is None else (add, True)
    if batch > 0 and M > 0:
        _sym_matmul_kernel[grid](P, out, add, M, K, alpha, beta, diag, P.stride(), HAS_ADD=has_add)
    return out


@torch.library.custom_op("nanocode::newton_schulz", mutates_args=())
def _newton_schulz(G: Tensor, steps: int, dtype: torch.dtype, coeffs: list[float]) -> Tensor:
    """coeffs: the per-step (a, b, c), flattened (3 * steps floats)."""
    shape = G.shape
    X = _normalize(G.to(dtype)).reshape(-1, *shape[-2:]).contiguous()  # (batch, rows, cols)
    tall = X.shape[1] > X.shape[2]
    batch, m = X.shape[0], min(X.shape[1:])
    A, B = (empty((batch, m, m), dtype, G.device) for _ in range(2))
    Y = torch.empty_like(X)  # the other X buffer (fully written by bmm, so never poisoned)
    for i in range(steps):
        a, b, c = coeffs[3 * i : 3 * i + 3]
        _launch_sym_matmul(X.mT if tall else X, A)  # A = XᵀX or XXᵀ (the small Gram matrix)
        _launch_sym_matmul(A, B, alpha=c, add=A, beta=b, diag=a)  # B = c·A Aᵀ + b·A + a·I
        if tall:
            torch.bmm(X, B, out=Y)  # Y = X·(a·I + b·A + c·A·A)
        else:
            torch.bmm(B, X, out=Y)  # Y = (a·I + b·A + c·A·A)·X
        X, Y = Y, X
    return X.reshape(shape)


@_newton_schulz.register_fake
def _(G, steps, dtype, coeffs):
    return G.new_empty(G.shape, dtype=dtype)


def _check_inputs(G, steps, dtype, coeffs):
    """Both paths' checks: G (..., m, n) floating point, steps an int >= 0, dtype a floating
    torch.dtype, coeffs a non-empty sequence of (a, b, c) triples."""
    fn = "newton_schulz"
    check(G.ndim >= 2, fn, f"G must have at least 2 dims, got {tuple(G.shape)}")
    check(G.dtype.is_floating_point, fn, f"G must be floating point, got {G.dtype}")
    check(isinstance(steps, int) and steps >= 0, fn, f"steps must be an int >= 0, got {steps!r}")
    floating = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    check(floating, fn, f"dtype must be a floating torch.dtype, got {dtype!r}")
    triples = len(coeffs) > 0 and all(len(t) == 3 for t in coeffs)
    check(triples, fn, f"coeffs must be a non-empty sequence of (a, b, c) triples, got {coeffs!r}")


def newton_schulz_triton(G, steps=5, dtype=torch.bfloat16, coeffs=POLAR_EXPRESS):
    """The Triton path, whatever the device (the benchmark and tests call it directly)."""
    _check_inputs(G, steps, dtype, coeffs)
    check_triton("newton_schulz", G, dtype)
    flat = [float(v) for t in step_coeffs(coeffs, steps) for v in t]
    return _newton_schulz(G, steps, dtype, flat)


def newton_schulz(G, steps=5, dtype=torch.bfloat16, coeffs=POLAR_EXPRESS):
    """Orthogonalize G (..., m, n) by `steps` Newton-Schulz steps in `dtype` with the per-step
    coefficients `coeffs` (POLAR_EXPRESS or CLASSIC_QUINTIC, or any sequence of (a, b, c))."""
    if use_triton(G):
        return newton_schulz_triton(G, steps, dtype, coeffs)
    _check_inputs(G, steps, dtype, coeffs)
    return newton_schulz_reference(G, steps, dtype, coeffs)
