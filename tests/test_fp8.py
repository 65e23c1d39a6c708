"""FP8 matmuls (nanocode.fp8) on the CPU, where torch._scaled_mm runs; fresh random inputs.

Three layers of checks, each with a tolerance derived here, not guessed:

1. quantize: t ≈ t8 * inv elementwise within the format's rounding. e4m3 keeps 3 mantissa bits,
   so a normal number rounds to within u = 2^-4 of itself (relative); e5m2 keeps 2: u = 2^-3.
   Below the smallest normal (2^-6 for e4m3, 2^-14 for e5m2, in scaled units) the spacing is
   fixed, so the error there is at most half the smallest subnormal (2^-10, 2^-17) times inv.
2. the three matmuls against a float64 reference of the same math: the same FP8 operands and
   scales (from quantize, checked in 1), multiplied in float64. Only the accumulation differs: fp32
   over K terms, |error| <= (K + 2) 2^-24 (|a8| @ |b8|) inv_a inv_b elementwise (the +2: the two
   scale multiplications), plus 2^-8 |y| when the output is rounded to bf16. This pins layouts,
   transposes, scale order and the zero padding of the token dim.
3. against the unquantized float64 matmul. One output y = sum_k a_k b_k gets
   e = sum_k a_k b_k (d_k + f_k + d_k f_k), with d, f the operands' relative roundings. The worst
   case, (u_a + u_b + u_a u_b) sum_k |a_k b_k|, grows like K while y (with cancellation) grows like
   sqrt(K): useless as a tolerance. Rounding errors of different elements are independent with
   zero mean and RMS at most u / sqrt(3) (uniform within half a spacing, which is at most u
   relative), so E[e^2] <= (u_a^2 + u_b^2) / 3 * sum_k a_k^2 b_k^2, and over the whole output
   E ||E||_F^2 <= sigma^2 = (u_a^2 + u_b^2) / 3 * sum_k ||a[:, k]||^2 ||b[k, :]||^2. For
   independent random operands ||Y||_F^2 has the same expectation, so the relative Frobenius
   error is sqrt((u_a^2 + u_b^2) / 3), whatever K: 0.051 for e4m3 x e4m3 (forward), 0.081 for
   e5m2 x e4m3 (both backward matmuls). Thousands of independent roundings make ||E||_F
   concentrate, so the test asserts ||E||_F <= sigma. Mantissas of random data are spread over
   the binade (most values are not at its bottom, where the relative error peaks), so the
   measured error sits near 0.74 sigma; the test also asserts it is above 0.4 sigma, proving the
   operands really went through FP8 (a bf16 matmul would be ~30x below).
"""

import copy

import pytest
import torch

import nanocode.fp8 as fp8
from nanocode.fp8 import E4M3, E5M2, fp8_linear, fp8_relu2_mlp, fp8_supported, quantize
from nanocode.gpt import GPT, GPTConfig, build_model

pytestmark = pytest.mark.usefixtures("fresh_seed")

U = {E4M3: 2.0**-4, E5M2: 2.0**-3}  # unit roundoff of normal numbers
HALF_SUBNORMAL = {E4M3: 2.0**-10, E5M2: 2.0**-17}  # in scaled units
# leading dims of x, K, N: odd token counts (the dw padding), K and N multiples of 16
SHAPES = [((1,), 16, 16), ((3, 7), 48, 80), ((33,), 64, 32), ((2, 5, 9), 32, 112)]


@pytest.fixture
def cuda_layout_rules(monkeypatch):
    """The CPU's _scaled_mm takes any layout; cuBLAS's does not. Check every call against the
    CUDA rules, so the code these tests pass is code an H100 accepts. (Eager tests only: under
    torch.compile Inductor calls the op itself.)"""
    real = torch._scaled_mm

    def checked(a, b, scale_a, scale_b, **kw):
        assert a.stride(1) == 1 and b.stride(0) == 1, "a row-major, b column-major"
        assert a.size(1) % 16 == 0 and b.size(0) % 16 == 0 and b.size(1) % 16 == 0
        assert E5M2 not in (a.dtype, b.dtype) or a.dtype != b.dtype, "no e5m2 x e5m2"
        for s in (scale_a, scale_b):
            assert s.dtype == torch.float32 and s.numel() == 1
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", checked)


