"""Fused RoPE + QK RMSNorm: out = rms_norm(rope(x)) per head, for q and k.

(The Triton kernel arrives with the kernels I issue; until then the reference serves.)
"""
import torch

from kernels.common import check, check_same


def rope_qknorm_reference(q, k, cos, sin, eps=1e-6):
    """q (B, T, Hq, D), k (B, T, Hk, D), cos/sin (T, D/2). Half-split RoPE, then RMSNorm over D."""
    def one(x):
        d = x.shape[-1] // 2
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        x1, x2 = x[..., :d], x[..., d:]
        y = torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], dim=-1)
        return torch.nn.functional.rms_norm(y, (y.shape[-1],), eps=eps)
    return one(q), one(k)


def _check_inputs(q, k, cos, sin):
    fn = "rope_qknorm"
    check(q.ndim == 4 and k.ndim == 4, fn, f"q and k must be (B, T, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    check(q.shape[-1] == k.shape[-1], fn, f"head dims differ: q {q.shape[-1]}, k {k.shape[-1]}")
    check(q.shape[-1] % 2 == 0, fn, f"head dim must be even for half-split RoPE, got {q.shape[-1]}")
    check(q.shape[:2] == k.shape[:2], fn, f"q and k batch/time differ: {tuple(q.shape[:2])} vs {tuple(k.shape[:2])}")
    T, half = q.shape[1], q.shape[-1] // 2
    check(cos.shape == (T, half) and sin.shape == (T, half), fn,
          f"cos/sin must be (T, D/2) = {(T, half)}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    check_same(fn, ("q", q), ("k", k), ("cos", cos), ("sin", sin))


def rope_qknorm(q, k, cos, sin, eps=1e-6):
    _check_inputs(q, k, cos, sin)
    return rope_qknorm_reference(q, k, cos, sin, eps)
