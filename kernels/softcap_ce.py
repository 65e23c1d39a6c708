"""Softcapped cross-entropy, and fused linear + softcapped cross-entropy without the logits.

(The Triton kernels arrive with the kernels II issue; until then the references serve.)
"""
import torch
import torch.nn.functional as F

from kernels.common import check, check_same


def softcap_cross_entropy_reference(logits, targets, softcap=15.0, ignore_index=-1, reduction="mean"):
    z = softcap * torch.tanh(logits.float() / softcap)
    return F.cross_entropy(z, targets, ignore_index=ignore_index, reduction=reduction)


def linear_softcap_cross_entropy_reference(x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean"):
    return softcap_cross_entropy_reference(x @ weight.T, targets, softcap, ignore_index, reduction)


def softcap_cross_entropy(logits, targets, softcap=15.0, ignore_index=-1, reduction="mean"):
    check(logits.ndim == 2, "softcap_cross_entropy", f"logits must be (N, V), got {tuple(logits.shape)}")
    check(targets.shape == logits.shape[:1], "softcap_cross_entropy", f"targets must be (N,), got {tuple(targets.shape)}")
    return softcap_cross_entropy_reference(logits, targets, softcap, ignore_index, reduction)


def linear_softcap_cross_entropy(x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean"):
    fn = "linear_softcap_cross_entropy"
    check(x.ndim == 2 and weight.ndim == 2, fn, f"x must be (N, C) and weight (V, C), got {tuple(x.shape)}, {tuple(weight.shape)}")
    check(x.shape[1] == weight.shape[1], fn, f"x has {x.shape[1]} features, weight {weight.shape[1]}")
    check(targets.shape == x.shape[:1], fn, f"targets must be (N,), got {tuple(targets.shape)}")
    check_same(fn, ("x", x), ("weight", weight))
    return linear_softcap_cross_entropy_reference(x, weight, targets, softcap, ignore_index, reduction)
