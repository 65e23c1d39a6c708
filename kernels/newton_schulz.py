"""Newton-Schulz quintic orthogonalization for Muon.

(The Triton kernel arrives with the kernels II issue; until then the reference serves.)
"""
import torch

from kernels.common import check

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz_reference(G, steps=5, dtype=torch.bfloat16):
    """A = X Xᵀ; X <- a X + (b A + c A A) X, on the last two dims, batched over the rest."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X


def newton_schulz(G, steps=5, dtype=torch.bfloat16):
    check(G.ndim >= 2, "newton_schulz", f"G must have at least 2 dims, got {tuple(G.shape)}")
    return newton_schulz_reference(G, steps, dtype)
