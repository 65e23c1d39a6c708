"""Fused RoPE + QK RMSNorm: out = rms_norm(rope(x)) per head, for q and k.

Unfused, PyTorch reads and writes q and k several times (the two halves, the rotation, the
concatenation, the norm's statistics, the normalization). Fused, each row (one head of one
token: D numbers) is loaded once, rotated and normalized in registers, and stored once. One
launch does q and k: a program takes a block of tokens, loads their cos/sin once, and walks all
Hq + Hk heads (so cos/sin are read once per token, not once per head and tensor; at d12 that is
12x fewer cos/sin loads, 2 * D/2 * e bytes per token instead of per row, and one launch instead
of two per direction):

    forward:  y = [x1*cos + x2*sin, -x1*sin + x2*cos]      (half-split RoPE, x = [x1, x2])
              out = y * rstd,  rstd = 1 / sqrt(mean(y^2) + eps)      (statistics in fp32)
    backward: dy = rstd * (dout - out * mean(dout * out))           (RMSNorm, in terms of out)
              dx = [dy1*cos - dy2*sin, dy1*sin + dy2*cos]            (the rotation transposed)

Saved for the backward: the outputs, which attention keeps alive anyway, and one fp32 rstd per
row (4 bytes per D numbers), so the inputs q and k can be freed after the forward: at depth 20
that is 335 MB per layer. (Saving the inputs and recomputing y and rstd moves the same bytes and
is a touch more precise in bf16, but keeps q and k alive beside the outputs.) Inputs q, k and
the output gradients may be strided views (q and k sliced from a fused projection, transposed
layouts): the kernels index them with their own strides, so no copy is made. Outputs and
gradients are new contiguous tensors, and so are the saved outputs the backward reads.

Floor (memory-bound; the arithmetic is ~10 FLOPs per element), with e bytes per element and
N = B*T*(Hq+Hk)*D elements of q and k together, and cos/sin (T, D/2) each read once per pass:
    forward:          bytes = 2*N*e (read x, write out)           + T*D*e
    forward+backward: bytes = 5*N*e (+ read out, dout, write dx)  + 2*T*D*e
(rstd adds 2 * 4 bytes per row, written forward and read backward: 0.6% of the forward+backward
at D = 128 in bf16, left out of the floor since saving the inputs instead would not need it)
Worked number, depth 12 (B=32, T=2048, Hq=Hk=6, D=128, bf16): N = 100.7M elements,
forward 403 MB, forward+backward 1.008 GB, i.e. ~0.34 ms at 3 TB/s. Depth 20 (10 + 10 heads):
672 MB and 1.679 GB.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import autotune_configs, check, check_same, check_triton, empty, use_triton


def rope_qknorm_reference(q, k, cos, sin, eps=1e-6):
    """q (B, T, Hq, D), k (B, T, Hk, D), cos/sin (T, D/2). Half-split RoPE, then RMSNorm over D."""

    def one(x):
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        y = torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], dim=-1)
        return torch.nn.functional.rms_norm(y, (y.shape[-1],), eps=eps)

    return one(q), one(k)


def rope_qknorm_floor(B, T, Hq, Hk, D, elem_bytes):
    """Minimum bytes moved (see the module docstring), for the benchmark's GB/s column."""
    n = B * T * (Hq + Hk) * D
    return {"fwd": (2 * n + T * D) * elem_bytes, "fwd+bwd": (5 * n + 2 * T * D) * elem_bytes}


# ---------------------------------------------------------------------------------------------
# Triton kernels. One launch for q and k: a program handles BLOCK_T tokens r = b*T + t, loads
# their cos/sin rows once, then walks the Hq heads of q and the Hk heads of k, one (BLOCK_T, D)
# tile per head. Each tensor argument is a pair, (q's, k's), unrolled by tl.static_range(2);
# strided tensors come with their strides (B, T, H, D), the others are contiguous.

# GPU_CONFIGS: tokens per program x warps, from 256 to 4096 elements per tile at D = 128 (4 to 16
# per thread). The interpreter runs the one small config (tests force each GPU config in turn).
GPU_CONFIGS = [
    triton.Config({"BLOCK_T": t}, num_warps=w)
    for t, w in [(2, 1), (4, 2), (8, 2), (8, 4), (16, 4), (32, 8)]
]
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_T": 4}, num_warps=4)]
CONFIGS = autotune_configs(GPU_CONFIGS, INTERPRETER_CONFIGS)
KEY = ["NT_BUCKET", "heads", "HALF"]


