"""FP8 matmuls with tensorwise dynamic scaling: y = x @ w.T through torch._scaled_mm.

A linear layer does three matmuls; each runs on FP8 operands with fp32 accumulation:

    forward:  y  = x  @ w      x, w in e4m3 (3 mantissa bits, max 448)
    backward: dx = dy @ w      dy in e5m2 (2 mantissa bits, max 57344: gradients span more range)
              dw = dy.T @ x

Tensorwise scaling: each operand is multiplied by s = FP8_MAX / max|t| before the cast, so its
largest element lands on the format's largest finite value and nothing overflows whatever the
magnitude; _scaled_mm multiplies the product back by the two inverse scales. amax and s stay
on the device (no host sync). The forward saves the FP8 copies of x and w for the backward (1
byte per element instead of 2 or 4); parameters keep their dtype and get gradients in it, so an
optimizer and DDP see an ordinary fp32 (or bf16) parameter: only the matmul is FP8.

Layout rules of cuBLAS's FP8 GEMM (which _scaled_mm checks on CUDA): the first operand row-major,
the second column-major, the second's both dims and the shared dim multiples of 16. Every call
below builds its operands that way on every device, so the code the CPU tests run is the code an
H100 runs. Weights (N, K) must have N and K multiples of 16 (else a ValueError); the token count
M may be anything: dw's shared dim is M, so the backward pads it with zero rows to a multiple of
16 (zeros add nothing to the sum).

The CPU runs _scaled_mm too (torch 2.15: e4m3 and e5m2 operands in any pairing, fp32 scalar
scales, fp32/bf16/fp16 output), slowly: that is how CI tests this file.
"""

import torch
import torch.nn.functional as F

