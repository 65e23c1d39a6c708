"""Bits per byte: the validation loss in a unit that does not depend on the tokenizer.

Sum the loss (nats) over target tokens and the UTF-8 bytes those tokens stand for; special tokens
(0 bytes) and ignored targets (-1) count for neither. bpb = nats / (ln 2 * bytes).
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor) -> float:
    """`batches` yields (inputs, targets) of shape (B, T); token_bytes (V,) on the model's device.
    Under DDP the sums are all-reduced, so every rank gets the global value."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += (loss * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
