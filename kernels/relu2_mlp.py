"""ReLU² MLP: y = relu(x @ w_fc.T)² @ w_proj.T, with the activation fused into matmul epilogues.

Shapes: x (M, C) (any leading dims are flattened), w_fc (H, C), w_proj (C, H); H = 4C in the model.

    forward:  h  = relu(x @ w_fc.T)²         Triton matmul, relu² in the epilogue (fp32 acc.)
              y  = h @ w_proj.T              torch.mm
    backward: dh = (dy @ w_proj) * 2*sqrt(h)  Triton matmul, relu²'s derivative in the epilogue
              dw_proj = dy.T @ h,  dx = dh @ w_fc,  dw_fc = dh.T @ x     torch.mm

The pre-activation x @ w_fc.T never reaches memory. Only h is stored, and it serves twice: as
the input of the second matmul and of dw_proj, and, through d/dz relu(z)² = 2*relu(z) =
2*sqrt(h), as the activation's derivative (sqrt(h) carries half of h's rounding error, so it is
at least as accurate as storing z in the same dtype; only in fp16 does a relu(z) below ~2.4e-4
square to zero, dropping its derivative 2*relu(z) < 5e-4). PyTorch eager writes z, relu(z) and
h to memory and keeps relu(z) and h for the backward, which again makes extra passes over (M, H).

The four plain matmuls use torch.mm (cuBLAS): with no elementwise work to fuse, a Triton GEMM
would at best match it. The fused matmul is a classic tiled Triton GEMM (grouped tile order
for L2 reuse, masks on every edge so any M, N, K works, fp32 accumulation), autotuned for H100.

What the fused epilogue saves, per forward+backward, e bytes per element (M tokens, H hidden):
eager writes z and reads it for relu, writes relu(z) and reads it for the square, and its
backward reads z (or relu(z)) again for the derivative and writes/reads the product dh*2relu(z):
~6*M*H*e more bytes than this design, which writes h once and reads it three times (proj input,
dw_proj, derivative). At depth 12 (M = 65,536, H = 3072, bf16) that is ~2.4 GB, ~0.7 ms at
3.35 TB/s, against ~2.5 ms of matmul: about a fifth of the MLP's time, plus the M*H*e bytes of
z and relu(z) eager keeps alive for the backward (0.8 GB per layer).
What a persistent, TMA-fed GEMM (as modded-nanogpt's Triton 3.6 kernels do on Hopper) would add:
one program per SM looping over output tiles (no launch tail; the epilogue of one tile overlaps
the loads of the next), TMA descriptors instead of per-thread address math and masks (the copy
engine fetches tiles, freeing registers and issue slots for wgmma), and warp specialization
(producer warps load, consumer warps multiply): the usual route for a Triton GEMM on Hopper
to reach cuBLAS-class throughput (unmeasured here). The fused GEMM is 2 of the MLP's 6
matmuls, so even a 20% faster fused GEMM would speed the whole MLP by under 7%. It is not
implemented: TMA and persistent kernels cannot run under the Triton interpreter, so on this
project's CPU CI it would be untested code; it belongs behind a capability check once a GPU run
can test and time it.

FP8 (base_train --fp8, wired by nanocode.fp8.fp8_relu2_mlp, which runs the other four matmuls on
torch._scaled_mm): the same kernel on e4m3 x and w_fc (forward) or e5m2 dy and e4m3 w_proj
(gradient), given the product of the two operands' inverse scales, which multiplies the fp32
accumulator before the epilogue; h and dz come out in bf16. Its own tiles (FP8_CONFIGS). The FLOPs
are the same; an H100 does them at twice the bf16 rate (1979 against 989 TFLOP/s dense), and each
operand element is 1 byte instead of 2.

Floor (compute-bound): FLOPs = 4*M*C*H forward (two matmuls), 12*M*C*H forward+backward (six).
Bytes moved by this implementation, e bytes per element: forward (2MC + 2CH + 2MH) * e,
backward (4MC + 4CH + 5MH) * e; at ~600 FLOP per byte that is well above an H100's
ridge point (~300), so FLOP/s is the honest measure.
Worked number, depth 12 (M = 65,536 tokens, C = 768, H = 3072): 4MCH = 0.618 TFLOP forward,
1.855 TFLOP forward+backward (~2.5 ms at 750 TFLOP/s). Depth 20 (C = 1280, H = 5120):
1.718 and 5.154 TFLOP.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import autotune_configs, check, check_same, check_triton, empty, use_triton


def relu2_mlp_reference(x, w_fc, w_proj):
    return torch.relu(x @ w_fc.T).square() @ w_proj.T


def matmul_fp8_reference(a8, b8, scale, h=None):
    """The FP8 variant of the fused matmul in float64, on the same FP8 operands: relu(z)², or with
    h the gradient dh * 2*sqrt(h), where z = a8 @ b8.T * scale (a8 (M, K), b8 (N, K))."""
    z = a8.double() @ b8.double().T * scale.double()
    return z.relu().square() if h is None else z * 2 * h.double().sqrt()


def relu2_mlp_floor(M, C, H):
    """Minimum FLOPs (see the module docstring), for the benchmark's TFLOP/s column."""
    return {"fwd": 4 * M * C * H, "fwd+bwd": 12 * M * C * H}


