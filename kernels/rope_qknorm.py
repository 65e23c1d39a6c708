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
is a touch more precise in bf16, but keeps q and k alive beside the outputs.) Inputs may be strided views
(q and k sliced from a fused projection, transposed layouts): the kernels index with the
tensors' own strides, so no copy is made. Outputs and gradients are new contiguous tensors.

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

import os

import torch
import triton
import triton.language as tl

from kernels.common import check, check_same, use_triton

POISON_OUTPUTS = False  # tests set this: outputs start as NaN, so an element never written shows


def rope_qknorm_reference(q, k, cos, sin, eps=1e-6):
    """q (B, T, Hq, D), k (B, T, Hk, D), cos/sin (T, D/2). Half-split RoPE, then RMSNorm over D."""

    def one(x):
        d = x.shape[-1] // 2
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        x1, x2 = x[..., :d], x[..., d:]
        y = torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], dim=-1)
        return torch.nn.functional.rms_norm(y, (y.shape[-1],), eps=eps)

    return one(q), one(k)


def rope_qknorm_floor(B, T, Hq, Hk, D, elem_bytes):
    """Minimum bytes moved (see the module docstring), for the benchmark's GB/s column."""
    n = B * T * (Hq + Hk) * D
    return {"fwd": (2 * n + T * D) * elem_bytes, "fwd+bwd": (5 * n + 2 * T * D) * elem_bytes}


# ---------------------------------------------------------------------------------------------
# Triton kernels. One launch for q and k: a program handles BLOCK_T tokens, loads their cos/sin
# rows once, then walks the Hq heads of q and the Hk heads of k, one (BLOCK_T, D) tile per head.
# A token's rows are found from its flat index r = b*T + t through the tensors' own strides.

# GPU_CONFIGS: tokens per program x warps, from 256 to 4096 elements per tile at D = 128 (4 to 16
# per thread). The interpreter runs the one small config (tests force each GPU config in turn).
GPU_CONFIGS = [
    triton.Config({"BLOCK_T": t}, num_warps=w)
    for t, w in [(2, 1), (4, 2), (8, 2), (8, 4), (16, 4), (32, 8)]
]
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_T": 4}, num_warps=4)]
_CONFIGS = INTERPRETER_CONFIGS if os.environ.get("TRITON_INTERPRET", "0") == "1" else GPU_CONFIGS


@triton.jit
def _token_offsets(r, T, sb, st):
    """Offsets of tokens r = b*T + t of a (B, T, H, D) tensor with strides sb, st (the index math
    in int32, which any real token count fits; the offsets in int64)."""
    return (r // T).to(tl.int64) * sb + (r % T).to(tl.int64) * st


@triton.jit
def _load_halves(ptr, off, cols, sd, HALF: tl.constexpr, mask):
    p = ptr + off[:, None] + cols[None, :] * sd
    return tl.load(p, mask=mask, other=0.0).to(tl.float32), tl.load(
        p + HALF * sd, mask=mask, other=0.0
    ).to(tl.float32)


@triton.jit
def _store_halves(ptr, off, cols, sd, HALF: tl.constexpr, mask, y1, y2):
    p = ptr + off[:, None] + cols[None, :] * sd
    tl.store(p, y1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p + HALF * sd, y2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_heads(
    x_ptr,
    out_ptr,
    rstd_ptr,
    r,
    NT,
    x_tok,
    o_tok,
    H,
    sxh,
    sxd,
    soh,
    sod,
    c,
    s,
    cols,
    mask,
    eps,
    HALF: tl.constexpr,
):
    for h in range(H):
        x1, x2 = _load_halves(x_ptr, x_tok + h * sxh, cols, sxd, HALF, mask)
        y1 = x1 * c + x2 * s
        y2 = x2 * c - x1 * s
        rstd = tl.rsqrt((tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)) / (2 * HALF) + eps)
        _store_halves(
            out_ptr, o_tok + h * soh, cols, sod, HALF, mask, y1 * rstd[:, None], y2 * rstd[:, None]
        )
        tl.store(
            rstd_ptr + r.to(tl.int64) * H + h, rstd, mask=r < NT
        )  # rstd is (B, T, H) contiguous


@triton.jit
def _bwd_heads(
    out_ptr,
    rstd_ptr,
    dout_ptr,
    dx_ptr,
    r,
    NT,
    o_tok,
    g_tok,
    d_tok,
    H,
    soh,
    sod,
    sgh,
    sgd,
    sdh,
    sdd,
    c,
    s,
    cols,
    mask,
    HALF: tl.constexpr,
):
    for h in range(H):
        o1, o2 = _load_halves(out_ptr, o_tok + h * soh, cols, sod, HALF, mask)
        g1, g2 = _load_halves(dout_ptr, g_tok + h * sgh, cols, sgd, HALF, mask)
        rstd = tl.load(rstd_ptr + r.to(tl.int64) * H + h, mask=r < NT, other=0.0)[:, None]
        # RMSNorm backward in terms of its output o = y * rstd, then the rotation transposed
        dot = ((tl.sum(g1 * o1, axis=1) + tl.sum(g2 * o2, axis=1)) / (2 * HALF))[:, None]
        dy1 = rstd * (g1 - o1 * dot)
        dy2 = rstd * (g2 - o2 * dot)
        _store_halves(
            dx_ptr, d_tok + h * sdh, cols, sdd, HALF, mask, dy1 * c - dy2 * s, dy1 * s + dy2 * c
        )


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, r, T, sct, scd, sst, ssd, cols, mask):
    t = (r % T).to(tl.int64)[:, None]
    c = tl.load(cos_ptr + t * sct + cols[None, :] * scd, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * sst + cols[None, :] * ssd, mask=mask, other=0.0).to(tl.float32)
    return c, s


