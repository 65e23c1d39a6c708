"""ReLU² MLP: the Triton path (the interpreter on CPU) against the float64 reference.

Fresh random inputs every run. Tolerances are error bounds, not guesses: every value the kernels
produce is a short chain of fp32-accumulated matmuls and a few roundings to the storage dtype, so
its error is at most a few units of rounding (u) times the same chain computed on absolute
values. That chain is the reference itself run on |x|, |w_fc|, |w_proj| with output gradient |dy|
(relu is the identity on non-negative numbers, so autograd gives exactly the bounds).
Outputs are poisoned with NaN before the kernels run, so an element never written fails.
"""

import importlib

import pytest
import torch

import kernels
from kernels import common
from kernels.reference import relu2_mlp_reference

mlp = importlib.import_module("kernels.relu2_mlp")  # the module (kernels.relu2_mlp is the function)

DEVICE = (
    "cuda" if torch.cuda.is_available() else "cpu"
)  # on CPU the conftest turns on TRITON_INTERPRET
# The interpreter cannot run bf16 through tl.dot; on a GPU bf16 is tested too.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# u per dtype: storage rounding for 16-bit; for fp32, accumulation over up to ~128 terms
# (and tf32-free: fp32 inputs use input_precision="ieee")
U = {torch.float32: 128 * 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


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
