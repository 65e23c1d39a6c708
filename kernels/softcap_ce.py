"""Softcapped cross-entropy, and fused linear + softcapped cross-entropy without the logits.

The loss of row i, with logits x (N, V), softcap c and target t_i:

    z = c * tanh(x / c)                     every z lies in [-c, c]
    loss_i = logsumexp(z_i) - z_i[t_i]      0 where t_i == ignore_index
    dloss_i/dx_ij = (softmax(z_i)_j - [j == t_i]) * (1 - tanh(x_ij / c)^2)

softcap_cross_entropy (logits given). One program per row, walking it in BLOCK_V blocks with a
software-pipelined loop (tl.range(num_stages=...): loads of the next blocks are in flight while
one is reduced). Per element, with r = 1 / (e^(2x/c) + 1): tanh(x/c) = 1 - 2r, z = c - 2c·r,
1 - tanh² = 4r(1 - r), exp(z - c) = 2^(-2c·log2(e)·r).
    forward:  lse per row. For c <= FIXED_MAX_SOFTCAP (40) the max is fixed: every z <= c, and
              exp(z - c) >= exp(-2c) >= exp(-80) is a normal fp32 number, so lse = c + log(sum
              exp(z - c)) needs no running max and no rescaling. For larger caps a running max
              per block (an online log-sum-exp). Writes loss and lse (N floats each).
    backward: one pass over the row again, dlogits = dloss_i * (exp(z - lse) - onehot) * 4r(1 - r).
    Reductions are plain PyTorch over the per-row losses: "sum", and "mean" = sum / number of
    non-ignored rows (at least 1, so all rows ignored gives 0 and zero gradients, never NaN).
    A target outside [0, V) that is not ignore_index gives a NaN loss (checking it on the host
    would cost a device sync every step).
Floor, e bytes per logit: forward N*V*e (read once); forward+backward 3*N*V*e (forward read,
    backward read + write). The forward cannot write the gradient here, because dloss is unknown
    then (a per-row gradient written in the forward would need one more read + write to scale).
Special functions: 3 per element per pass (ex2, rcp, ex2; Triton lowers exp2 to ex2.approx.f32
    and fp32 division to div.full.f32, one MUFU op each), ~8 FMA-pipe ops beside them. MUFU
    issues 16 ops/clk/SM (CUDA guide, cc 9.0): 132 SMs x 16 x ~1.8 GHz = ~3.8e12/s on H100 SXM
    and on H200 (same GH100 chip and clocks). Worked numbers at N = 65,536, V = 32,768 (2^31
    elements), bf16 (4.29 GB of logits):
                  SFU (3 ops/elem/pass)   H100 bytes (3.35 TB/s)   H200 bytes (4.8 TB/s)
    forward       1.7 ms                  1.28 ms                  0.89 ms     -> SFU-bound on both
    backward      1.7 ms                  2.56 ms                  1.79 ms     -> bandwidth-bound
    fwd+bwd       ~4.3 ms on H100, ~3.5 ms on H200 (each pass at its own bound).
    So the forward's floor on both GPUs is the SFU, not the bytes; the benchmark's GB/s column
    counts bytes only, so the forward cannot show 100% of copy bandwidth.

linear_softcap_cross_entropy (x (N, C), weight (V, C); logits = x @ weight.T never exist in full).
    Rows are processed in equal chunks of R rows, R*V*e <= CHUNK_BYTES (512 MiB), fewer where
    free memory is short (_chunk_rows): per chunk, a cuBLAS matmul makes the chunk's logits, one
    CE kernel computes loss and lse and overwrites the logits in place with the gradient of the
    summed loss (two walks over each row, the second straight after the first, so it is served
    from L2: ~500 rows of 64 KB in flight on 132 SMs, 33 MB < 50 MB of L2), and two matmuls give
    dx_chunk = dlogits @ weight and dW += dlogits.T @ x_chunk, accumulated in place in fp32
    (addmm with out_dtype: cuBLAS adds its fp32 accumulator to dW, no (V, C) temporary). For
    "mean" and "sum" all of this happens in the forward (the output gradient is a scalar, applied
    in the backward to dx and dW: no second pass over the logits); for "none" the forward keeps
    only lse, and the backward recomputes each chunk's logits (one more matmul) and runs the
    separate backward kernel with the per-row output gradient. Extra memory: one chunk of
    logits, dW in fp32 (V*C*4), dx: at N = 65,536, V = 32,768, C = 768, bf16, that is
    512 MiB + 96 MiB + 96 MiB ~ 0.7 GiB, where eager holds the bf16 logits (4 GiB) and several
    fp32 copies of them (8 GiB each).
    CE kernel per chunk: one HBM read + one write of the logits (2*R*V*e; the split kernels
    moved 3*R*V*e) and 6 special-function ops per element (3 per walk): over all chunks at the
    worked shape 3.4 ms of SFU vs 2.56 ms (H100) / 1.79 ms (H200) of bytes, so this kernel is
    SFU-bound; it still replaces ~4.3 / 3.5 ms of split kernels.
Floor (compute-bound): forward+backward 6*N*V*C FLOPs (logits, dx, dW), plus the CE kernel
    above. Worked numbers at N = 65,536, V = 32,768, bf16: C = 768: 9.90 TFLOP (~12.4 ms at
    800 TFLOP/s) + ~3.4 ms; C = 1280: 16.5 TFLOP (~20.6 ms) + ~3.4 ms. The eager path (matmul,
    then float softcap and cross-entropy) does the same FLOPs and moves several fp32 copies of
    the logits.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels.common import autotune_configs, check, check_same, check_triton, empty, use_triton

CHUNK_BYTES = 512 << 20  # linear_softcap_cross_entropy: most bytes of one chunk of logits


def softcap_cross_entropy_reference(
    logits, targets, softcap=15.0, ignore_index=-1, reduction="mean"
):
    """The loss in plain PyTorch: logits (N, V), targets (N,); softcap and cross-entropy in fp32,
    then _reduce. Its backward is autograd's, through the fp32 (N, V) copies."""
    z = softcap * torch.tanh(logits.float() / softcap)
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")  # 0 if ignored
    # _reduce's mean over zero non-ignored rows is 0 (and so are its gradients), where
    # F.cross_entropy's is NaN
    return _reduce(loss, targets, ignore_index, reduction)


