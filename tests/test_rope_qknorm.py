"""Fused RoPE + QK-norm: the Triton kernel (the interpreter on CPU) against the float64 reference.

Fresh random inputs every run. Tolerances follow from the dtype: the forward computes in fp32 from
exactly representable inputs, then rounds once to the output dtype, so every element must lie
within a few units of rounding (u) of the float64 reference, scaled by the tensor's magnitude.
The backward reads the saved output, which carries that rounding, so its bound has one more term
per row (see assert_grad_close). Outputs are poisoned with NaN before the kernel runs, so an
element never written fails.
"""

import importlib

import pytest
import torch

import kernels
from kernels import common
from kernels.reference import rope_qknorm_reference

rq = importlib.import_module(
    "kernels.rope_qknorm"
)  # the module (kernels.rope_qknorm is the function)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 is fine here: no tl.dot
# unit roundoff of the output, fp32 loosened for fp32 sums over the head dim
U = {torch.float32: 2.0**-17, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
EPS = 1e-6
DEVICE = (
    "cuda" if torch.cuda.is_available() else "cpu"
)  # on CPU the conftest turns on TRITON_INTERPRET


pytestmark = pytest.mark.usefixtures("fresh_seed")


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("NANOCODE_KERNELS", "triton")
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def make_qk(B, T, Hq, Hk, D, dtype, layout):
    """q and k as the model could hand them over: separate contiguous tensors, slices of one
    fused qkv projection (strided rows), or (B, H, T, D) tensors transposed to (B, T, H, D)."""
    if layout == "contiguous":
        q = torch.randn(B, T, Hq, D, dtype=dtype, device=DEVICE)
        k = torch.randn(B, T, Hk, D, dtype=dtype, device=DEVICE)
    elif layout == "fused":
        qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, dtype=dtype, device=DEVICE)
        q = qkv[..., : Hq * D].view(B, T, Hq, D)
        k = qkv[..., Hq * D : (Hq + Hk) * D].view(B, T, Hk, D)
    else:
        q = torch.randn(B, Hq, T, D, dtype=dtype, device=DEVICE).transpose(1, 2)
        k = torch.randn(B, Hk, T, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    angles = torch.rand(T, D // 2, dtype=torch.float64, device=DEVICE) * 6.3
    return q.requires_grad_(), k.requires_grad_(), angles.cos().to(dtype), angles.sin().to(dtype)


def assert_close(actual, expected, dtype):
    u = U[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=4 * u, atol=4 * u * scale)


def assert_grad_close(actual, expected, x64, out64, dout, dtype):
    """dx against the float64 reference. The kernel's backward, dy = rstd * (g - o * mean(g * o)),
    reads the saved output o rounded to the dtype (o(1 + d), |d| <= u): that moves mean(g * o) by
    at most u * m, m = mean(|g| * |o|) of the row, so each dy by at most 2 * u * rstd * |o| * m,
    and each dx (a rotation mixes two dy) by twice that. Large where rstd is large and g nearly
    parallel to o, which small head dims make likely: at D = 2 in bf16 the tensor-wide bound alone
    failed about one run in six. rstd comes from x: the rotation keeps mean(x^2)."""
    u = U[dtype]
    g = dout.double()
    rstd = (x64.detach().pow(2).mean(-1, keepdim=True) + EPS).rsqrt()
    o = out64.detach().abs()
    row_term = 4 * u * rstd * o.amax(-1, keepdim=True) * (g.abs() * o).mean(-1, keepdim=True)
    tol = 4 * u * expected.abs().max() + 4 * u * expected.abs() + row_term
    err = (actual.double() - expected).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {err.numel()} gradient elements off; worst error "
        f"{err.max().item():.3g} (its bound {tol.flatten()[err.argmax()].item():.3g})"
    )


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((1, 7, 3, 1, 12), "contiguous"),  # batch 1, GQA with one kv head, D/2 not a power of 2
        ((2, 19, 4, 2, 128), "fused"),  # the model's head dim, q/k sliced from a fused projection
        ((3, 5, 2, 2, 2), "transposed"),  # the smallest head dim, transposed layout
        ((2, 9, 5, 5, 40), "fused"),  # rows not a multiple of the row block
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(triton_path, shape, layout, dtype):
    q, k, cos, sin = make_qk(*shape, dtype, layout)
    q_out, k_out = kernels.rope_qknorm(q, k, cos, sin, EPS)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype

    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    q_ref, k_ref = rope_qknorm_reference(q64, k64, cos.double(), sin.double(), EPS)
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)

    # output gradients that are themselves strided views
    dq_out = torch.randn(q.shape[::-1], dtype=dtype, device=DEVICE).permute(3, 2, 1, 0)
    dk_out = torch.randn(k.shape[::-1], dtype=dtype, device=DEVICE).permute(3, 2, 1, 0)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    dq_ref, dk_ref = torch.autograd.grad(
        (q_ref, k_ref), (q64, k64), (dq_out.double(), dk_out.double())
    )
    assert_grad_close(dq, dq_ref, q64, q_ref, dq_out, dtype)
    assert_grad_close(dk, dk_ref, k64, k_ref, dk_out, dtype)