@triton.jit
def _token_offsets(r, T, st):
    """Offsets of tokens r = b*T + t of a (B, T, H, D) tensor with strides st (the index math
    in int32, which any real token count fits; the offsets in int64)."""
    return (r // T).to(tl.int64) * st[0] + (r % T).to(tl.int64) * st[1]


@triton.jit
def _load_halves(ptr, off, cols, sd, HALF: tl.constexpr, mask):
    p = ptr + off[:, None] + cols[None, :] * sd
    x1 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    return x1, tl.load(p + HALF * sd, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_halves(ptr, row, cols, HALF: tl.constexpr, mask, y1, y2):
    """Rows `row` of a contiguous (B, T, H, D) tensor, D = 2 * HALF."""
    p = ptr + row[:, None] * (2 * HALF) + cols[None, :]
    tl.store(p, y1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p + HALF, y2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tokens(
    cos_ptr, sin_ptr, NT, T, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr
):
    """This program's tokens r (flat b*T + t), the columns of half a head, their mask, and the
    tokens' rows of the contiguous (T, D/2) cos/sin tables, loaded once for all heads of q and k."""
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (r < NT)[:, None] & (cols < HALF)[None, :]
    offsets = (r % T).to(tl.int64)[:, None] * HALF + cols[None, :]
    c = tl.load(cos_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return r, cols, mask, c, tl.load(sin_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.autotune(key=KEY, **CONFIGS)
@triton.jit
def _rope_qknorm_fwd_kernel(
    xs,  # (q, k), through their strides
    outs,  # (q_out, k_out)
    rstds,  # (q_rstd, k_rstd), (B, T, Hq) and (B, T, Hk) fp32
    cos_ptr,
    sin_ptr,
    NT,  # B*T tokens
    NT_BUCKET,  # the next power of 2 of NT: only the autotune key
    T,
    heads,  # (Hq, Hk)
    strides,  # (q.stride(), k.stride())
    eps,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """out = rms_norm(rope(x)) per head, in fp32 registers, stored in the outputs' dtype (the
    inputs'), plus the fp32 rstd of each row. x (B, T, H, D) through its strides, outputs
    contiguous, D = 2 * HALF. Grid (cdiv(B*T, BLOCK_T),): one program does BLOCK_T tokens, every
    head of q, then of k."""
    r, cols, mask, c, s = _tokens(cos_ptr, sin_ptr, NT, T, HALF, BLOCK_D, BLOCK_T)
    for i in tl.static_range(2):  # q, then k
        H, st = heads[i], strides[i]
        x_tok = _token_offsets(r, T, st)
        for h in range(H):
            x1, x2 = _load_halves(xs[i], x_tok + h * st[2], cols, st[3], HALF, mask)
            y1 = x1 * c + x2 * s
            y2 = x2 * c - x1 * s
            rstd = tl.rsqrt((tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)) / (2 * HALF) + eps)
            row = r.to(tl.int64) * H + h  # of the contiguous outputs
            _store_halves(outs[i], row, cols, HALF, mask, y1 * rstd[:, None], y2 * rstd[:, None])
            tl.store(rstds[i] + row, rstd, mask=r < NT)


@triton.autotune(key=KEY, **CONFIGS)
@triton.jit
def _rope_qknorm_bwd_kernel(
    outs,  # (q_out, k_out), saved by the forward
    rstds,  # (q_rstd, k_rstd)
    douts,  # (dq_out, dk_out), through their strides
    dxs,  # (dq, dk)
    cos_ptr,
    sin_ptr,
    NT,
    NT_BUCKET,
    T,
    heads,
    strides,  # (dq_out.stride(), dk_out.stride())
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """dq, dk (contiguous, the outputs' dtype) from the saved outputs and rstds and the output
    gradients (through their strides), in fp32: the RMSNorm backward in terms of its output, then
    the rotation transposed. Grid and programs as the forward's."""
    r, cols, mask, c, s = _tokens(cos_ptr, sin_ptr, NT, T, HALF, BLOCK_D, BLOCK_T)
    for i in tl.static_range(2):
        H, st = heads[i], strides[i]
        g_tok = _token_offsets(r, T, st)
        for h in range(H):
            row = r.to(tl.int64) * H + h
            o1, o2 = _load_halves(outs[i], row * (2 * HALF), cols, 1, HALF, mask)
            g1, g2 = _load_halves(douts[i], g_tok + h * st[2], cols, st[3], HALF, mask)
            rstd = tl.load(rstds[i] + row, mask=r < NT, other=0.0)[:, None]
            # RMSNorm backward in terms of its output o = y * rstd, then the rotation transposed
            dot = ((tl.sum(g1 * o1, axis=1) + tl.sum(g2 * o2, axis=1)) / (2 * HALF))[:, None]
            dy1 = rstd * (g1 - o1 * dot)
            dy2 = rstd * (g2 - o2 * dot)
            _store_halves(dxs[i], row, cols, HALF, mask, dy1 * c - dy2 * s, dy1 * s + dy2 * c)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library custom ops so torch.compile sees opaque, shape-known
# calls (register_fake) and never traces into Triton: no graph break.


def _launch(kernel, pairs, cos, sin, strides, *scalars):
    """One launch over the B*T tokens; pairs: the (q's, k's) tensors of each pointer argument."""
    (q, k), T, D = pairs[0], cos.shape[0], 2 * cos.shape[1]
    NT = q.shape[0] * T
    if NT == 0:
        return
    tables = (cos.contiguous(), sin.contiguous())  # (no copy: the model's tables are contiguous)
    args = (*pairs, *tables, NT, triton.next_power_of_2(NT), T, (q.shape[2], k.shape[2]), strides)
    kernel[lambda meta: (triton.cdiv(NT, meta["BLOCK_T"]),)](
        *args, *scalars, HALF=D // 2, BLOCK_D=triton.next_power_of_2(D // 2)
    )


@torch.library.custom_op("nanocode::rope_qknorm_fwd", mutates_args=())
def _rope_qknorm_fwd(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> q_out, q_rstd, k_out, k_rstd: the fp32 rstd of every row, (B, T, Hq) and (B, T, Hk)."""
    outs = [empty(x.shape, x.dtype, x.device) for x in (q, k)]
    rstds = [empty(x.shape[:3], torch.float32, x.device) for x in (q, k)]
    strides = (q.stride(), k.stride())
    _launch(_rope_qknorm_fwd_kernel, [(q, k), tuple(outs), tuple(rstds)], cos, sin, strides, eps)
    return outs[0], rstds[0], outs[1], rstds[1]


@_rope_qknorm_fwd.register_fake
def _(q, k, cos, sin, eps):
    rstds = [x.new_empty(x.shape[:3], dtype=torch.float32) for x in (q, k)]
    return q.new_empty(q.shape), rstds[0], k.new_empty(k.shape), rstds[1]


@torch.library.custom_op("nanocode::rope_qknorm_bwd", mutates_args=())
def _rope_qknorm_bwd(saved: list[Tensor], dq_out: Tensor, dk_out: Tensor) -> tuple[Tensor, Tensor]:
    """saved: q_out, q_rstd, k_out, k_rstd, cos, sin (what the forward saved)."""
    q_out, q_rstd, k_out, k_rstd, cos, sin = saved
    dq, dk = (empty(x.shape, x.dtype, x.device) for x in (q_out, k_out))
    pairs = [(q_out, k_out), (q_rstd, k_rstd), (dq_out, dk_out), (dq, dk)]
    _launch(_rope_qknorm_bwd_kernel, pairs, cos, sin, (dq_out.stride(), dk_out.stride()))
    return dq, dk


@_rope_qknorm_bwd.register_fake
def _(saved, dq_out, dk_out):
    return torch.empty_like(saved[0]), torch.empty_like(saved[2])


class RopeQKNorm(torch.autograd.Function):
    """Differentiable in q and k (cos and sin are fixed tables: no gradient). Saves the outputs
    and the per-row rstd, not the inputs."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, eps):
        q_out, q_rstd, k_out, k_rstd = _rope_qknorm_fwd(q, k, cos, sin, eps)
        ctx.save_for_backward(q_out, q_rstd, k_out, k_rstd, cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        dq, dk = _rope_qknorm_bwd(list(ctx.saved_tensors), dq_out, dk_out)
        return dq, dk, None, None, None


def rope_qknorm_triton(q, k, cos, sin, eps=1e-6):
    """The Triton path, whatever the device (the benchmark and tests call it directly)."""
    _check_inputs(q, k, cos, sin)
    check_triton("rope_qknorm", q)
    return RopeQKNorm.apply(q, k, cos, sin, float(eps))


def _check_inputs(q, k, cos, sin):
    """Both paths' checks: q (B, T, Hq, D) and k (B, T, Hk, D) with one even D, cos and sin
    (T, D/2), all on one device in one floating dtype."""
    fn = "rope_qknorm"
    shapes = f"{tuple(q.shape)} and {tuple(k.shape)}"
    check(q.ndim == 4 and k.ndim == 4, fn, f"q and k must be (B, T, H, D), got {shapes}")
    check(q.shape[-1] == k.shape[-1], fn, f"head dims differ: q {q.shape[-1]}, k {k.shape[-1]}")
    check(q.shape[-1] % 2 == 0, fn, f"head dim must be even for half-split RoPE, got {q.shape[-1]}")
    check(q.shape[:2] == k.shape[:2], fn, f"q and k batch/time differ: {shapes}")
    T, half = q.shape[1], q.shape[-1] // 2
    tables = f"{tuple(cos.shape)} and {tuple(sin.shape)}"
    ok = cos.shape == (T, half) and sin.shape == (T, half)
    check(ok, fn, f"cos/sin must be (T, D/2) = {(T, half)}, got {tables}")
    check(q.dtype.is_floating_point, fn, f"q must be a floating-point tensor, got {q.dtype}")
    check_same(fn, ("q", q), ("k", k), ("cos", cos), ("sin", sin))


def rope_qknorm(q, k, cos, sin, eps=1e-6):
    """rms_norm(rope(x)) per head for x = q, k. The Triton kernels on CUDA tensors (and on the CPU
    under TRITON_INTERPRET=1), the reference otherwise or with NANOCODE_KERNELS=torch."""
    if use_triton(q, k, cos, sin):
        return rope_qknorm_triton(q, k, cos, sin, eps)
    _check_inputs(q, k, cos, sin)
    return rope_qknorm_reference(q, k, cos, sin, eps)