def linear_softcap_cross_entropy_reference(
    x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean"
):
    return softcap_cross_entropy_reference(x @ weight.T, targets, softcap, ignore_index, reduction)


def softcap_cross_entropy_floor(N, V, elem_bytes):
    """Minimum bytes moved (see the module docstring), for the benchmark's GB/s column."""
    return {"fwd": N * V * elem_bytes, "fwd+bwd": 3 * N * V * elem_bytes}


def linear_softcap_cross_entropy_floor(N, V, C):
    """Minimum FLOPs of forward+backward (see the module docstring), for the TFLOP/s column."""
    return {"fwd+bwd": 6 * N * V * C}


# ---------------------------------------------------------------------------------------------
# Triton kernels. One program per row of logits; the row is walked in BLOCK_V blocks by a
# software-pipelined tl.range loop (a plain range pipelines only loads that feed tl.dot).

_LOG2E = tl.constexpr(1.4426950408889634)
FIXED_MAX_SOFTCAP = 40.0  # up to here exp(z - softcap) >= exp(-80) is a normal fp32 number

# GPU_CONFIGS: autotuned once per (V, dtype, path); more warps per row suit Hopper's long rows.
# (4096, 8 warps) has 4 stages: with 3 its gradient kernel spilled 8 B on sm_80 (static check).
# The interpreter runs the one small config (tests force each GPU config in turn).
GPU_CONFIGS = [
    triton.Config({"BLOCK_V": bv, "NUM_STAGES": st}, num_warps=w)
    for bv, w, st in [
        (1024, 4, 4),
        (2048, 8, 4),
        (4096, 8, 4),
        (4096, 16, 3),
        (8192, 16, 2),
        (8192, 32, 2),
    ]
]
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_V": 1024, "NUM_STAGES": 2}, num_warps=4)]
CONFIGS = autotune_configs(GPU_CONFIGS, INTERPRETER_CONFIGS)


