"""ReLU² MLP: relu(x @ w_fc.T)² @ w_proj.T.

(The Triton kernel arrives with the kernels I issue; until then the reference serves.)
"""
import torch

from kernels.common import check, check_same


def relu2_mlp_reference(x, w_fc, w_proj):
    return torch.relu(x @ w_fc.T).square() @ w_proj.T


def _check_inputs(x, w_fc, w_proj):
    fn = "relu2_mlp"
    check(w_fc.ndim == 2 and w_proj.ndim == 2, fn, "w_fc and w_proj must be 2-D")
    H, C = w_fc.shape
    check(x.shape[-1] == C, fn, f"x has {x.shape[-1]} features but w_fc is {tuple(w_fc.shape)} (H, C)")
    check(tuple(w_proj.shape) == (C, H), fn, f"w_proj must be (C, H) = {(C, H)}, got {tuple(w_proj.shape)}")
    check_same(fn, ("x", x), ("w_fc", w_fc), ("w_proj", w_proj))


def relu2_mlp(x, w_fc, w_proj):
    _check_inputs(x, w_fc, w_proj)
    return relu2_mlp_reference(x, w_fc, w_proj)