# ---------------------------------------------------------------------------------------------
# The Triton matmul: c = epilogue(a @ b), a (M, K) and b (K, N) through their strides (so b can
# be a transposed weight without a copy); c and h are (M, N) contiguous (made here).

# GPU_CONFIGS (bf16, fp16), H100: wgmma-sized tiles, 3-5 stage cp.async pipelines (all fit in
# 228 KB of shared memory), none of which spills on sm_80 or sm_90 (bench/static_check.py; the
# 4-warp 128x128 tiles and 256x128 spilled in the gradient epilogue). FP32_CONFIGS: fp32 runs
# only in tests, as IEEE dots on the FMA units, where the large tiles spill: small tiles. The
# interpreter runs one small config (tests force each GPU config in turn).
GPU_CONFIGS = [
    triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_stages=s, num_warps=w)
    for m, n, k, s, w in [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 5, 4),
    ]
]
FP32_CONFIGS = [
    triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=32, GROUP_M=8), num_stages=3, num_warps=w)
    for m, n, w in [(64, 64, 4), (64, 128, 8)]
]
# FP8_CONFIGS (e4m3/e5m2 operands, the same kernel): the bf16 tiles with BLOCK_K doubled, so a
# pipeline stage holds the same bytes (the same shared memory, the same stage counts), but for
# 128x256, whose gradient epilogue spills on sm_90 (its fp32 flushes keep a second accumulator:
# 255 registers, 232 B of stack). bench/static_check.py: QGMMA, no spill; speed unmeasured.
FP8_CONFIGS = [
    triton.Config(dict(c.kwargs, BLOCK_K=128), num_stages=c.num_stages, num_warps=c.num_warps)
    for c in GPU_CONFIGS
    if c.kwargs["BLOCK_N"] < 256
]
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
RELU2, RELU2_GRAD = 1, 2  # the two epilogues


