"""Softcapped cross-entropy and fused linear + softcapped CE: the Triton kernels (the interpreter on
CPU) against float64 references, on fresh random inputs with V and N not multiples of the block
sizes, logits far beyond the cap, ignored targets, every reduction, fp32 and fp16 (bf16 on CUDA)."""

import importlib

import numpy as np
import pytest
import torch

from kernels import common
from kernels.reference import (
    linear_softcap_cross_entropy_reference,
    softcap_cross_entropy_reference,
)
from kernels.softcap_ce import linear_softcap_cross_entropy_triton, softcap_cross_entropy_triton

ce_mod = importlib.import_module("kernels.softcap_ce")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
REDUCTIONS = ["mean", "sum", "none"]
# Max error relative to the largest reference value: fp32 math; fp16/bf16 round the stored
# logits/gradients (and for the fused variant the matmul outputs) to 11 / 8 bits.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    """Every test here runs the Triton path, outputs poisoned (NaN) before the kernels write."""
    monkeypatch.setenv("NANOCODE_KERNELS", "triton")
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def close(got, want, dtype, what, floor=1e-3):
    """floor: the smallest scale of the error. With the fixed max, lse = c + log(sum exp(z - c))
    rounds to a few ulp of c whatever the loss (floor c for losses), and p = exp(z - lse) gets an
    absolute error of a few ulp of 2c (~1e-6 at c = 15) whatever its size (floor for gradients: the
    largest upstream gradient a row's probabilities are multiplied by)."""
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), floor)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def make_targets(N, V, ignore_frac=0.25, ignore_index=-1):
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[torch.rand(N, device=DEVICE) < ignore_frac] = ignore_index
    targets[0] = ignore_index  # at least one ignored, at least one not
    targets[-1] = V - 1  # the last column (in the masked tail of the last block)
    return targets


def ce_check(N, V, dtype, reduction, scale=40.0, softcap=15.0, ignore_index=-1):
    logits = (torch.randn(N, V, device=DEVICE) * scale).to(dtype).requires_grad_()
    targets = make_targets(N, V, ignore_index=ignore_index)
    loss = softcap_cross_entropy_triton(logits, targets, softcap, ignore_index, reduction)
    ref_in = logits.detach().double().requires_grad_()
    ref = softcap_cross_entropy_reference(ref_in, targets, softcap, ignore_index, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    close(
        loss, ref, torch.float32, "loss", floor=softcap
    )  # same logits, fp32 math: fp32 accuracy whatever the dtype
    dout = torch.rand_like(loss) + 0.5
    (grad,) = torch.autograd.grad(loss, logits, dout)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, dout.double())
    assert grad.dtype == dtype
    valid = max(int((targets != ignore_index).sum()), 1)
    row_grad = dout.max().item() / (valid if reduction == "mean" else 1)
    close(grad, ref_grad, dtype, "dlogits", floor=row_grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_ce_matches_reference(dtype, reduction):
    ce_check(11, 4100, dtype, reduction)  # two blocks of 4096, the second almost all masked


@pytest.mark.parametrize("N, V", [(1, 1), (5, 3), (9, 777)])
def test_softcap_ce_small_shapes(N, V):
    ce_check(N, V, torch.float32, "mean")


# The interpreter's numpy warns where exp(2x/c) overflows to inf (tanh is then exactly 1, by design)
# and where inf * 0 gives NaN in an ignored row (then replaced by 0): expected here.
@pytest.mark.filterwarnings(
    "ignore:overflow encountered in exp:RuntimeWarning",
    "ignore:invalid value encountered in multiply:RuntimeWarning",
)
def test_softcap_ce_other_softcap_and_ignore_index():
    ce_check(7, 300, torch.float32, "sum", scale=3.0, softcap=2.5, ignore_index=-100)
    ce_check(7, 300, torch.float32, "none", scale=100.0, softcap=30.0, ignore_index=5)
    ce_check(
        7, 300, torch.float32, "mean", scale=300.0, softcap=100.0
    )  # exp(softcap) overflows fp32


@pytest.mark.parametrize("fixed_max", [True, False], ids=["fixed-max", "running-max"])
def test_both_lse_paths(monkeypatch, fixed_max):
    """softcap <= FIXED_MAX_SOFTCAP uses c as the max; above it the running max. Force each path at
    the same softcap, for the split kernels and the fused forward+gradient kernel."""
    monkeypatch.setattr(ce_mod, "FIXED_MAX_SOFTCAP", 1e9 if fixed_max else 0.0)
    ce_check(9, 1100, torch.float32, "none")
    test_linear_ce_matches_reference(monkeypatch, torch.float32, "mean")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_fixed_max_at_its_limit():
    """softcap 40, every logit far below it (z = -c everywhere): the fixed-max sum is V * exp(-80),
    still a normal fp32 number, so loss = log(V) exactly and the gradient is uniform."""
    for scale in (40.0, 1e4):
        ce_check(5, 300, torch.float32, "sum", scale=scale, softcap=40.0)
    logits = torch.full((3, 300), -1e4, device=DEVICE)
    loss = softcap_cross_entropy_triton(
        logits, torch.tensor([0, 7, 299], device=DEVICE), softcap=40.0, reduction="none"
    )
    assert torch.allclose(loss, torch.full_like(loss, float(np.log(300))), rtol=0, atol=1e-5)


def test_chunk_rows():
    """Equal chunks (no small last one), whole 128-row tiles when large, and less than
    CHUNK_BYTES where free memory is short."""
    rows = ce_mod._chunk_rows(N=65536, V=32768, C=768, elem_bytes=2, free_bytes=None)
    assert (
        rows * 32768 * 2 <= ce_mod.CHUNK_BYTES + 128 * 32768 * 2
        and rows % 128 == 0
        and 65536 % rows == 0
    )
    assert ce_mod._chunk_rows(N=29, V=301, C=40, elem_bytes=4, free_bytes=None) == 29
    assert (
        ce_mod._chunk_rows(N=1000, V=32768, C=768, elem_bytes=2, free_bytes=None) == 1024
    )  # one chunk
    short = (
        32768 * 768 * 4 + 65536 * 768 * 2 + 4 * (64 << 20)
    )  # a quarter of the rest: 64 MiB of logits
    rows = ce_mod._chunk_rows(N=65536, V=32768, C=768, elem_bytes=2, free_bytes=short)
    assert 512 <= rows <= 1024 and rows * 32768 * 2 <= (64 << 20) + 128 * 32768 * 2


def test_softcap_matters():
    """Sanity of the setup: at this scale the cap changes the loss (else the tests prove less)."""
    logits = torch.randn(6, 300, device=DEVICE) * 40
    targets = torch.randint(0, 300, (6,), device=DEVICE)
    capped = softcap_cross_entropy_triton(logits, targets)
    assert (capped - torch.nn.functional.cross_entropy(logits, targets)).abs() > 1.0


@pytest.mark.parametrize("fn", ["ce", "linear"])
def test_all_rows_ignored(fn):
    N, V, C = 6, 50, 8
    x = torch.randn(N, C, device=DEVICE, requires_grad=True)
    w = torch.randn(V, C, device=DEVICE, requires_grad=True)
    targets = torch.full((N,), -1, device=DEVICE)
    for reduction in REDUCTIONS:
        if fn == "ce":
            logits = (x @ w.T).detach().requires_grad_()
            loss = softcap_cross_entropy_triton(logits, targets, reduction=reduction)
            grads = torch.autograd.grad(loss.sum(), logits)
        else:
            loss = linear_softcap_cross_entropy_triton(x, w, targets, reduction=reduction)
            grads = torch.autograd.grad(loss.sum(), (x, w))
        assert torch.equal(loss, torch.zeros_like(loss)), reduction
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g)), f"{reduction}: gradient not all zero"