def test_only_q_used(triton_path):
    """A loss that ignores k_out still gives k a (zero) gradient, and q's is right."""
    q, k, cos, sin = make_qk(2, 6, 2, 1, 16, torch.float32, "contiguous")
    q_out, _ = kernels.rope_qknorm(q, k, cos, sin, EPS)
    dq, dk = torch.autograd.grad(
        q_out.sum(), (q, k)
    )  # sum's gradient is an expanded (stride 0) tensor
    q64 = q.detach().double().requires_grad_()
    (dq_ref,) = torch.autograd.grad(
        rope_qknorm_reference(q64, k.double(), cos.double(), sin.double(), EPS)[0].sum(), q64
    )
    assert_close(dq, dq_ref, torch.float32)
    assert torch.equal(dk, torch.zeros_like(dk))


def test_saves_outputs_not_inputs(triton_path):
    """The backward keeps q_out, k_out (attention holds them anyway) and the rstds, so the
    inputs q, k are free to go after the forward."""
    q, k, cos, sin = make_qk(2, 3, 2, 1, 8, torch.float32, "fused")
    q_out, k_out = kernels.rope_qknorm(q, k, cos, sin, EPS)
    saved = {t.data_ptr() for t in q_out.grad_fn.saved_tensors}
    assert q_out.data_ptr() in saved and k_out.data_ptr() in saved
    assert q.data_ptr() not in saved and k.data_ptr() not in saved


def test_torch_compile_fullgraph(triton_path):
    """torch.compile traces through the custom ops without a graph break (fullgraph=True would
    raise), and the compiled function gives the eager results."""
    q, k, cos, sin = make_qk(2, 5, 2, 1, 8, torch.float32, "fused")

    def f(q, k):
        q_out, k_out = kernels.rope_qknorm(q, k, cos, sin, EPS)
        return (q_out[:, :, :1] * k_out).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g_compiled = torch.autograd.grad(compiled(q, k), (q, k))
    g_eager = torch.autograd.grad(f(q, k), (q, k))
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


def test_custom_ops_opcheck():
    """The registrations torch.compile relies on: schema and fake (meta) implementations agree
    with the real kernels (shapes, dtypes, strides). The aot check is the fullgraph test above."""
    q, k, cos, sin = (t.detach() for t in make_qk(2, 5, 3, 1, 8, torch.float32, "fused"))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.nanocode.rope_qknorm_fwd, (q, k, cos, sin, EPS), test_utils=checks
    )
    q_out, q_rstd, k_out, k_rstd = torch.ops.nanocode.rope_qknorm_fwd(q, k, cos, sin, EPS)
    saved = [q_out, q_rstd, k_out, k_rstd, cos, sin]
    args = (saved, torch.randn_like(q), torch.randn_like(k))
    torch.library.opcheck(torch.ops.nanocode.rope_qknorm_bwd, args, test_utils=checks)


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(
        rq, "rope_qknorm_triton", lambda *a: calls.append(1) or rope_qknorm_reference(*a)
    )
    q, k, cos, sin = make_qk(1, 3, 1, 1, 4, torch.float32, "contiguous")
    monkeypatch.setenv("NANOCODE_KERNELS", "torch")
    kernels.rope_qknorm(q, k, cos, sin, EPS)
    assert calls == []
    monkeypatch.setenv("NANOCODE_KERNELS", "triton")  # TRITON_INTERPRET=1 (conftest) or CUDA
    kernels.rope_qknorm(q, k, cos, sin, EPS)
    assert calls == [1]


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_input_errors(monkeypatch, path):
    monkeypatch.setenv("NANOCODE_KERNELS", path)
    q, k, cos, sin = make_qk(2, 4, 2, 1, 8, torch.float32, "contiguous")
    q, k = q.detach(), k.detach()
    cases = [
        ((q[0], k, cos, sin), "must be \\(B, T, H, D\\)"),
        ((q, k[..., :6], cos, sin), "head dims differ"),
        ((q[..., :7], k[..., :7], cos[:, :3], sin[:, :3]), "head dim must be even"),
        ((q, k[:, :3], cos, sin), "batch/time differ"),
        ((q, k, cos[:3], sin[:3]), "cos/sin must be"),
        ((q, k.half(), cos, sin), "no dtype mixing"),
        ((q, k, cos.double(), sin), "no dtype mixing"),
        ((q, k.to("meta"), cos, sin), "is on meta"),
        ((q.long(), k.long(), cos.long(), sin.long()), "floating-point"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            kernels.rope_qknorm(*args, EPS)
    if path == "triton":
        with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
            kernels.rope_qknorm(q.double(), k.double(), cos.double(), sin.double(), EPS)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            rq.rope_qknorm_triton(q.cpu(), k.cpu(), cos.cpu(), sin.cpu(), EPS)