@triton.jit
def _matmul(
    a_ptr,
    b_ptr,
    c_ptr,
    h_ptr,
    scale_ptr,  # FP8: the product of a's and b's inverse scales (fp32 scalar); None otherwise
    M,
    N,
    K,
    M_BUCKET,  # M_BUCKET (next power of 2 of M) is only the autotune key
    sa,  # a's strides (row, column)
    sb,  # b's strides
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """c = epilogue(a @ b [* scale]) for a (M, K), b (K, N) read through their strides, fp32
    accumulation; c (M, N) contiguous in its own dtype. EPILOGUE 1 (RELU2): relu(acc)²; 2
    (RELU2_GRAD): acc * 2*sqrt(h), h (M, N) contiguous. Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),):
    one program computes one BLOCK_M x BLOCK_N tile of c."""
    # Grouped order: GROUP_M row-tiles walk the column tiles together, so b's tiles stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap around (% M, % N): those loads are valid and their results
    # are masked at the store, so the inner loop only masks the K tail.
    a_ptrs = a_ptr + (rm % M).to(tl.int64)[:, None] * sa[0] + rk[None, :] * sa[1]
    b_ptrs = b_ptr + rk[:, None] * sb[0] + (rn % N).to(tl.int64)[None, :] * sb[1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        # "ieee": fp32 inputs (tests) get exact fp32 products; bf16/fp16 use the tensor cores.
        # FP8 on Hopper: the tensor cores add into an accumulator of ~14 significant bits. The
        # forward keeps that (as cuBLAS's fast accumulation in nanocode.fp8's forward); the
        # gradient adds each BLOCK_K slice into the fp32 acc (as its backward's full accumulation).
        if EPILOGUE == 1:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee", max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K * sa[1]
        b_ptrs += BLOCK_K * sb[0]

    offsets = rm.to(tl.int64)[:, None] * N + rn[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if scale_ptr is not None:
        acc = acc * tl.load(scale_ptr)
    if EPILOGUE == 1:  # h = relu(z)²
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    else:  # dz = dh * 2*relu(z) = dh * 2*sqrt(h)
        h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc = acc * (2.0 * tl.sqrt(h))
    tl.store(c_ptr + offsets, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _autotuned(*configs):
    tune = triton.autotune(key=["M_BUCKET", "N", "K", "EPILOGUE"], **autotune_configs(*configs))
    return tune(_matmul)


_matmul_kernel = _autotuned(GPU_CONFIGS, INTERPRETER_CONFIGS, FP32_CONFIGS, "a_ptr")
_matmul_fp8_kernel = _autotuned(FP8_CONFIGS, INTERPRETER_CONFIGS)  # the same kernel, FP8 tiles


def _launch(a, b, epilogue, h=None, scale=None, dtype=None):
    """c = epilogue(a @ b [* scale]) in `dtype` (default a's); FP8 operands need `scale`."""
    (M, K), N = a.shape, b.shape[1]
    c = empty((M, N), dtype or a.dtype, a.device)
    if M == 0 or N == 0 or K == 0:
        return c.zero_()
    h = c if h is None else h  # unused by the relu² epilogue

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernel = _matmul_kernel if scale is None else _matmul_fp8_kernel
    args = (M, N, K, triton.next_power_of_2(M), a.stride(), b.stride())
    kernel[grid](a, b, c, h, scale, *args, EPILOGUE=epilogue)
    return c


# ---------------------------------------------------------------------------------------------
# Custom ops: torch.compile sees opaque, shape-known calls (register_fake) and traces the
# torch.mm calls around them itself: no graph break.


# FP8 (nanocode.fp8 wires them): e4m3 x, w_fc and w_proj, e5m2 dy, with `scale` the product of
# the two operands' inverse scales; h in `dtype`, the gradient in h's. Hopper's FP8 wgmma reads
# both operands K-major: w_proj should be a view of an (H, C) row-major tensor (as w_fc.T is).
@torch.library.custom_op("nanocode::matmul_relu2", mutates_args=())
def _matmul_relu2(
    x: Tensor, w_fc: Tensor, scale: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """relu(x @ w_fc.T [* scale])²"""
    return _launch(x, w_fc.T, RELU2, scale=scale, dtype=dtype)


@_matmul_relu2.register_fake
def _(x, w_fc, scale=None, dtype=None):
    return x.new_empty((x.shape[0], w_fc.shape[0]), dtype=dtype)


@torch.library.custom_op("nanocode::matmul_relu2_grad", mutates_args=())
def _matmul_relu2_grad(
    dy: Tensor, w_proj: Tensor, h: Tensor, scale: Tensor | None = None
) -> Tensor:
    """(dy @ w_proj [* scale]) * 2*sqrt(h): the gradient at the pre-activation."""
    return _launch(dy, w_proj, RELU2_GRAD, h, scale, h.dtype)


@_matmul_relu2_grad.register_fake
def _(dy, w_proj, h, scale=None):
    return h.new_empty(h.shape)


class Relu2MLP(torch.autograd.Function):
    """x (M, C), w_fc (H, C), w_proj (C, H) -> (M, C). Saves x, the weights, and h (M, H)."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj):
        h = _matmul_relu2(x, w_fc)
        ctx.save_for_backward(x, w_fc, w_proj, h)
        return h @ w_proj.T

    @staticmethod
    def backward(ctx, dy):
        """dz = (dy @ w_proj) * 2*sqrt(h) (M, H) from the fused kernel; dx, dw_fc and dw_proj are
        plain matmuls, each None where its input needs no gradient."""
        x, w_fc, w_proj, h = ctx.saved_tensors
        dz = _matmul_relu2_grad(dy, w_proj, h)
        dx = dz @ w_fc if ctx.needs_input_grad[0] else None
        dw_fc = dz.T @ x if ctx.needs_input_grad[1] else None
        dw_proj = dy.T @ h if ctx.needs_input_grad[2] else None
        return dx, dw_fc, dw_proj


def relu2_mlp_triton(x, w_fc, w_proj):
    """The Triton path, whatever the device (the benchmark and tests call it directly)."""
    _check_inputs(x, w_fc, w_proj)
    check_triton("relu2_mlp", x)
    y = Relu2MLP.apply(x.reshape(-1, x.shape[-1]), w_fc, w_proj)
    return y.view(*x.shape[:-1], w_proj.shape[0])


def _check_inputs(x, w_fc, w_proj):
    """Both paths' checks: x (..., C), w_fc (H, C), w_proj (C, H), on one device in one floating
    dtype."""
    fn = "relu2_mlp"
    shapes = f"{tuple(w_fc.shape)} and {tuple(w_proj.shape)}"
    check(x.ndim >= 1, fn, "x must have a feature dimension (..., C)")
    check(w_fc.ndim == 2 and w_proj.ndim == 2, fn, f"w_fc and w_proj must be 2-D, got {shapes}")
    H, C = w_fc.shape
    check(x.shape[-1] == C, fn, f"x has {x.shape[-1]} features but w_fc is (H, C) = {(H, C)}")
    check(w_proj.shape == (C, H), fn, f"w_proj must be (C, H) = {(C, H)}, got {shapes}")
    check(x.dtype.is_floating_point, fn, f"x must be a floating-point tensor, got {x.dtype}")
    check_same(fn, ("x", x), ("w_fc", w_fc), ("w_proj", w_proj))


def relu2_mlp(x, w_fc, w_proj):
    """relu(x @ w_fc.T)² @ w_proj.T. The Triton path on CUDA tensors (and on the CPU under
    TRITON_INTERPRET=1), the reference otherwise or with NANOCODE_KERNELS=torch."""
    if use_triton(x, w_fc, w_proj):
        return relu2_mlp_triton(x, w_fc, w_proj)
    _check_inputs(x, w_fc, w_proj)
    return relu2_mlp_reference(x, w_fc, w_proj)
