"""ReLU² MLP: the Triton path (the interpreter on CPU) against the float64 reference.

Fresh random inputs every run. Tolerances are error bounds, not guesses: every value the kernels
produce is a short chain of fp32-accumulated matmuls and a few roundings to the storage dtype, so
its error is at most a few units of rounding (u) times the same chain computed on absolute
values. That chain is the reference itself run on |x|, |w_fc|, |w_proj| with output gradient |dy|
(relu is the identity on non-negative numbers, so autograd gives exactly the bounds).
Outputs are poisoned with NaN before the kernels run, so an element never written fails.

The FP8 variant (e4m3 x and w, e5m2 dy, an fp32 scale s) is checked against float64 on the same
FP8 operands (matmul_fp8_reference), so only the kernel's own arithmetic is measured. A product
of two FP8 numbers (4 + 4 significant bits at most) is exact in fp32; the sum of K of them in any
order errs by at most (K - 1) u_acc S / s, where S = (|a8| @ |b8|^T) s is the chain on absolute
values, and the scaling rounds once more: |z - z_ref| <= (K + 1) u_acc S. Then
- relu²: |r² - r_ref²| <= |r - r_ref| (r + r_ref) plus one rounding of the square, within
  2 (K + 2) u_acc S^2 (r_ref <= S); the test allows 3 (K + 2) u_acc S^2, the margin covering
  the output rounding of that error, plus the output rounding u_out |h_ref|;
- the gradient dz = z * 2 sqrt(h), h given: the error of z times 2 sqrt(h), plus a rounding each
  for sqrt and the product (and, on a GPU, tl.sqrt's approximation): (K + 5) u_acc S 2 sqrt(h),
  plus u_out |dz_ref|.
u_acc = 2^-24 (fp32) on the CPU. On a GPU it is 2^-13: Hopper's FP8 tensor cores add products into
an accumulator of about 14 significant bits (DeepSeek-V3 report, 3.3.2), which the forward keeps
(as cuBLAS's fast accumulation) and the gradient flushes into fp32 every BLOCK_K products.
These worst-case bounds grow like K where the errors (random signs) grow like sqrt(K): measured
errors sit at 1% of them in fp32 and up to ~95% in bf16, whose output rounding dominates.
"""

import importlib

import pytest
import torch

import kernels
from kernels import common
from kernels.reference import matmul_fp8_reference, relu2_mlp_reference

mlp = importlib.import_module("kernels.relu2_mlp")  # the module (kernels.relu2_mlp is the function)

DEVICE = (
    "cuda" if torch.cuda.is_available() else "cpu"
)  # on CPU the conftest turns on TRITON_INTERPRET
# The interpreter cannot run bf16 through tl.dot; on a GPU bf16 is tested too.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# u per dtype: storage rounding for 16-bit; for fp32, accumulation over up to ~128 terms
# (and tf32-free: fp32 inputs use input_precision="ieee")
U = {torch.float32: 128 * 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
U_ACC = 2.0**-13 if DEVICE == "cuda" else 2.0**-24  # FP8 accumulation (docstring)
# the FP8 kernel's output rounding: to nearest, except the interpreter's bf16 cast truncates
U_OUT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8 if DEVICE == "cuda" else 2.0**-7}


pytestmark = pytest.mark.usefixtures("fresh_seed")


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("NANOCODE_KERNELS", "triton")
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    prec = torch.get_float32_matmul_precision()  # the API compute_init uses (mixing APIs raises)
    torch.set_float32_matmul_precision("highest")  # the fp32 bounds assume IEEE fp32 matmuls
    yield
    torch.set_float32_matmul_precision(prec)


def make_inputs(lead, C, H, dtype, strided):
    """x (*lead, C), w_fc (H, C), w_proj (C, H); strided: x a column slice of a wider tensor,
    w_fc stored transposed, w_proj a slice, so every operand has non-trivial strides."""

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE)

    if strided:
        x = randn(*lead, C + 5)[..., 2 : C + 2]
        w_fc = (randn(C, H) / C**0.5).T
        w_proj = (randn(C, H + 3) / H**0.5)[:, :H]
    else:
        x, w_fc, w_proj = randn(*lead, C), randn(H, C) / C**0.5, randn(C, H) / H**0.5
    return [t.to(dtype).requires_grad_() for t in (x, w_fc, w_proj)]


