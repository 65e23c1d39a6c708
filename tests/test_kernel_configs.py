"""Every autotune config of every kernel, executed: each entry of a kernel module's GPU_CONFIGS is
forced in turn (the autotuner gets a one-entry list, so it runs that config without tuning), on
the smallest shapes that leave partial tiles for that config (one full tile and a ragged one on
each tiled axis), forward and backward against float64, with outputs poisoned (NaN) first.

Under the interpreter (CI) this is where the large tiles, their edge masks and the wrap-around
paths run at all; on a GPU the same test compiles and runs each config for real.
"""

import importlib

import pytest
import torch

ce = importlib.import_module("kernels.softcap_ce")
rq = importlib.import_module("kernels.rope_qknorm")
mlp = importlib.import_module("kernels.relu2_mlp")
ns = importlib.import_module("kernels.newton_schulz")
DEVICE = (
    "cuda" if torch.cuda.is_available() else "cpu"
)  # on CPU the conftest turns on TRITON_INTERPRET


@pytest.fixture(autouse=True)
def triton_path(monkeypatch, fresh_seed):
    monkeypatch.setenv("NANOCODE_KERNELS", "triton")
    for mod in (ce, rq, mlp, ns):
        monkeypatch.setattr(mod, "POISON_OUTPUTS", True)


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


@pytest.mark.parametrize("cfg", ce.GPU_CONFIGS, ids=ids(ce.GPU_CONFIGS))
def test_every_config_softcap_ce(monkeypatch, cfg):
    """V = BLOCK_V + 5: one full block and a 5-column tail, for the split kernels and the fused
    linear path's one-launch kernel; both log-sum-exp paths (softcap 15: fixed max; 50: running)."""
    force(monkeypatch, cfg, ce._ce_fwd_kernel, ce._ce_bwd_kernel, ce._ce_fwd_grad_kernel)
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


@pytest.mark.parametrize("cfg", mlp.GPU_CONFIGS, ids=ids(mlp.GPU_CONFIGS))
def test_every_config_relu2_mlp(monkeypatch, ieee_fp32, cfg):
    """M = BLOCK_M + 5 tokens, H = BLOCK_N + 3, C = BLOCK_K + 7: a ragged tile on every axis
    (rows and columns past the edge wrap around), GROUP_M larger than the row tiles."""
    force(monkeypatch, cfg, mlp._matmul_kernel)
    M, H, C = cfg.kwargs["BLOCK_M"] + 5, cfg.kwargs["BLOCK_N"] + 3, cfg.kwargs["BLOCK_K"] + 7
    x = torch.randn(M, C, device=DEVICE, requires_grad=True)
    w_fc = (torch.randn(H, C, device=DEVICE) / C**0.5).requires_grad_()
    w_proj = (torch.randn(C, H, device=DEVICE) / H**0.5).requires_grad_()
    args64 = [t.detach().double().requires_grad_() for t in (x, w_fc, w_proj)]
    y, ref = mlp.relu2_mlp_triton(x, w_fc, w_proj), mlp.relu2_mlp_reference(*args64)
    close(y, ref, 1e-4, "y")
    dy = torch.randn_like(y)
    for g, r, what in zip(
        torch.autograd.grad(y, (x, w_fc, w_proj), dy),
        torch.autograd.grad(ref, args64, dy.double()),
        ("dx", "dw_fc", "dw_proj"),
    ):
        close(g, r, 1e-4, what)


@pytest.mark.parametrize("cfg", ns.GPU_CONFIGS, ids=ids(ns.GPU_CONFIGS))
def test_every_config_newton_schulz(monkeypatch, cfg):
    """The short side m = BLOCK_M + 5 (a ragged Gram tile, and a ragged K tile in A·A), the long
    side m + 2 (ragged K in the Gram product); wide (X Xᵀ) and tall (Xᵀ X through strides)."""
    force(monkeypatch, cfg, ns._sym_matmul_kernel)
    m = cfg.kwargs["BLOCK_M"] + 5
    for shape in ((m, m + 2), (m + 2, m)):
        G = torch.randn(*shape, device=DEVICE)
        X = ns.newton_schulz_triton(G, steps=2, dtype=torch.float32)
        close(
            X,
            ns.newton_schulz_reference(G.double(), steps=2, dtype=torch.float64),
            1e-4,
            f"X {shape}",
        )


# Compiled Triton rejects what the interpreter runs happily (e.g. a variable that is a constexpr in
# one branch of a runtime `if` and a tensor in the other), so the memory-bound kernels are also
# compiled for sm_90 at every GPU config, ahead of time, without a GPU (Triton bundles ptxas).
# The matmul kernels are left out: compiling their 26 configs takes ~12 minutes on 2 cores.
AOT_SCRIPT = r"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ce = importlib.import_module("kernels.softcap_ce")
rq = importlib.import_module("kernels.rope_qknorm")

def compile_(kernel, cfg, consts, types):
    names = kernel.fn.arg_names
    c = dict(consts, **cfg.kwargs)
    sig = {n: "constexpr" if n in c else types(n) for n in names}
    div = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr")}
    triton.compile(ASTSource(fn=kernel.fn, signature=sig, constexprs={(names.index(k),): v for k, v in c.items()}, attrs=div),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})

def ce_types(n):
    if n.endswith("_ptr"):
        return {"targets_ptr": "*i64", "logits_ptr": "*bf16", "dlogits_ptr": "*bf16"}.get(n, "*fp32")
    return "fp32" if n == "softcap" else "i32"

def rq_types(n):
    if n.endswith("_ptr"):
        return "*fp32" if n in ("qr_ptr", "kr_ptr") else "*bf16"
    return "fp32" if n == "eps" else "i32"

for cfg in ce.GPU_CONFIGS:
    for fixed in (True, False):
        compile_(ce._ce_fwd_kernel, cfg, {"FIXED_MAX": fixed}, ce_types)
        compile_(ce._ce_fwd_grad_kernel, cfg, {"FIXED_MAX": fixed}, ce_types)
    compile_(ce._ce_bwd_kernel, cfg, {}, ce_types)
for cfg in rq.GPU_CONFIGS:
    for kernel in (rq._rope_qknorm_fwd_kernel, rq._rope_qknorm_bwd_kernel):
        compile_(kernel, cfg, {"HALF": 64, "BLOCK_D": 64}, rq_types)
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the tests above compile every config for real"
)
def test_memory_bound_kernels_compile_for_sm90(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    if "ptxas" in out.stderr and ("not found" in out.stderr or "No such file" in out.stderr):
        pytest.skip("this Triton install has no ptxas")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
