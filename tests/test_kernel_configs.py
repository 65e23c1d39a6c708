"""Every autotune config of every kernel, executed: each entry of a kernel module's GPU_CONFIGS
(and FP32_CONFIGS, where fp32 has its own list) is forced in turn (the autotuner gets a one-entry
list, so it runs that config without tuning), on the smallest shapes that leave partial tiles for
that config (one full tile and a ragged one on each tiled axis), forward and backward against
float64, with outputs poisoned (NaN) first.

Under the interpreter (CI) this is where the large tiles, their edge masks and the wrap-around
paths run at all, every config in fp32 (the interpreter has no bf16 dot, and tiles and masks do
not depend on the dtype); on a GPU the same test compiles and runs each config for real, the
matmul kernels' GPU_CONFIGS in bf16 (the dtype they are for: in fp32 the large tiles spill, see
bench/static_check.py) and their FP32_CONFIGS in fp32. Compiling every kernel for sm_80/90/100
without a GPU is tests/test_static_check.py's job.
"""

import importlib

import pytest
import torch

from kernels import common
from tests.test_relu2_mlp import check_fp8_matmuls

ce = importlib.import_module("kernels.softcap_ce")
rq = importlib.import_module("kernels.rope_qknorm")
mlp = importlib.import_module("kernels.relu2_mlp")
ns = importlib.import_module("kernels.newton_schulz")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: TRITON_INTERPRET (conftest)
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # what GPU_CONFIGS of a dot run in
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # relative to the largest value


@pytest.fixture(autouse=True)
def triton_path(monkeypatch, fresh_seed):
    monkeypatch.setenv("NANOCODE_KERNELS", "triton")
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def force(monkeypatch, cfg, *autotuned):
    for kernel in autotuned:
        monkeypatch.setattr(kernel, "configs", [cfg])


def close(got, want, tol, what):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element never written?)"
    err = (got - want).abs().max().item()
    assert err <= tol * max(want.abs().max().item(), 1.0), f"{what}: max error {err:.3g}"


def ids(configs):
    return [
        "-".join(f"{k}{v}" for k, v in c.kwargs.items()) + f"-w{c.num_warps}-s{c.num_stages}"
        for c in configs
    ]


def by_dtype(mod):
    """(config, dtype) of a dot kernel: GPU_CONFIGS in HALF, FP32_CONFIGS in fp32."""
    params = [(c, HALF) for c in mod.GPU_CONFIGS] + [(c, torch.float32) for c in mod.FP32_CONFIGS]
    names = ids(mod.GPU_CONFIGS) + [f"fp32-{i}" for i in ids(mod.FP32_CONFIGS)]
    return pytest.mark.parametrize("cfg, dtype", params, ids=names)


@pytest.mark.parametrize("cfg", ce.GPU_CONFIGS, ids=ids(ce.GPU_CONFIGS))
def test_every_config_softcap_ce(monkeypatch, cfg):
    """V = BLOCK_V + 5: one full block and a 5-column tail, for the split kernels and the fused
    linear path's one-launch kernel; both log-sum-exp paths (softcap 15: fixed max; 50: running)."""
    force(monkeypatch, cfg, ce._ce_kernel, ce._ce_grad_kernel)
    N, V, C = 3, cfg.kwargs["BLOCK_V"] + 5, 8
    targets = torch.tensor([V - 1, -1, 2], device=DEVICE)  # the last column, an ignored row
    for softcap in (15.0, 50.0):
        logits = (torch.randn(N, V, device=DEVICE) * 3 * softcap).requires_grad_()
        ref_in = logits.detach().double().requires_grad_()
        loss = ce.softcap_cross_entropy_triton(logits, targets, softcap, reduction="sum")
        ref = ce.softcap_cross_entropy_reference(ref_in, targets, softcap, reduction="sum")
        close(loss, ref, 1e-5, f"loss (softcap {softcap})")
        close(
            torch.autograd.grad(loss, logits)[0],
            torch.autograd.grad(ref, ref_in)[0],
            1e-5,
            "dlogits",
        )
        x = torch.randn(N, C, device=DEVICE, requires_grad=True)
        w = (torch.randn(V, C, device=DEVICE) * softcap).requires_grad_()
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        loss = ce.linear_softcap_cross_entropy_triton(x, w, targets, softcap)
        ref = ce.linear_softcap_cross_entropy_reference(x64, w64, targets, softcap)
        close(loss, ref, 1e-5, "linear loss")
        for g, r, what in zip(
            torch.autograd.grad(loss, (x, w)), torch.autograd.grad(ref, (x64, w64)), ("dx", "dw")
        ):
            close(g, r, 1e-4, what)