import kernels.relu2_mlp  # noqa: F401 (registers the fused kernel's custom ops)
from kernels.common import use_triton
from nanocode.common import compute_dtype

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_supported(device) -> tuple[bool, str]:
    """Whether `device` can run FP8 matmuls, and why (a message base_train can print)."""
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if torch.version.hip or cap < (8, 9):
            gpu = "ROCm" if torch.version.hip else f"CUDA capability {cap[0]}.{cap[1]}"
            return False, f"FP8 matmuls need an NVIDIA GPU of CUDA capability 8.9+, not {gpu}"
    elif device.type != "cpu":
        return False, f"torch._scaled_mm has no FP8 matmul on {device.type}"
    try:  # the build itself may lack the kernel: try one tiny product
        probe, one = torch.zeros(16, 16, device=device, dtype=E4M3), torch.ones((), device=device)
        torch._scaled_mm(probe, probe.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except RuntimeError as err:
        return False, f"torch._scaled_mm failed on {device}: {err}"
    return True, "FP8 matmuls run" + (" (slowly, on the CPU)" if device.type == "cpu" else "")


def quantize(t, dtype):
    """(t8, inv): t8 = round(t * s) in `dtype`, row-major, with s = max / amax(t) in fp32, and
    inv = 1 / s, so t ≈ t8 * inv. An all-zero t gives zeros (amax is clamped: no inf, no NaN)."""
    fp8_max = torch.finfo(dtype).max
    amax = t.detach().abs().amax().double()  # fp64 so eager and Inductor round s alike
    scale = (fp8_max / amax.clamp(min=1e-30)).float()
    # clamp: t * s may land a hair above max, and the cast does not saturate everywhere
    t8 = (t.detach().float() * scale).clamp(-fp8_max, fp8_max).to(dtype).contiguous()
    return t8, scale.reciprocal()


def _scaled_mm(a8, b8, inv_a, inv_b, dtype, fast=False):
    """a8 @ b8 (a8 row-major, b8 column-major) times both inverse scales, in `dtype`."""
    # Autocast off: the CPU kernel dequantizes and calls mm, which autocast would run in bf16
    # (bf16-rounded operands: errors of 2^-8 of sum |a b| instead of one output rounding).
    with torch.autocast(a8.device.type, enabled=False):
        return torch._scaled_mm(
            a8, b8, scale_a=inv_a, scale_b=inv_b, out_dtype=dtype, use_fast_accum=fast
        )


class FP8Matmul(torch.autograd.Function):
    """y = x @ w.T in `out_dtype` for 2-D x (M, K), w (N, K); the backward gives dx in x's
    dtype and dw in w's."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        """x and w quantized to e4m3, one scale each; their FP8 copies and inverse scales are
        saved for the backward."""
        x8, inv_x = quantize(x, E4M3)
        w8, inv_w = quantize(w, E4M3)
        ctx.save_for_backward(x8, w8, inv_x, inv_w)
        ctx.dtypes = x.dtype, w.dtype
        # w8 (N, K) row-major, so w8.t() is column-major: no copy. Fast accumulation (cuBLAS
        # folds partial sums into fp32 less often) in the forward only, as torchao does.
        return _scaled_mm(x8, w8.t(), inv_x, inv_w, out_dtype, fast=True)

    @staticmethod
    def backward(ctx, dy):
        x8, w8, inv_x, inv_w = ctx.saved_tensors
        dx, dw = _linear_grads(*quantize(dy, E5M2), x8, inv_x, w8, inv_w, *_wanted(ctx))
        return dx, dw, None


def _wanted(ctx):
    """Per input, the dtype its gradient comes in, or None where none is needed."""
    return [dt if need else None for dt, need in zip(ctx.dtypes, ctx.needs_input_grad)]


def _linear_grads(dy8, inv_dy, x8, inv_x, w8, inv_w, dx_dtype, dw_dtype):
    """dx = dy @ w and dw = dy.T @ x of y = x @ w.T from FP8 operands, in the given dtypes
    (None: not needed)."""
    dx = dw = None
    if dx_dtype:  # (M, N) @ (N, K): w8 as a column-major (N, K)
        dx = _scaled_mm(dy8, w8.t().contiguous().t(), inv_dy, inv_w, dx_dtype)
    if dw_dtype:  # (N, M) @ (M, K), the shared dim M padded to 16
        if pad := -dy8.size(0) % 16:
            dy8, x8 = F.pad(dy8, (0, 0, 0, pad)), F.pad(x8, (0, 0, 0, pad))
        dw = _scaled_mm(dy8.t().contiguous(), x8.t().contiguous().t(), inv_dy, inv_x, dw_dtype)
    return dx, dw


class FP8Relu2MLP(torch.autograd.Function):
    """relu(x @ w_fc.T)² @ w_proj.T with its six matmuls in FP8: the two that carry relu² and its
    derivative in their epilogue on the fused Triton kernel (kernels/relu2_mlp.py, FP8 tiles),
    the other four on _scaled_mm, as FP8Matmul runs them. Saves x, w_fc, w_proj and h = relu(z)²
    in FP8, and h in out_dtype too: relu²'s derivative 2*sqrt(h) from it is as exact as in the
    bf16 kernel (from h's e4m3 copy it would carry 2^-5 relative errors)."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj, out_dtype):
        """x (M, C) -> (M, C) in out_dtype: h (M, H) = relu(x8 @ fc8.T)² by the fused kernel in
        out_dtype, then quantized again to e4m3 for h8 @ proj8.T on _scaled_mm."""
        x8, inv_x = quantize(x, E4M3)
        fc8, inv_fc = quantize(w_fc, E4M3)
        h = torch.ops.nanocode.matmul_relu2(x8, fc8, inv_x * inv_fc, out_dtype)
        h8, inv_h = quantize(h, E4M3)
        proj8, inv_proj = quantize(w_proj, E4M3)
        ctx.save_for_backward(x8, fc8, h, h8, proj8, inv_x, inv_fc, inv_h, inv_proj)
        ctx.dtypes = x.dtype, w_fc.dtype, w_proj.dtype
        return _scaled_mm(h8, proj8.t(), inv_h, inv_proj, out_dtype, fast=True)

    @staticmethod
    def backward(ctx, dy):
        """dy quantized to e5m2; dz = (dy @ w_proj) * 2*sqrt(h) by the fused kernel (from h in
        out_dtype), dw_proj = dy.T @ h8; dz quantized to e5m2 gives dx and dw_fc. Gradients in
        the inputs' dtypes, None where not needed."""
        x8, fc8, h, h8, proj8, inv_x, inv_fc, inv_h, inv_proj = ctx.saved_tensors
        dy8, inv_dy = quantize(dy, E5M2)
        # the kernel reads w_proj K-major: a (C, H) view of an (H, C) row-major copy
        kmajor = proj8.t().contiguous().t()
        dz = torch.ops.nanocode.matmul_relu2_grad(dy8, kmajor, h, inv_dy * inv_proj)
        dx_dtype, fc_dtype, proj_dtype = _wanted(ctx)
        _, dw_proj = _linear_grads(dy8, inv_dy, h8, inv_h, proj8, inv_proj, None, proj_dtype)
        dz8, inv_dz = quantize(dz, E5M2)
        dx, dw_fc = _linear_grads(dz8, inv_dz, x8, inv_x, fc8, inv_fc, dx_dtype, fc_dtype)
        return dx, dw_fc, dw_proj, None


def _check(fn, x_shape, weight):
    """Raise ValueError unless weight is (N, K) with N and K multiples of 16 (cuBLAS's FP8 GEMM)
    and x_shape ends in K. fp8_relu2_mlp checks w_proj with (H,) as x_shape."""
    K = x_shape[-1]
    if weight.dim() != 2 or weight.size(1) != K or weight.size(0) % 16 or K % 16:
        raise ValueError(
            f"{fn}: needs weight (N, K) with N and K multiples of 16 (cuBLAS FP8) and x "
            f"(..., K); got x {tuple(x_shape)}, weight {tuple(weight.shape)}"
        )


def fp8_linear(x, weight):
    """F.linear(x, weight) (no bias) with the matmuls in FP8, for x (..., K), weight (N, K),
    N and K multiples of 16. The output is in the autocast dtype when autocast is on, else in
    x's dtype; the weight is read in its own dtype (no bf16 copy first)."""
    _check("fp8_linear", x.shape, weight)
    (N, K) = weight.shape
    y = FP8Matmul.apply(x.reshape(-1, K), weight, compute_dtype(x))
    return y.view(*x.shape[:-1], N)


def fp8_relu2_mlp(x, w_fc, w_proj):
    """relu(x @ w_fc.T)² @ w_proj.T with every matmul in FP8, for x (..., C), w_fc (H, C),
    w_proj (C, H), C and H multiples of 16; dtypes as fp8_linear's. The fused Triton kernel
    where kernels run Triton (kernels.common.use_triton), else fp8_relu2_mlp_unfused."""
    if not use_triton(x, w_fc, w_proj):
        return fp8_relu2_mlp_unfused(x, w_fc, w_proj)
    _check("fp8_relu2_mlp", x.shape, w_fc)
    _check("fp8_relu2_mlp", w_fc.shape[:1], w_proj)
    y = FP8Relu2MLP.apply(x.reshape(-1, x.size(-1)), w_fc, w_proj, compute_dtype(x))
    return y.view(x.shape)


def fp8_relu2_mlp_unfused(x, w_fc, w_proj):
    """The same FP8 math without the kernel: _scaled_mm, relu² in PyTorch, _scaled_mm."""
    return fp8_linear(fp8_linear(x, w_fc).relu().square(), w_proj)