@triton.jit
def _softcap_r(x, softcap):
    """r = 1 / (e^(2x/c) + 1), from which tanh(x/c) = 1 - 2r, z = c - 2c·r, 1 - tanh² = 4r(1 - r):
    one ex2 and one reciprocal per element, exact at both tails (e = inf gives r = 0, z = c;
    e = 0 gives r = 1, z = -c); 4r(1 - r) keeps full relative precision where tanh -> ±1."""
    e = tl.exp2(x * (2.0 * _LOG2E / softcap))  # one scalar division, not one per element
    return 1.0 / (e + 1.0)


@triton.jit
def _row_lse(
    base, V, softcap, FIXED_MAX: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr
):
    """log-sum-exp of z over one row, per-lane fp32 sums (3 special-function ops per element)."""
    s = tl.zeros([BLOCK_V], tl.float32)
    if FIXED_MAX:
        # Every z <= c, so c is a valid max: s = sum exp(z - c) = sum 2^(-2c·log2(e)·r), no running
        # max, no rescaling; exp(z - c) >= exp(-2c) stays a normal fp32 number (FIXED_MAX_SOFTCAP).
        for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
            cols = start + tl.arange(0, BLOCK_V)
            r = _softcap_r(tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32), softcap)
            s += tl.where(cols < V, tl.exp2(r * (-2.0 * _LOG2E * softcap)), 0.0)
        lse = softcap + tl.log(tl.sum(s, axis=0))
    else:
        # Online log-sum-exp for large caps: the running max m of the row so far (one number per
        # block, so still one exp per element). z >= -c, so -c is a finite start (no inf - inf).
        m = -softcap
        for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
            cols = start + tl.arange(0, BLOCK_V)
            r = _softcap_r(tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32), softcap)
            z = tl.where(cols < V, softcap - 2.0 * softcap * r, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp2((m - m_new) * _LOG2E) + tl.exp2((z - m_new) * _LOG2E)
            m = m_new
        lse = m + tl.log(tl.sum(s, axis=0))
    return lse


@triton.jit
def _row_loss(base, target, lse, V, softcap):
    """lse - z[target]; NaN for a target outside [0, V) (not checked on the host: no sync)."""
    in_range = (target >= 0) & (target < V)
    r_t = _softcap_r(tl.load(base + tl.where(in_range, target, 0)).to(tl.float32), softcap)
    return tl.where(in_range, lse - (softcap - 2.0 * softcap * r_t), float("nan"))


@triton.jit
def _row_grad(
    base, dbase, V, target, lse, scale, softcap, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr
):
    """dlogits = scale * (softmax(z) - onehot) * (1 - tanh²), written block by block; each block is
    read before it is written, so dbase may be base (in place). 3 special-function ops per element:
    p = exp(z - lse) = 2^(log2(e)·(c - lse) - 2c·log2(e)·r)."""
    offset = (softcap - lse) * _LOG2E
    for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
        cols = start + tl.arange(0, BLOCK_V)
        r = _softcap_r(tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32), softcap)
        p = tl.exp2(offset + r * (-2.0 * _LOG2E * softcap))
        d = tl.where(cols == target, p - 1.0, p) * (4.0 * scale * r * (1.0 - r))
        tl.store(dbase + cols, d.to(dbase.dtype.element_ty), mask=cols < V)


FWD, FWD_GRAD, BWD = 0, 1, 2  # what _ce_rows computes (its MODE)