def test_target_out_of_range_gives_nan():
    logits = torch.randn(3, 20, device=DEVICE)
    loss = softcap_cross_entropy_triton(
        logits, torch.tensor([1, 20, -1], device=DEVICE), reduction="none"
    )
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and loss[2] == 0


def test_int32_targets_and_strided_logits():
    big = torch.randn(8, 130, device=DEVICE) * 20
    logits = big[:, 3:103]  # row stride 130, not contiguous as a whole
    targets = torch.randint(0, 100, (8,), device=DEVICE, dtype=torch.int32)
    got = softcap_cross_entropy_triton(logits, targets, reduction="none")
    want = softcap_cross_entropy_reference(logits.double(), targets.long(), reduction="none")
    close(got, want, torch.float32, "loss")


def test_dispatch(monkeypatch):
    """The public function takes the Triton path unless NANOCODE_KERNELS=torch."""
    import kernels

    logits = torch.randn(4, 30, device=DEVICE)
    targets = torch.randint(0, 30, (4,), device=DEVICE)
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE)

    def boom(*a, **k):
        raise AssertionError("reference called")

    monkeypatch.setattr(ce_mod, "softcap_cross_entropy_reference", boom)
    monkeypatch.setattr(ce_mod, "linear_softcap_cross_entropy_reference", boom)
    kernels.softcap_cross_entropy(logits, targets)  # the Triton path (GPU, or the interpreter)
    kernels.linear_softcap_cross_entropy(x, w, targets)
    monkeypatch.setenv("NANOCODE_KERNELS", "torch")
    with pytest.raises(AssertionError, match="reference called"):
        kernels.softcap_cross_entropy(logits, targets)
    with pytest.raises(AssertionError, match="reference called"):
        kernels.linear_softcap_cross_entropy(x, w, targets)