@triton.autotune(configs=_CONFIGS, key=["NT_BUCKET", "HQ", "HK", "HALF"])
@triton.jit
def _rope_qknorm_fwd_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    qo_ptr,
    ko_ptr,
    qr_ptr,
    kr_ptr,
    NT,
    NT_BUCKET,
    T,
    HQ,
    HK,
    eps,  # NT = B*T tokens; NT_BUCKET (next power of 2 of NT) is only the autotune key
    sqb,
    sqt,
    sqh,
    sqd,
    skb,
    skt,
    skh,
    skd,
    sob,
    sot,
    soh,
    sod,
    spb,
    spt,
    sph,
    spd,
    sct,
    scd,
    sst,
    ssd,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (r < NT)[:, None] & (cols < HALF)[None, :]
    c, s = _load_cos_sin(
        cos_ptr, sin_ptr, r, T, sct, scd, sst, ssd, cols, mask
    )  # once for all heads
    _fwd_heads(
        q_ptr,
        qo_ptr,
        qr_ptr,
        r,
        NT,
        _token_offsets(r, T, sqb, sqt),
        _token_offsets(r, T, sob, sot),
        HQ,
        sqh,
        sqd,
        soh,
        sod,
        c,
        s,
        cols,
        mask,
        eps,
        HALF,
    )
    _fwd_heads(
        k_ptr,
        ko_ptr,
        kr_ptr,
        r,
        NT,
        _token_offsets(r, T, skb, skt),
        _token_offsets(r, T, spb, spt),
        HK,
        skh,
        skd,
        sph,
        spd,
        c,
        s,
        cols,
        mask,
        eps,
        HALF,
    )


