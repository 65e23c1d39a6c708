"""Newton-Schulz for Muon: the Triton path (the interpreter on CPU) against the float64 reference
iteration on wide, tall, square and batched inputs, with the Polar-Express (default) and the classic
quintic coefficients; the singular values each must produce, the symmetric-product kernel on its
own (every element written), dispatch and input errors."""

import importlib

import numpy as np
import pytest
import torch

from kernels import common
from kernels.newton_schulz import (
    CLASSIC_QUINTIC,
    POLAR_EXPRESS,
    newton_schulz_reference,
    newton_schulz_triton,
    step_coeffs,
)

ns_mod = importlib.import_module("kernels.newton_schulz")  # `kernels.newton_schulz` is the function
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Max error vs the float64 iteration, relative to the output's scale (~1): fp32 math; the fp16 and
# bf16 runs round every product to 11 / 8 bits, five steps in a row.
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 8e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
COEFFS = {"polar_express": POLAR_EXPRESS, "classic": CLASSIC_QUINTIC}


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    monkeypatch.setenv("NANOCODE_KERNELS", "triton")
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def scalar_map(s, steps, coeffs):
    """The scalar map each singular value goes through (exact for the iteration in exact math)."""
    for a, b, c in step_coeffs(coeffs, steps):
        s = a * s + b * s**3 + c * s**5
    return s


def singular_values(X):
    return torch.linalg.svdvals(X.double().cpu())


def well_conditioned(*shape, lo=0.5):
    """Random matrices with singular values uniform in [lo, 1] (times a random scale)."""
    m, n = shape[-2:]
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*shape[:-2], m, k, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*shape[:-2], n, k, dtype=torch.float64))[0]
    s = lo + (1 - lo) * torch.rand(*shape[:-2], k, dtype=torch.float64)
    return (U * s[..., None, :]) @ V.mT * (10 * torch.rand(()).item() + 0.1)


@pytest.mark.parametrize("coeffs", COEFFS)
@pytest.mark.parametrize(
    "shape",
    [(24, 40), (40, 24), (33, 33), (3, 20, 36), (2, 2, 36, 20)],
    ids=["wide", "tall", "square", "batched", "batched-4d-tall"],
)
def test_matches_reference_fp32(shape, coeffs):
    G = torch.randn(*shape, device=DEVICE)
    X = newton_schulz_triton(G, steps=5, dtype=torch.float32, coeffs=COEFFS[coeffs])
    ref = newton_schulz_reference(G.double(), steps=5, dtype=torch.float64, coeffs=COEFFS[coeffs])
    assert X.shape == G.shape and X.dtype == torch.float32
    assert (X.double() - ref).abs().max().item() < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision(dtype):
    G = torch.randn(2, 40, 24, device=DEVICE)
    X = newton_schulz_triton(G, steps=5, dtype=dtype)
    ref = newton_schulz_reference(G.double(), steps=5, dtype=torch.float64)
    assert X.dtype == dtype
    assert (X.double() - ref).abs().max().item() < TOL[dtype]


@pytest.mark.parametrize("coeffs", COEFFS)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (2, 33, 33)])
def test_singular_values_follow_the_polynomials(shape, coeffs):
    """Each singular value σ of the normalized input goes through p_i(σ) = aσ + bσ³ + cσ⁵ with each
    step's (a, b, c): the sorted output singular values equal the sorted images of the input's
    (7 steps: the last triple repeats)."""
    G = torch.randn(*shape, device=DEVICE)
    for steps in (1, 5, 7):
        X = newton_schulz_triton(G, steps=steps, dtype=torch.float32, coeffs=COEFFS[coeffs])
        s_in = singular_values(G)
        s_in = s_in / (
            s_in.square().sum(-1, keepdim=True).sqrt() * 1.02
        )  # the Frobenius normalization
        want = scalar_map(s_in, steps, COEFFS[coeffs]).sort(-1).values
        got = singular_values(X).sort(-1).values
        assert (got - want).abs().max().item() < 1e-4, f"steps={steps}"


# The bands: after five steps, normalized singular values in [0.01, 1] land in [0.6818, 1.1344]
# with the classic quintic, and in [0.8588, 1.1412] with Polar Express, which also takes σ = 0.001
# there (the scalar maps, evaluated on a fine grid below). A well-conditioned input (σ in [0.5, 1],
# so normalized σ >= 0.5 / (1.02 sqrt(k)) >= 0.01 for k <= 2400) must land there, up to rounding.
BANDS = {"classic": (0.6818, 1.1344), "polar_express": (0.8588, 1.1412)}


def test_band_of_the_coefficients():
    img = scalar_map(np.linspace(0.01, 1, 200_001), 5, CLASSIC_QUINTIC)
    assert 0.680 < img.min() < 0.683 and 1.133 < img.max() < 1.136
    img = scalar_map(np.linspace(0.001, 1, 200_001), 5, POLAR_EXPRESS)
    assert 0.8585 < img.min() < 0.859 and 1.141 < img.max() < 1.1415
    assert scalar_map(0.001, 5, CLASSIC_QUINTIC) < 0.5  # where the classic one falls short