@triton.jit
def _ce_rows(
    logits_ptr,
    targets_ptr,
    loss_ptr,
    lse_ptr,
    dloss_ptr,
    dlogits_ptr,
    strides,  # of a row of logits, of dloss (0 for a broadcast scalar), of a row of dlogits
    V,
    softcap,
    ignore_index,
    MODE: tl.constexpr,
    FIXED_MAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """One row: FWD, its loss and lse; FWD_GRAD, also the gradient of its loss in the same launch
    (the second walk over the row follows the first at once, so it reads the row from L2, not
    HBM); BWD, the gradient scaled by dloss, from the saved lse. dlogits may be logits."""
    row = tl.program_id(0).to(tl.int64)
    base, dbase = logits_ptr + row * strides[0], dlogits_ptr + row * strides[2]
    target = tl.load(targets_ptr + row).to(tl.int64)
    if MODE == 2:  # ignored rows: scale 0, and lse = c keeps every p <= 1 (no inf * 0)
        lse = tl.where(target == ignore_index, softcap, tl.load(lse_ptr + row))
        scale = tl.load(dloss_ptr + row * strides[1]).to(tl.float32)
        scale = tl.where(target == ignore_index, 0.0, scale)
        _row_grad(base, dbase, V, target, lse, scale, softcap, BLOCK_V, NUM_STAGES)
        return
    if target == ignore_index:  # loss 0; with the gradient, a row of zeros (written, not read)
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if MODE == 1:
            for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
                cols = start + tl.arange(0, BLOCK_V)
                zeros = tl.zeros([BLOCK_V], dtype=dbase.dtype.element_ty)
                tl.store(dbase + cols, zeros, mask=cols < V)
        return
    lse = _row_lse(base, V, softcap, FIXED_MAX, BLOCK_V, NUM_STAGES)
    tl.store(loss_ptr + row, _row_loss(base, target, lse, V, softcap))
    tl.store(lse_ptr + row, lse)
    if MODE == 1:
        _row_grad(base, dbase, V, target, lse, 1.0, softcap, BLOCK_V, NUM_STAGES)


# Two autotuned kernels of one function: the one that writes gradients (in place, over the
# logits, in the fused linear loss) restores the logits between tuning runs (restore_value),
# which the plain forward never needs.
_ce_kernel = triton.autotune(key=["V", "FIXED_MAX"], **CONFIGS)(_ce_rows)
_ce_grad_kernel = triton.autotune(
    key=["V", "FIXED_MAX", "MODE"], restore_value=["logits_ptr"], **CONFIGS
)(_ce_rows)


def _launch_ce(
    mode, logits, targets, lse, softcap, ignore_index, loss=None, dloss=None, dlogits=None
):
    """Over the rows of logits (N, V): FWD fills loss and lse ((N,) fp32); FWD_GRAD also writes
    the gradient of loss.sum() to dlogits; BWD writes dlogits from lse and the per-row output
    gradient dloss. Arguments a mode does not use stand in as logits."""
    N, V = logits.shape
    loss, dloss, dlogits = (logits if t is None else t for t in (loss, dloss, dlogits))
    strides = (logits.stride(0), dloss.stride(0), dlogits.stride(0))
    args = (logits, targets, loss, lse, dloss, dlogits, strides, V, softcap, ignore_index)
    if N > 0:
        kernel = _ce_kernel if mode == FWD else _ce_grad_kernel
        kernel[(N,)](*args, MODE=mode, FIXED_MAX=softcap <= FIXED_MAX_SOFTCAP)


# ---------------------------------------------------------------------------------------------
# softcap_cross_entropy: custom ops (opaque to torch.compile, shapes from register_fake) wired
# into autograd by a torch.autograd.Function; the reduction is ordinary differentiable PyTorch.


@torch.library.custom_op("nanocode::softcap_ce_fwd", mutates_args=())
def _softcap_ce_fwd(
    logits: Tensor, targets: Tensor, softcap: float, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """-> per-row loss and lse, (N,) fp32 each, for logits (N, V) with unit column stride."""
    loss, lse = (empty(logits.shape[:1], torch.float32, logits.device) for _ in range(2))
    _launch_ce(FWD, logits, targets, lse, softcap, ignore_index, loss=loss)
    return loss, lse


@_softcap_ce_fwd.register_fake
def _(logits, targets, softcap, ignore_index):
    return tuple(logits.new_empty(logits.shape[:1], dtype=torch.float32) for _ in range(2))


@torch.library.custom_op("nanocode::softcap_ce_bwd", mutates_args=())
def _softcap_ce_bwd(
    logits: Tensor, targets: Tensor, lse: Tensor, dloss: Tensor, softcap: float, ignore_index: int
) -> Tensor:
    """-> dlogits (N, V) in logits' dtype, from the forward's lse and the per-row output gradient
    dloss (N,) (any stride: a sum's gradient arrives expanded, stride 0)."""
    dlogits = empty(logits.shape, logits.dtype, logits.device)
    _launch_ce(BWD, logits, targets, lse, softcap, ignore_index, dloss=dloss, dlogits=dlogits)
    return dlogits


@_softcap_ce_bwd.register_fake
def _(logits, targets, lse, dloss, softcap, ignore_index):
    return torch.empty_like(logits)


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row losses (N,) fp32, differentiable in logits."""

    @staticmethod
    def forward(ctx, logits, targets, softcap, ignore_index):
        loss, lse = _softcap_ce_fwd(logits, targets, softcap, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.softcap, ctx.ignore_index = softcap, ignore_index
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        dlogits = _softcap_ce_bwd(logits, targets, lse, dloss, ctx.softcap, ctx.ignore_index)
        return dlogits, None, None, None


def _reduce(loss, targets, ignore_index, reduction):
    """Per-row losses (N,) -> "none": as they are; "sum"; "mean": the sum over the count of
    non-ignored rows, at least 1 (so a batch of ignored rows gives 0, never NaN)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum().clamp(min=1)


def _check_common(fn, targets, N, softcap, reduction, device):
    """The checks both losses share: targets (N,) int64 or int32 on `device`, softcap > 0, a known
    reduction."""
    check(targets.shape == (N,), fn, f"targets must be (N,) = ({N},), got {tuple(targets.shape)}")
    ints = targets.dtype in (torch.int64, torch.int32)
    check(ints, fn, f"targets must be int64 or int32, got {targets.dtype}")
    check(targets.device == device, fn, f"targets are on {targets.device}, the inputs on {device}")
    check(softcap > 0, fn, f"softcap must be > 0, got {softcap}")
    reductions = ("mean", "sum", "none")
    check(reduction in reductions, fn, f"reduction must be one of {reductions}, got {reduction!r}")


def _check_ce(logits, targets, softcap, reduction):
    fn = "softcap_cross_entropy"
    check(logits.ndim == 2, fn, f"logits must be (N, V), got {tuple(logits.shape)}")
    check(logits.dtype.is_floating_point, fn, f"logits must be floating point, got {logits.dtype}")
    _check_common(fn, targets, logits.shape[0], softcap, reduction, logits.device)


def softcap_cross_entropy_triton(logits, targets, softcap=15.0, ignore_index=-1, reduction="mean"):
    """The Triton path, whatever the device (the benchmark and tests call it directly)."""
    _check_ce(logits, targets, softcap, reduction)
    check_triton("softcap_cross_entropy", logits)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    args = (targets.contiguous(), float(softcap), int(ignore_index))
    loss = SoftcapCrossEntropy.apply(logits, *args)
    return _reduce(loss, targets, ignore_index, reduction)


def softcap_cross_entropy(logits, targets, softcap=15.0, ignore_index=-1, reduction="mean"):
    """Cross-entropy of softcap * tanh(logits / softcap), logits (N, V), targets (N,); rows whose
    target is ignore_index count 0. The Triton kernels on CUDA tensors (and on the CPU under
    TRITON_INTERPRET=1), the reference otherwise or with NANOCODE_KERNELS=torch."""
    if use_triton(logits, targets):
        return softcap_cross_entropy_triton(logits, targets, softcap, ignore_index, reduction)
    _check_ce(logits, targets, softcap, reduction)
    return softcap_cross_entropy_reference(logits, targets, softcap, ignore_index, reduction)


# ---------------------------------------------------------------------------------------------
# linear_softcap_cross_entropy: the chunk loop (module docstring), custom ops, autograd.Function.


def _free_bytes(device):
    """Memory this process could still allocate on a CUDA device: the driver's free memory plus
    what PyTorch's caching allocator holds unused. None on the CPU (no budget but CHUNK_BYTES)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _chunk_rows(N, V, C, elem_bytes, free_bytes):
    """Rows per chunk. The chunk's logits get CHUNK_BYTES, or less where free memory is short: at
    most a quarter of what is left after dW (V*C fp32) and dx (N*C); the N rows are then split
    into equal chunks (no small remainder chunk), whole 128-row matmul tiles when large. Above
    ~1k rows the three matmuls per chunk run at full rate, so a larger budget buys little."""
    budget = CHUNK_BYTES
    if free_bytes is not None:
        budget = min(budget, (free_bytes - V * C * 4 - N * C * elem_bytes) // 4)
    rows = max(1, min(N, budget // (V * elem_bytes)))
    rows = -(-N // -(-N // rows))  # N split into ceil(N / rows) equal chunks
    return -(-rows // 128) * 128 if rows >= 256 else rows


def _accumulate_dw(dw, dlogits, x):
    """dw += dlogitsᵀ @ x in fp32 without a (V, C) temporary: on CUDA cuBLAS adds its fp32
    accumulator to dw in place (addmm with out_dtype, fp16/bf16 inputs); on the CPU (interpreter
    tests) the inputs are cast to fp32 instead (a chunk-sized temporary)."""
    if dlogits.is_cuda and dlogits.dtype != torch.float32:
        torch.addmm(dw, dlogits.T, x, out_dtype=torch.float32, out=dw)
    else:
        dw.addmm_(dlogits.T.float(), x.float())


def _linear_ce_chunks(
    x, weight, targets, softcap, ignore_index, lse, loss=None, grad=False, dloss=None
):
    """Walk the rows of x in chunks. With loss given: fill loss and lse (forward); with grad too,
    also return dx (x's dtype) and dW (fp32) of loss.sum(), from one CE kernel per chunk that
    writes the gradient over the chunk's logits in the pass that computes the loss. With dloss
    ((N,), per-row output gradient) instead: the backward, reusing lse; returns dx and dW."""
    N, C, V = x.shape[0], x.shape[1], weight.shape[0]
    grad = grad or dloss is not None
    rows = _chunk_rows(N, V, C, x.element_size(), _free_bytes(x.device))
    dx = empty(x.shape, x.dtype, x.device) if grad else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grad else None
    mode = BWD if loss is None else FWD_GRAD if grad else FWD
    for s in range(0, N, rows):
        chunk = slice(s, s + rows)
        logits = x[chunk] @ weight.T  # with grad, the CE kernel overwrites it with its gradient
        per_row = dict(dloss=dloss[chunk]) if mode == BWD else dict(loss=loss[chunk])
        args = (logits, targets[chunk], lse[chunk], softcap, ignore_index)
        _launch_ce(mode, *args, dlogits=logits, **per_row)
        if grad:
            torch.mm(logits, weight, out=dx[chunk])
            _accumulate_dw(dw, logits, x[chunk])
    return dx, dw


@torch.library.custom_op("nanocode::linear_softcap_ce_fwd", mutates_args=())
def _linear_ce_fwd(
    x: Tensor, weight: Tensor, targets: Tensor, softcap: float, ignore_index: int, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> per-row loss (N,) fp32, lse (N,) fp32, and with_grad: dx (N, C) and dW (V, C) fp32 of the
    sum of the losses (else two empty tensors)."""
    loss, lse = (empty(x.shape[:1], torch.float32, x.device) for _ in range(2))
    dx, dw = _linear_ce_chunks(x, weight, targets, softcap, ignore_index, lse, loss, with_grad)
    if not with_grad:
        dx, dw = x.new_empty(0), x.new_empty(0, dtype=torch.float32)
    return loss, lse, dx, dw


@_linear_ce_fwd.register_fake
def _(x, weight, targets, softcap, ignore_index, with_grad):
    loss, lse = (x.new_empty(x.shape[:1], dtype=torch.float32) for _ in range(2))
    dx = x.new_empty(x.shape if with_grad else 0)
    return loss, lse, dx, weight.new_empty(weight.shape if with_grad else 0, dtype=torch.float32)


@torch.library.custom_op("nanocode::linear_softcap_ce_bwd", mutates_args=())
def _linear_ce_bwd(
    saved: list[Tensor], dloss: Tensor, softcap: float, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """saved: x, weight, targets, lse."""
    x, weight, targets, lse = saved
    dx, dw = _linear_ce_chunks(x, weight, targets, softcap, ignore_index, lse, dloss=dloss)
    return dx, dw.to(weight.dtype)


@_linear_ce_bwd.register_fake
def _(saved, dloss, softcap, ignore_index):
    return torch.empty_like(saved[0]), torch.empty_like(saved[1])


class LinearSoftcapCrossEntropy(torch.autograd.Function):
    """Reduced loss ("mean", "sum": 0-d; "none": (N,)) fp32, differentiable in x and weight."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, ignore_index, reduction, with_grad):
        """With grad and "mean" or "sum", dx and dW of the summed loss are made in this pass and
        saved (the backward only scales them); with "none" the backward recomputes the logits
        from the saved x, weight and lse. Without grad nothing is saved."""
        pre = with_grad and reduction != "none"  # gradients made now, scaled in backward
        loss, lse, dx, dw = _linear_ce_fwd(x, weight, targets, softcap, ignore_index, pre)
        ctx.args = (softcap, ignore_index, reduction, with_grad, weight.dtype)
        if pre:
            ctx.save_for_backward(dx, dw, targets)
        elif with_grad:
            ctx.save_for_backward(x, weight, targets, lse)
        return _reduce(loss, targets, ignore_index, reduction)

    @staticmethod
    def backward(ctx, dloss):
        """dloss 0-d ("mean", "sum"): the saved dx and dW times dloss (over the count of
        non-ignored rows for "mean"); dloss (N,) ("none"): the chunk loop again. -> dx in x's
        dtype, dW in weight's, None for the other arguments."""
        softcap, ignore_index, reduction, with_grad, w_dtype = ctx.args
        why = "backward called but the forward ran without grad"
        check(with_grad, "linear_softcap_cross_entropy", why)
        if reduction == "none":
            dx, dw = _linear_ce_bwd(list(ctx.saved_tensors), dloss, softcap, ignore_index)
        else:
            dx, dw, targets = ctx.saved_tensors
            scale = dloss.float()
            if reduction == "mean":
                scale = scale / (targets != ignore_index).sum().clamp(min=1)
            dx, dw = dx * scale, (dw * scale).to(w_dtype)
        return dx, dw, None, None, None, None, None


def _check_linear(x, weight, targets, softcap, reduction):
    """Both paths' checks: x (N, C) and weight (V, C) on one device in one floating dtype, then
    _check_common's."""
    fn = "linear_softcap_cross_entropy"
    shapes = f"{tuple(x.shape)}, {tuple(weight.shape)}"
    check(x.ndim == 2 and weight.ndim == 2, fn, f"x must be (N, C), weight (V, C), got {shapes}")
    features = f"x has {x.shape[1]} features, weight {weight.shape[1]}"
    check(x.shape[1] == weight.shape[1], fn, features)
    check(x.dtype.is_floating_point, fn, f"x must be floating point, got {x.dtype}")
    check_same(fn, ("x", x), ("weight", weight))
    _check_common(fn, targets, x.shape[0], softcap, reduction, x.device)


def linear_softcap_cross_entropy_triton(
    x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean"
):
    """The Triton path, whatever the device (the benchmark and tests call it directly)."""
    _check_linear(x, weight, targets, softcap, reduction)
    check_triton("linear_softcap_cross_entropy", x)
    with_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    args = (float(softcap), int(ignore_index), reduction, with_grad)
    inputs = (x.contiguous(), weight.contiguous(), targets.contiguous())
    return LinearSoftcapCrossEntropy.apply(*inputs, *args)


def linear_softcap_cross_entropy(
    x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean"
):
    """softcap_cross_entropy(x @ weight.T, targets, ...) for x (N, C), weight (V, C). The Triton
    path (which never holds all N x V logits: see the module docstring) on CUDA tensors (and on
    the CPU under TRITON_INTERPRET=1), the reference otherwise or with NANOCODE_KERNELS=torch."""
    args = (x, weight, targets, softcap, ignore_index, reduction)
    if use_triton(x, weight, targets):
        return linear_softcap_cross_entropy_triton(*args)
    _check_linear(x, weight, targets, softcap, reduction)
    return linear_softcap_cross_entropy_reference(*args)