def make(lead, K, N, strided=False):
    """x (*lead, K), w (N, K), dy (*lead, N); strided: x a column slice, w stored transposed."""
    if strided:
        x, w = torch.randn(*lead, K + 3)[..., 1 : K + 1], torch.randn(K, N).T
    else:
        x, w = torch.randn(*lead, K), torch.randn(N, K)
    return x, w / K**0.5, torch.randn(*lead, N)


def run(x, w, dy):
    """y, dx, dw of fp8_linear."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fp8_linear(x, w)
    y.backward(dy.to(y.dtype))
    return y, x.grad, w.grad


def ref_mm(a, b, a_dtype, b_dtype):
    """a @ b in float64 on the operands as quantize leaves them; and the fp32 accumulation bound."""
    (a8, inv_a), (b8, inv_b) = quantize(a, a_dtype), quantize(b, b_dtype)
    scale = inv_a.double() * inv_b.double()
    a8, b8 = a8.double(), b8.double()
    bound = (a.size(1) + 2) * 2.0**-24 * (a8.abs() @ b8.abs()) * scale
    return (a8 @ b8) * scale, bound


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_quantize_rounds_within_the_format(dtype, magnitude):
    t = torch.randn(37, 48) * magnitude
    t8, inv = quantize(t, dtype)
    assert t8.dtype == dtype and t8.is_contiguous() and inv.dtype == torch.float32
    # the largest element lands on the format's max (no overflow, no wasted range): s = max / amax
    fp8_max, amax = torch.finfo(dtype).max, t.double().abs().max()
    assert t8.float().abs().max() == fp8_max
    assert (inv.double() * fp8_max - amax).abs() <= 2.0**-22 * amax  # inv = amax / max
    t64, back = t.double(), t8.double() * inv.double()
    # + 2^-22: the fp32 product t * s and the fp32 inverse each round once more
    bound = (U[dtype] + 2.0**-22) * t64.abs() + HALF_SUBNORMAL[dtype] * inv.double()
    assert ((back - t64).abs() <= bound).all()


def test_quantize_all_zero_and_transposed():
    t8, inv = quantize(torch.zeros(16, 32), E4M3)
    assert (t8.float() == 0).all() and torch.isfinite(inv)
    t = torch.randn(32, 16).T  # column-major in, row-major out
    t8, inv = quantize(t, E5M2)
    assert t8.is_contiguous() and torch.equal(t8, quantize(t.contiguous(), E5M2)[0])


@pytest.mark.usefixtures("cuda_layout_rules")
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_matmuls_match_the_float64_reference(lead, K, N, strided, out):
    x, w, dy = make(lead, K, N, strided)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=out == torch.bfloat16):
        y, dx, dw = run(x, w, dy)
    assert y.shape == (*lead, N) and y.dtype == out
    assert dx.dtype == dw.dtype == torch.float32  # gradients in the inputs' own dtypes
    x2, dy2 = x.reshape(-1, K), dy.to(out).reshape(-1, N)
    y_round = 2.0**-8 if out == torch.bfloat16 else 0.0  # dx, dw come out in fp32
    for got, (ref, bound), out_round in [
        (y, ref_mm(x2, w.T, E4M3, E4M3), y_round),
        (dx, ref_mm(dy2, w, E5M2, E4M3), 0.0),
        (dw, ref_mm(dy2.T, x2, E5M2, E4M3), 0.0),
    ]:
        got = got.double().reshape(ref.shape)
        assert ((got - ref).abs() <= bound + out_round * ref.abs()).all()


def sigma(a, b, u_a, u_b):
    """The expected Frobenius error of a @ b with operands rounded to u_a, u_b (docstring, 3)."""
    terms = (a.double().square().sum(0) * b.double().square().sum(1)).sum()
    return ((u_a**2 + u_b**2) / 3 * terms).sqrt()


@pytest.mark.usefixtures("cuda_layout_rules")
@pytest.mark.parametrize("lead,K,N", [((3, 32), 128, 64), ((257,), 64, 192)])
def test_error_against_the_unquantized_matmul(lead, K, N):
    x, w, dy = make(lead, K, N)
    y, dx, dw = run(x, w, dy)
    x2, dy2 = x.reshape(-1, K).double(), dy.reshape(-1, N).double()
    w64 = w.double()
    e4, e5 = U[E4M3], U[E5M2]
    for name, got, a, b, u_a in [
        ("y", y, x2, w64.T, e4),
        ("dx", dx, dy2, w64, e5),
        ("dw", dw, dy2.T, x2, e5),
    ]:
        ref, s = a @ b, sigma(a, b, u_a, e4)
        err = (got.double().reshape(ref.shape) - ref).norm()
        print(f"{name}: relative Frobenius error {err / ref.norm():.4f}, {err / s:.2f} sigma")
        assert 0.4 * s < err <= s, name


@pytest.mark.usefixtures("cuda_layout_rules")
def test_all_zero_inputs_give_zeros_not_nan():
    x, w, dy = make((5,), 32, 16)
    y, dx, dw = run(torch.zeros_like(x), w, dy)  # amax(x) = 0
    assert (y == 0).all() and torch.isfinite(dx).all() and (dw == 0).all()
    y, dx, dw = run(x, w, torch.zeros_like(dy))  # amax(dy) = 0 in the backward
    assert torch.isfinite(y).all() and (dx == 0).all() and (dw == 0).all()


@pytest.mark.usefixtures("cuda_layout_rules")
@pytest.mark.parametrize("power", [-100, 100])
def test_large_and_small_magnitudes_scale_exactly(power):
    """Scaling by a power of two scales s by its inverse, so the FP8 operands are unchanged and
    every output scales exactly: no overflow at 2^100 (a plain e4m3 cast saturates at 448), no
    underflow at 2^-100."""
    x, w, dy = make((7,), 48, 32)
    big = 2.0**power
    y, dx, dw = run(x, w, dy)
    y2, dx2, dw2 = run(x * big, w, dy / big)  # dw = dy.T @ x keeps its size
    assert torch.equal(y2, y * big) and torch.equal(dx2, dx / big) and torch.equal(dw2, dw)


@pytest.mark.usefixtures("cuda_layout_rules")
def test_gradients_flow_where_asked():
    x, w, dy = make((9,), 16, 32)
    x.requires_grad_()
    fp8_linear(x, w).backward(dy)  # a frozen weight: only dx
    assert x.grad is not None and x.grad.abs().sum() > 0
    w.requires_grad_()
    fp8_linear(x.detach(), w).backward(dy)  # a constant input: only dw
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.usefixtures("cuda_layout_rules")
def test_bf16_activations_fp32_weight():
    """What a GPU run does: bf16 activations against the fp32 parameter, read without a bf16 copy;
    the gradient comes back in the parameter's dtype (what the optimizer and DDP's buckets need)."""
    x, w, dy = make((4, 3), 32, 48)
    y, dx, dw = run(x.bfloat16(), w, dy.bfloat16())
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == torch.float32


@pytest.mark.usefixtures("triton_path")
def test_compiled_equals_eager():
    """fullgraph: Dynamo traces both autograd.Functions (forward and backward) and the fused
    kernel's custom ops without a break; the scale is computed in float64, so Inductor's code
    rounds it exactly as eager does."""
    mlp = torch.nn.Sequential(
        torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(64, 32, bias=False)
    )

    def forward(x):
        h = fp8_linear(torch.relu(fp8_linear(x, mlp[0].weight)).square(), mlp[1].weight)
        return fp8_relu2_mlp(h, mlp[0].weight, mlp[1].weight)

    x = torch.randn(3, 11, 32)
    results = []
    for fn in (forward, torch.compile(forward, fullgraph=True)):
        mlp.zero_grad()
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.square().sum().backward()
        results.append([y, xg.grad, mlp[0].weight.grad, mlp[1].weight.grad])
    for eager, compiled in zip(*results, strict=True):
        assert torch.equal(eager, compiled)


@pytest.mark.parametrize(
    "x_shape,w_shape",
    [((4, 40), (32, 40)), ((4, 32), (20, 32)), ((4, 32), (32, 48)), ((4, 32), (32,))],
)
def test_bad_shapes_are_refused(x_shape, w_shape):
    with pytest.raises(ValueError, match="fp8_linear: .*multiples of 16"):
        fp8_linear(torch.randn(x_shape), torch.randn(w_shape))


# ---------------------------------------------------------------------------------------------
# The fused FP8 MLP (fp8_relu2_mlp: kernels/relu2_mlp.py's FP8 kernel for the two matmuls around
# relu², _scaled_mm for the other four), on CUDA or the interpreter.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_path(monkeypatch):
    if not fp8_supported(DEVICE)[0]:
        pytest.skip(fp8_supported(DEVICE)[1])
    monkeypatch.setenv("NANOCODE_KERNELS", "triton")


def mlp_inputs(lead, C, H):
    x, w_fc, dy = (t.to(DEVICE) for t in make(lead, C, H))
    return x, w_fc, torch.randn(C, H, device=DEVICE) / H**0.5, torch.randn_like(x)


def mlp_grads(fn, x, w_fc, w_proj, dy):
    leaves = [t.detach().requires_grad_() for t in (x, w_fc, w_proj)]
    y = fn(*leaves)
    return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]


@pytest.mark.usefixtures("cuda_layout_rules", "triton_path")
@pytest.mark.parametrize("lead,C,H", [((1,), 16, 32), ((3, 7), 48, 80), ((33,), 32, 192)])
def test_fused_mlp_is_the_unfused_fp8_math(lead, C, H):
    """The fused path rounds the same tensors to FP8 at the same points as fp8_linear, relu²,
    fp8_linear (exact against float64 above). Only its h (another fp32 summation order) and dz
    (dh * 2 sqrt(h) instead of dh * 2 relu(z)) differ, by a few fp32 roundings, ~K 2^-24
    relative: that moves an element's FP8 rounding (and amax's scale) only within that distance
    of a rounding boundary, a fraction ~K 2^-24 / 2^-4 < 2^-12 of the elements, each by one step
    (<= 2^-3 relative), so the results may differ by sqrt(2^-12) 2^-3 = 2^-9 of their norm: the
    test allows 2^-8. A wrong scale, format or derivative differs by the FP8 error, >= 2^-5."""
    args = mlp_inputs(lead, C, H)
    fused = mlp_grads(fp8_relu2_mlp, *args)
    unfused = mlp_grads(fp8.fp8_relu2_mlp_unfused, *args)
    for name, a, b in zip(["y", "dx", "dw_fc", "dw_proj"], fused, unfused, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, name
        assert (a - b).norm() <= 2.0**-8 * b.norm(), name


@pytest.mark.usefixtures("cuda_layout_rules", "triton_path")
def test_fused_mlp_dtypes_and_dispatch(monkeypatch):
    """bf16 activations against fp32 weights, as a GPU run calls it: y and dx in bf16, the weight
    gradients in fp32. NANOCODE_KERNELS=torch takes the unfused path."""
    x, w_fc, w_proj, dy = mlp_inputs((5, 3), 32, 64)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, dx, dw_fc, dw_proj = mlp_grads(fp8_relu2_mlp, x.bfloat16(), w_fc, w_proj, dy)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw_fc.dtype == dw_proj.dtype == torch.float32
    assert y.shape == (5, 3, 32) and dx.shape == (5, 3, 32) and dw_proj.shape == (32, 64)
    with pytest.raises(ValueError, match="fp8_relu2_mlp: .*multiples of 16"):
        fp8_relu2_mlp(x, w_fc[:40], w_proj[:, :40])
    calls = []
    monkeypatch.setattr(fp8, "fp8_relu2_mlp_unfused", lambda *a: calls.append(1))
    fp8_relu2_mlp(x, w_fc, w_proj)
    monkeypatch.setenv("NANOCODE_KERNELS", "torch")
    fp8_relu2_mlp(x, w_fc, w_proj)
    assert calls == [1]


def test_model_trains_its_blocks_in_fp8_and_evaluates_without(monkeypatch):
    """GPT.enable_fp8: in training mode every attention projection goes through fp8_linear and
    every MLP through fp8_relu2_mlp (the head, embeddings and gates do not); evaluation runs none
    of them; the parameters are the usual ones. A key/value width FP8 cannot take is refused."""
    import nanocode.gpt as gpt

    calls = []
    monkeypatch.setattr(gpt, "fp8_linear", lambda x, w: calls.append(w.shape) or fp8_linear(x, w))
    monkeypatch.setattr(
        gpt, "fp8_relu2_mlp", lambda x, *w: calls.append("mlp") or fp8_relu2_mlp(x, *w)
    )
    model = build_model(GPTConfig.from_depth(2, 64, 32), "cpu")
    names = list(model.state_dict())
    model.enable_fp8()
    idx = torch.randint(0, 64, (2, 32))
    model(idx, idx).backward()
    assert calls == [(384, 128), (128, 128), "mlp"] * 2  # q, k and v in one matmul; c_proj
    calls.clear()
    model.eval()
    model(idx, idx)
    assert calls == [] and list(model.state_dict()) == names
    with torch.device("meta"), pytest.raises(ValueError, match="multiple of 16, not 88"):
        GPT(GPTConfig.from_depth(11, 64, 32, n_kv_head=1)).enable_fp8()


def test_fp8_attention_projections_match_the_unquantized_model():
    """Under FP8, q, k and v come from one matmul on the three weights stacked: the loss and each
    projection's gradient stay within FP8's error of the fp32 model's (gradients ~10% off here,
    e5m2 carrying them, as with three matmuls; a wrong split or order is over 100% off)."""
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, 64, 32), "cpu")
    for block in model.transformer.h:  # c_proj starts at zero, which would hide q, k and v
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
    fp8_model = copy.deepcopy(model)
    fp8_model.enable_fp8()
    idx = torch.randint(0, 64, (2, 32))
    losses = [m(idx, idx) for m in (model, fp8_model)]
    for loss in losses:
        loss.backward()
    assert abs(losses[1].item() - losses[0].item()) < 0.02 * losses[0].item()
    for ref, got in zip(model.transformer.h, fp8_model.transformer.h):
        for name in ("c_q", "c_k", "c_v"):
            want, grad = getattr(ref.attn, name).weight.grad, getattr(got.attn, name).weight.grad
            assert (grad - want).norm() < 0.25 * want.norm(), name


def test_fp8_supported(monkeypatch):
    assert fp8_supported("cpu")[0]
    ok, why = fp8_supported("mps")
    assert not ok and "mps" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 6))
    ok, why = fp8_supported("cuda")
    assert not ok and "8.9" in why and "8.6" in why


@pytest.mark.usefixtures("triton_path")
def test_bench_fp8_tables_on_a_tiny_model():
    """bench/fp8.py's measurements on a tiny model: every block linear and the head, each MLP
    whole; FP8 errors of a few percent, the fused and unfused MLPs alike, bf16's far smaller."""
    from bench import fp8 as bench_fp8

    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, 64, 32), "cpu")
    with torch.no_grad():  # off the init: its zero output projections carry no gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 64, (2, 32))
    linears, mlps = bench_fp8.capture(model, idx, idx)
    names = [row[0] for row in linears]
    layer = [
        "0.attn.c_q",
        "0.attn.c_k",
        "0.attn.c_v",
        "0.attn.c_proj",
        "0.mlp.c_fc",
        "0.mlp.c_proj",
    ]
    assert names == layer + ["lm_head"] and [m[0] for m in mlps] == ["0.mlp"]
    errors = bench_fp8.mlp_errors(*mlps[0][1:])  # per y, dx, dw_fc, dw_proj: fused, unfused, bf16
    for fused, unfused, bf16 in zip(*[iter(errors)] * 3, strict=True):
        assert 0.005 < fused < 0.2 and abs(fused - unfused) < 0.1 * fused and bf16 < fused / 4