@pytest.mark.parametrize("coeffs", COEFFS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_singular_values_in_band(dtype, coeffs):
    G = well_conditioned(2, 36, 52).float().to(DEVICE)
    s = singular_values(newton_schulz_triton(G, steps=5, dtype=dtype, coeffs=COEFFS[coeffs]))
    slack = 1e-4 if dtype == torch.float32 else TOL[dtype]
    lo, hi = BANDS[coeffs]
    assert s.min() > lo - slack and s.max() < hi + slack, (s.min().item(), s.max().item())


def test_polar_express_is_the_default():
    G = torch.randn(20, 30, device=DEVICE)
    want = newton_schulz_triton(G, dtype=torch.float32, coeffs=POLAR_EXPRESS)
    assert torch.equal(newton_schulz_triton(G, dtype=torch.float32), want)
    assert not torch.allclose(
        newton_schulz_triton(G, dtype=torch.float32, coeffs=CLASSIC_QUINTIC), want
    )


def test_zero_matrix_and_zero_steps():
    """Muon pads its stack with zero matrices: they must stay zero (no NaN from 0/0)."""
    G = torch.zeros(2, 20, 30, device=DEVICE)
    assert torch.equal(newton_schulz_triton(G, dtype=torch.float32), G)
    G = torch.randn(20, 30, device=DEVICE)
    X = newton_schulz_triton(G, steps=0, dtype=torch.float32)
    assert torch.allclose(X, G / (G.norm() * 1.02 + 1e-6))


@pytest.mark.parametrize("M, K", [(45, 30), (32, 64), (7, 5)])
@pytest.mark.parametrize("with_add", [False, True])
def test_symmetric_product_writes_every_element(M, K, with_add):
    """The kernel computes the upper tiles only and mirrors them; out starts as NaN."""
    P = torch.randn(2, M, K, device=DEVICE)
    out = torch.full((2, M, M), float("nan"), device=DEVICE)
    add = torch.randn(2, M, M, device=DEVICE) if with_add else None
    add = add + add.mT if with_add else None  # symmetric, as A is (only its upper tiles are read)
    ns_mod._launch_sym_matmul(P, out, alpha=0.7, add=add, beta=-1.3, diag=2.5)
    want = 0.7 * P.double() @ P.double().mT + (
        -1.3 * add.double() + 2.5 * torch.eye(M, dtype=torch.float64, device=DEVICE)
        if with_add
        else 0
    )
    assert not out.isnan().any()
    assert (out.double() - want).abs().max().item() < 1e-4


def test_dispatch(monkeypatch):
    import kernels

    G = torch.randn(8, 12, device=DEVICE)

    def boom(*a, **k):
        raise AssertionError("reference called")

    monkeypatch.setattr(ns_mod, "newton_schulz_reference", boom)
    kernels.newton_schulz(G, steps=2, dtype=torch.float32)  # the Triton path (GPU or interpreter)
    monkeypatch.setenv("NANOCODE_KERNELS", "torch")
    with pytest.raises(AssertionError, match="reference called"):
        kernels.newton_schulz(G, steps=2, dtype=torch.float32)


def test_torch_compile_no_graph_break():
    G = torch.randn(2, 20, 12, device=DEVICE)
    f = torch.compile(
        lambda G: newton_schulz_triton(G, 2, torch.float32) * 2, backend="aot_eager", fullgraph=True
    )
    torch._dynamo.reset()
    assert torch.allclose(f(G), newton_schulz_triton(G, 2, torch.float32) * 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 dims"):
        newton_schulz_triton(torch.randn(5))
    with pytest.raises(ValueError, match="must be floating point"):
        newton_schulz_triton(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        newton_schulz_triton(torch.randn(3, 3), steps=-1)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        newton_schulz_triton(torch.randn(3, 3), dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        newton_schulz_triton(torch.randn(3, 3), dtype=torch.int32)
    with pytest.raises(ValueError, match="coeffs must be a non-empty sequence"):
        newton_schulz_triton(torch.randn(3, 3), coeffs=[(1.0, 2.0)])
    with pytest.raises(ValueError, match="coeffs must be a non-empty sequence"):
        newton_schulz_triton(torch.randn(3, 3), coeffs=[])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_muon_shapes_bf16_cuda():
    """Depth 12's stacks, bf16, against the bf16 reference and the float64 iteration."""
    for shape in [(48, 768, 768), (12, 3072, 768), (12, 768, 3072)]:
        G = torch.randn(*shape, device="cuda")
        X = newton_schulz_triton(G, dtype=torch.bfloat16)
        ref64 = newton_schulz_reference(G.double(), dtype=torch.float64)
        ref16 = newton_schulz_reference(G, dtype=torch.bfloat16)
        err, err_ref = (
            (X.double() - ref64).abs().max().item(),
            (ref16.double() - ref64).abs().max().item(),
        )
        assert err < max(TOL[torch.bfloat16], 1.5 * err_ref), (shape, err, err_ref)