# ---- fused linear + softcapped CE ----


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_ce_matches_reference(monkeypatch, dtype, reduction):
    N, V, C = 29, 301, 40
    monkeypatch.setattr(
        ce_mod, "CHUNK_BYTES", 8 * V * torch.finfo(dtype).bits // 8
    )  # chunks of 8 rows: 8+8+8+5
    x = (torch.randn(N, C, device=DEVICE) * 2).to(dtype).requires_grad_()
    w = (
        (torch.randn(V, C, device=DEVICE) * 2).to(dtype).requires_grad_()
    )  # logits ~ +-25: beyond the cap
    targets = make_targets(N, V)
    loss = linear_softcap_cross_entropy_triton(x, w, targets, reduction=reduction)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = linear_softcap_cross_entropy_reference(x64, w64, targets, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    close(loss, ref, dtype, "loss")
    dout = torch.rand_like(loss) + 0.5
    dx, dw = torch.autograd.grad(loss, (x, w), dout)
    rdx, rdw = torch.autograd.grad(ref, (x64, w64), dout.double())
    assert dx.dtype == dtype and dw.dtype == dtype
    close(dx, rdx, dtype, "dx")
    close(dw, rdw, dtype, "dweight")


def test_linear_ce_without_grad_and_weight_only_grad(monkeypatch):
    monkeypatch.setattr(ce_mod, "CHUNK_BYTES", 4 * 97 * 4)
    x, w = torch.randn(10, 16, device=DEVICE), torch.randn(97, 16, device=DEVICE) * 3
    targets = make_targets(10, 97)
    ref = linear_softcap_cross_entropy_reference(x.double(), w.double(), targets)
    with torch.no_grad():
        close(
            linear_softcap_cross_entropy_triton(x, w, targets), ref, torch.float32, "no-grad loss"
        )
    w.requires_grad_()
    (dw,) = torch.autograd.grad(
        linear_softcap_cross_entropy_triton(x, w, targets, reduction="sum"), w
    )
    w64 = w.detach().double().requires_grad_()
    (rdw,) = torch.autograd.grad(
        linear_softcap_cross_entropy_reference(x.double(), w64, targets, reduction="sum"), w64
    )
    close(dw, rdw, torch.float32, "dweight")


def test_torch_compile_no_graph_break():
    """fullgraph=True fails on any graph break; aot_eager runs the custom ops' fake and real
    paths."""
    logits = (torch.randn(5, 70, device=DEVICE) * 20).requires_grad_()
    x, w = (
        torch.randn(5, 8, device=DEVICE, requires_grad=True),
        torch.randn(70, 8, device=DEVICE, requires_grad=True),
    )
    targets = make_targets(5, 70)

    def f(logits, x, w, targets):
        return softcap_cross_entropy_triton(logits, targets) + linear_softcap_cross_entropy_triton(
            x, w, targets
        )

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(logits, x, w, targets)
    want = f(logits, x, w, targets)
    assert torch.allclose(got, want)
    g1 = torch.autograd.grad(got, (logits, x, w))
    g2 = torch.autograd.grad(want, (logits, x, w))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b)


def test_bad_inputs():
    z = torch.randn(4, 10, device=DEVICE)
    t = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="logits must be \\(N, V\\)"):
        softcap_cross_entropy_triton(z[None], t)
    with pytest.raises(ValueError, match="targets must be \\(N,\\)"):
        softcap_cross_entropy_triton(z, t[:3])
    with pytest.raises(ValueError, match="int64 or int32"):
        softcap_cross_entropy_triton(z, t.float())
    with pytest.raises(ValueError, match="reduction must be"):
        softcap_cross_entropy_triton(z, t, reduction="avg")
    with pytest.raises(ValueError, match="softcap must be > 0"):
        softcap_cross_entropy_triton(z, t, softcap=0.0)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        softcap_cross_entropy_triton(z.double(), t)
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    with pytest.raises(ValueError, match="x has 8 features, weight 6"):
        linear_softcap_cross_entropy_triton(x, w[:, :6], t)
    with pytest.raises(ValueError, match="no dtype mixing"):
        linear_softcap_cross_entropy_triton(x, w.half(), t)
    with pytest.raises(ValueError, match="x must be \\(N, C\\)"):
        linear_softcap_cross_entropy_triton(x[0], w, t)


# ---- CUDA only: the training shape ----


@pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU (the interpreter is far too slow at this size)"
)
def test_full_size_bf16_cuda():
    N, V, C = 65536, 32768, 768
    torch.manual_seed(0)
    logits = (torch.randn(N, V, device="cuda") * 10).bfloat16().requires_grad_()
    targets = make_targets(N, V)
    loss = softcap_cross_entropy_triton(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_in = logits.detach().requires_grad_()
    ref = softcap_cross_entropy_reference(ref_in, targets)  # fp32 math from the same bf16 logits
    (ref_grad,) = torch.autograd.grad(ref, ref_in)
    close(loss, ref, torch.float32, "loss")
    close(grad, ref_grad, torch.bfloat16, "dlogits")
    del logits, grad, ref_in, ref_grad
    x = torch.randn(N, C, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(V, C, device="cuda") / C**0.5 * 4).bfloat16().requires_grad_()
    loss = linear_softcap_cross_entropy_triton(x, w, targets)
    dx, dw = torch.autograd.grad(loss, (x, w))
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = linear_softcap_cross_entropy_reference(
        xr, wr, targets
    )  # the eager bf16 path (fp32 would need ~50 GB)
    rdx, rdw = torch.autograd.grad(ref, (xr, wr))
    close(loss, ref, torch.bfloat16, "linear loss")
    close(dx, rdx, torch.bfloat16, "dx")
    close(dw, rdw, torch.bfloat16, "dweight")