@pytest.mark.parametrize("cfg", rq.GPU_CONFIGS, ids=ids(rq.GPU_CONFIGS))
def test_every_config_rope_qknorm(monkeypatch, cfg):
    """B*T = BLOCK_T + 3 tokens (a ragged last block), D = 12 (D/2 = 6 in a block of 8), GQA."""
    force(monkeypatch, cfg, rq._rope_qknorm_fwd_kernel, rq._rope_qknorm_bwd_kernel)
    B, T, Hq, Hk, D = 1, cfg.kwargs["BLOCK_T"] + 3, 3, 1, 12
    q = torch.randn(B, T, Hq, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, Hk, T, D, device=DEVICE).transpose(1, 2).requires_grad_()  # strided
    ang = torch.rand(T, D // 2, device=DEVICE, dtype=torch.float64) * 6.3
    cos, sin = ang.cos(), ang.sin()
    got = rq.rope_qknorm_triton(q, k, cos.float(), sin.float())
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    want = rq.rope_qknorm_reference(q64, k64, cos, sin)
    douts = [torch.randn_like(t) for t in got]
    for g, w, what in zip(got, want, ("q", "k")):
        close(g, w, 1e-5, what)
    grads = torch.autograd.grad(got, (q, k), douts)
    ref_grads = torch.autograd.grad(want, (q64, k64), [d.double() for d in douts])
    for g, r, what in zip(grads, ref_grads, ("dq", "dk")):
        close(g, r, 1e-4, what)


@pytest.fixture
def ieee_fp32():
    """IEEE fp32 matmuls (the bounds assume them), through the API compute_init uses (mixing the
    precision APIs raises in recent torch)."""
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prec)


@by_dtype(mlp)
def test_every_config_relu2_mlp(monkeypatch, ieee_fp32, cfg, dtype):
    """M = BLOCK_M + 5 tokens, H = BLOCK_N + 3, C = BLOCK_K + 7: a ragged tile on every axis
    (rows and columns past the edge wrap around), GROUP_M larger than the row tiles."""
    force(monkeypatch, cfg, mlp._matmul_kernel)
    M, H, C = cfg.kwargs["BLOCK_M"] + 5, cfg.kwargs["BLOCK_N"] + 3, cfg.kwargs["BLOCK_K"] + 7
    x = torch.randn(M, C, device=DEVICE)
    w_fc, w_proj = (
        torch.randn(H, C, device=DEVICE) / C**0.5,
        torch.randn(C, H, device=DEVICE) / H**0.5,
    )
    args = [t.to(dtype).requires_grad_() for t in (x, w_fc, w_proj)]
    args64 = [t.detach().double().requires_grad_() for t in args]
    y, ref = mlp.relu2_mlp_triton(*args), mlp.relu2_mlp_reference(*args64)
    close(y, ref, TOL[dtype], "y")
    dy = torch.randn_like(y)
    for g, r, what in zip(
        torch.autograd.grad(y, args, dy),
        torch.autograd.grad(ref, args64, dy.double()),
        ("dx", "dw_fc", "dw_proj"),
    ):
        close(g, r, TOL[dtype], what)


@pytest.mark.parametrize("cfg", mlp.FP8_CONFIGS, ids=ids(mlp.FP8_CONFIGS))
def test_every_config_relu2_mlp_fp8(monkeypatch, cfg):
    """The FP8 tiles (the same kernel on e4m3/e5m2 operands: the interpreter runs FP8 dots too),
    ragged on every axis as above, both epilogues against float64 within the bounds derived in
    tests/test_relu2_mlp.py."""
    force(monkeypatch, cfg, mlp._matmul_fp8_kernel)
    M, N, K = cfg.kwargs["BLOCK_M"] + 5, cfg.kwargs["BLOCK_N"] + 3, cfg.kwargs["BLOCK_K"] + 7
    check_fp8_matmuls(M, K, N, torch.float32)


@by_dtype(ns)
def test_every_config_newton_schulz(monkeypatch, cfg, dtype):
    """The short side m = BLOCK_M + 5 (a ragged Gram tile, and a ragged K tile in A·A), the long
    side m + 2 (ragged K in the Gram product); wide (X Xᵀ) and tall (Xᵀ X through strides)."""
    force(monkeypatch, cfg, ns._sym_matmul_kernel)
    m = cfg.kwargs["BLOCK_M"] + 5
    for shape in ((m, m + 2), (m + 2, m)):
        G = torch.randn(*shape, device=DEVICE)
        X = ns.newton_schulz_triton(G, steps=2, dtype=dtype)
        ref = ns.newton_schulz_reference(G.double(), steps=2, dtype=torch.float64)
        close(X, ref, {torch.float32: 1e-4, torch.bfloat16: 8e-2}[dtype], f"X {shape}")