@pytest.mark.parametrize(
    "lead,C,H,strided",
    [
        ((1,), 3, 5, False),  # one token, sizes far below one tile
        ((2, 19), 40, 72, True),  # batch x time, nothing a multiple of 32, strided operands
        ((70,), 33, 100, False),  # M, N and K each spill into a last partial tile
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(triton_path, lead, C, H, strided, dtype):
    x, w_fc, w_proj = make_inputs(lead, C, H, dtype, strided)
    y = kernels.relu2_mlp(x, w_fc, w_proj)
    assert y.shape == x.shape and y.dtype == dtype
    dy = (
        torch.randn(y.shape[::-1], device=DEVICE).to(dtype).permute(*reversed(range(y.ndim)))
    )  # strided too
    grads = torch.autograd.grad(y, (x, w_fc, w_proj), dy)

    exact = [t.detach().double().requires_grad_() for t in (x, w_fc, w_proj)]
    y_ref = relu2_mlp_reference(*exact)
    grads_ref = torch.autograd.grad(y_ref, exact, dy.double())
    absolute = [t.detach().double().abs().requires_grad_() for t in (x, w_fc, w_proj)]
    y_abs = relu2_mlp_reference(*absolute)
    grads_abs = torch.autograd.grad(y_abs, absolute, dy.double().abs())

    u = U[dtype]
    for name, got, ref, bound in zip(
        ["y", "dx", "dw_fc", "dw_proj"], (y, *grads), (y_ref, *grads_ref), (y_abs, *grads_abs)
    ):
        err = (got.double() - ref).abs()
        tol = 4 * u * bound + 1e-30
        assert torch.isfinite(got).all(), f"{name}: non-finite elements (never written?)"
        assert (err <= tol).all(), (
            f"{name}: max error {err.max():.3g}, worst error/bound {(err / tol).max():.3g}"
        )


def test_no_input_grad(triton_path):
    """Only the weights train (x does not need a gradient): the backward skips dx."""
    x, w_fc, w_proj = make_inputs((5,), 8, 16, torch.float32, False)
    x = x.detach()
    y = kernels.relu2_mlp(x, w_fc, w_proj)
    g = torch.autograd.grad(y.sum(), (w_fc, w_proj))
    exact = [t.detach().double().requires_grad_() for t in (w_fc, w_proj)]
    g_ref = torch.autograd.grad(relu2_mlp_reference(x.double(), *exact).sum(), exact)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph(triton_path):
    """torch.compile traces through the custom ops without a graph break (fullgraph=True would
    raise), and the compiled function gives the eager results."""
    x, w_fc, w_proj = make_inputs((2, 3), 8, 16, torch.float32, False)

    def f(x, w_fc, w_proj):
        return kernels.relu2_mlp(x, w_fc, w_proj).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g_compiled = torch.autograd.grad(compiled(x, w_fc, w_proj), (x, w_fc, w_proj))
    g_eager = torch.autograd.grad(f(x, w_fc, w_proj), (x, w_fc, w_proj))
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


def test_custom_ops_opcheck():
    """The registrations torch.compile relies on: schema and fake (meta) implementations agree
    with the real kernels (shapes, dtypes, strides). The aot check is the fullgraph test above."""
    x, w_fc, w_proj = (t.detach() for t in make_inputs((7,), 8, 16, torch.float32, True))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.nanocode.matmul_relu2, (x, w_fc), test_utils=checks)
    h = torch.relu(x @ w_fc.T).square()
    torch.library.opcheck(
        torch.ops.nanocode.matmul_relu2_grad, (torch.randn_like(x), w_proj, h), test_utils=checks
    )
    # FP8 operands, their scale, h's dtype (the schema test is above: its aliasing check
    # multiplies the inputs, which the CPU has no float8 kernel for)
    x8, w8, scale = fp8(E4M3, 7, 16), fp8(E4M3, 8, 16), torch.tensor(2.0**-10, device=DEVICE)
    ops = torch.ops.nanocode.matmul_relu2, torch.ops.nanocode.matmul_relu2_grad
    h = torch.rand(7, 8, device=DEVICE, dtype=torch.bfloat16)
    fp8_args = (x8, w8, scale, torch.bfloat16), (fp8(E5M2, 7, 16), w8.T, h, scale)
    for op, args in zip(ops, fp8_args):
        torch.library.opcheck(op, args, test_utils="test_faketensor")


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(
        mlp, "relu2_mlp_triton", lambda *a: calls.append(1) or relu2_mlp_reference(*a)
    )
    x, w_fc, w_proj = make_inputs((2,), 4, 8, torch.float32, False)
    monkeypatch.setenv("NANOCODE_KERNELS", "torch")
    kernels.relu2_mlp(x, w_fc, w_proj)
    assert calls == []
    monkeypatch.setenv("NANOCODE_KERNELS", "triton")  # TRITON_INTERPRET=1 (conftest) or CUDA
    kernels.relu2_mlp(x, w_fc, w_proj)
    assert calls == [1]


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_input_errors(monkeypatch, path):
    monkeypatch.setenv("NANOCODE_KERNELS", path)
    x, w_fc, w_proj = (t.detach() for t in make_inputs((2, 3), 8, 16, torch.float32, False))
    cases = [
        ((x, w_fc[None], w_proj), "must be 2-D"),
        ((x[..., :6], w_fc, w_proj), "x has 6 features"),
        ((x, w_fc, w_proj.T), "w_proj must be \\(C, H\\)"),
        ((x.half(), w_fc, w_proj), "no dtype mixing"),
        ((x, w_fc, w_proj.to("meta")), "is on meta"),
        ((x.long(), w_fc.long(), w_proj.long()), "floating-point"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            kernels.relu2_mlp(*args)
    if path == "triton":
        with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
            kernels.relu2_mlp(x.double(), w_fc.double(), w_proj.double())
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            mlp.relu2_mlp_triton(x.cpu(), w_fc.cpu(), w_proj.cpu())


def fp8(dtype, rows, cols, transposed=False):
    """Random values of an FP8 format spread over its range; transposed: stored (cols, rows)."""
    big = torch.finfo(dtype).max
    t = (torch.randn(cols, rows) if transposed else torch.randn(rows, cols)) * big / 8
    t = t.clamp(-big, big).to(device=DEVICE, dtype=dtype)
    return t.T if transposed else t


def check_fp8_matmuls(M, K, N, out, strided=False):
    """Both FP8 epilogues on fresh operands (x8, w8 and dy8; h as relu²'s outputs are: >= 0,
    zeros included) against matmul_fp8_reference, elementwise within the docstring's bounds."""
    scale = (torch.rand((), device=DEVICE) + 0.5) * 2.0**-10  # the product of two inverse scales
    x8, w8, dy8 = fp8(E4M3, M, K, strided), fp8(E4M3, N, K, strided), fp8(E5M2, M, K)
    h = torch.randn(M, N, device=DEVICE).relu().square().to(out)
    for name, got, a8 in [
        ("h", mlp._matmul_relu2(x8, w8, scale, out), x8),
        ("dz", mlp._matmul_relu2_grad(dy8, w8.T, h, scale), dy8),
    ]:
        S = a8.double().abs() @ w8.double().abs().T * scale.double()
        if name == "h":
            ref, bound = matmul_fp8_reference(x8, w8, scale), 3 * (K + 2) * U_ACC * S.square()
        else:
            ref = matmul_fp8_reference(dy8, w8, scale, h)
            bound = (K + 5) * U_ACC * S * 2 * h.double().sqrt()
        tol = bound + U_OUT[out] * ref.abs()
        assert got.shape == (M, N) and got.dtype == out, name
        assert torch.isfinite(got).all(), f"{name}: non-finite elements (never written?)"
        err = (got.double() - ref).abs()
        assert (err <= tol).all(), f"{name}: worst error/bound {(err / tol).max():.3g}"


@pytest.mark.parametrize(
    "M,K,N,strided",
    [(1, 3, 5, False), (38, 40, 72, True), (70, 33, 100, False), (64, 64, 32, False)],
)
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_fp8_matmuls(triton_path, M, K, N, strided, out):
    """The FP8 kernel at ragged sizes (and one of whole tiles), its operands stored K-major (as
    nanocode.fp8 passes them) or transposed (strided)."""
    check_fp8_matmuls(M, K, N, out, strided)