@triton.autotune(configs=_CONFIGS, key=["NT_BUCKET", "HQ", "HK", "HALF"])
@triton.jit
def _rope_qknorm_bwd_kernel(
    qo_ptr,
    ko_ptr,
    qr_ptr,
    kr_ptr,
    dqo_ptr,
    dko_ptr,
    cos_ptr,
    sin_ptr,
    dq_ptr,
    dk_ptr,
    NT,
    NT_BUCKET,
    T,
    HQ,
    HK,
    s1b,
    s1t,
    s1h,
    s1d,
    s2b,
    s2t,
    s2h,
    s2d,  # q_out, k_out
    s3b,
    s3t,
    s3h,
    s3d,
    s4b,
    s4t,
    s4h,
    s4d,  # dq_out, dk_out
    s5b,
    s5t,
    s5h,
    s5d,
    s6b,
    s6t,
    s6h,
    s6d,  # dq, dk
    sct,
    scd,
    sst,
    ssd,
    HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (r < NT)[:, None] & (cols < HALF)[None, :]
    c, s = _load_cos_sin(cos_ptr, sin_ptr, r, T, sct, scd, sst, ssd, cols, mask)
    _bwd_heads(
        qo_ptr,
        qr_ptr,
        dqo_ptr,
        dq_ptr,
        r,
        NT,
        _token_offsets(r, T, s1b, s1t),
        _token_offsets(r, T, s3b, s3t),
        _token_offsets(r, T, s5b, s5t),
        HQ,
        s1h,
        s1d,
        s3h,
        s3d,
        s5h,
        s5d,
        c,
        s,
        cols,
        mask,
        HALF,
    )
    _bwd_heads(
        ko_ptr,
        kr_ptr,
        dko_ptr,
        dk_ptr,
        r,
        NT,
        _token_offsets(r, T, s2b, s2t),
        _token_offsets(r, T, s4b, s4t),
        _token_offsets(r, T, s6b, s6t),
        HK,
        s2h,
        s2d,
        s4h,
        s4d,
        s6h,
        s6d,
        c,
        s,
        cols,
        mask,
        HALF,
    )


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library custom ops so torch.compile sees opaque, shape-known
# calls (register_fake) and never traces into Triton: no graph break.


def _new(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _grid(NT):
    return lambda meta: (triton.cdiv(NT, meta["BLOCK_T"]),)


@torch.library.custom_op("nanocode::rope_qknorm_fwd", mutates_args=())
def _rope_qknorm_fwd(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q_out, q_rstd, k_out, k_rstd: the fp32 rstd of every row, (B, T, Hq) and (B, T, Hk)."""
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    q_out, k_out = _new(q.shape, q.dtype, q.device), _new(k.shape, k.dtype, k.device)
    q_rstd, k_rstd = (
        _new((B, T, Hq), torch.float32, q.device),
        _new((B, T, Hk), torch.float32, q.device),
    )
    NT = B * T
    if NT > 0:
        _rope_qknorm_fwd_kernel[_grid(NT)](
            q,
            k,
            cos,
            sin,
            q_out,
            k_out,
            q_rstd,
            k_rstd,
            NT,
            triton.next_power_of_2(NT),
            T,
            Hq,
            Hk,
            eps,
            *q.stride(),
            *k.stride(),
            *q_out.stride(),
            *k_out.stride(),
            *cos.stride(),
            *sin.stride(),
            HALF=D // 2,
            BLOCK_D=triton.next_power_of_2(D // 2),
        )
    return q_out, q_rstd, k_out, k_rstd


@_rope_qknorm_fwd.register_fake
def _(q, k, cos, sin, eps):
    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape[:3], dtype=torch.float32),
        k.new_empty(k.shape),
        k.new_empty(k.shape[:3], dtype=torch.float32),
    )


@torch.library.custom_op("nanocode::rope_qknorm_bwd", mutates_args=())
def _rope_qknorm_bwd(
    q_out: torch.Tensor,
    q_rstd: torch.Tensor,
    k_out: torch.Tensor,
    k_rstd: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, Hq, D = q_out.shape
    Hk = k_out.shape[2]
    dq, dk = (
        _new(q_out.shape, q_out.dtype, q_out.device),
        _new(k_out.shape, k_out.dtype, k_out.device),
    )
    NT = B * T
    if NT > 0:
        _rope_qknorm_bwd_kernel[_grid(NT)](
            q_out,
            k_out,
            q_rstd,
            k_rstd,
            dq_out,
            dk_out,
            cos,
            sin,
            dq,
            dk,
            NT,
            triton.next_power_of_2(NT),
            T,
            Hq,
            Hk,
            *q_out.stride(),
            *k_out.stride(),
            *dq_out.stride(),
            *dk_out.stride(),
            *dq.stride(),
            *dk.stride(),
            *cos.stride(),
            *sin.stride(),
            HALF=D // 2,
            BLOCK_D=triton.next_power_of_2(D // 2),
        )
    return dq, dk


@_rope_qknorm_bwd.register_fake
def _(q_out, q_rstd, k_out, k_rstd, cos, sin, dq_out, dk_out):
    return q_out.new_empty(q_out.shape), k_out.new_empty(k_out.shape)


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
        dq, dk = _rope_qknorm_bwd(*ctx.saved_tensors, dq_out, dk_out)
        return dq, dk, None, None, None


def rope_qknorm_triton(q, k, cos, sin, eps=1e-6):
    """The Triton path, whatever the device (the benchmark and tests call it directly)."""
    _check_inputs(q, k, cos, sin)
    check(
        q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1",
        "rope_qknorm",
        f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {q.device}",
    )
    check(
        q.dtype in (torch.float32, torch.float16, torch.bfloat16),
        "rope_qknorm",
        f"the Triton kernel takes float32, float16 or bfloat16, got {q.dtype}",
    )
    return RopeQKNorm.apply(q, k, cos, sin, float(eps))


def _check_inputs(q, k, cos, sin):
    fn = "rope_qknorm"
    check(
        q.ndim == 4 and k.ndim == 4,
        fn,
        f"q and k must be (B, T, H, D), got {tuple(q.shape)} and {tuple(k.shape)}",
    )
    check(q.shape[-1] == k.shape[-1], fn, f"head dims differ: q {q.shape[-1]}, k {k.shape[-1]}")
    check(q.shape[-1] % 2 == 0, fn, f"head dim must be even for half-split RoPE, got {q.shape[-1]}")
    check(
        q.shape[:2] == k.shape[:2],
        fn,
        f"q and k batch/time differ: {tuple(q.shape[:2])} vs {tuple(k.shape[:2])}",
    )
    T, half = q.shape[1], q.shape[-1] // 2
    check(
        cos.shape == (T, half) and sin.shape == (T, half),
        fn,
        f"cos/sin must be (T, D/2) = {(T, half)}, got {tuple(cos.shape)} and {tuple(sin.shape)}",
    )
    check(q.dtype.is_floating_point, fn, f"q must be a floating-point tensor, got {q.dtype}")
    check_same(fn, ("q", q), ("k", k), ("cos", cos), ("sin", sin))


def rope_qknorm(q, k, cos, sin, eps=1e-6):
    """rms_norm(rope(x)) per head for x = q, k. The Triton kernels on CUDA tensors (and on the CPU
    under TRITON_INTERPRET=1), the reference otherwise or with NANOCODE_KERNELS=torch."""
    if use_triton(q, k, cos, sin):
        return rope_qknorm_triton(q, k, cos, sin, eps)
    _check_inputs(q, k, cos, sin)
    return rope_qknorm_reference(q, k, cos, sin, eps)
