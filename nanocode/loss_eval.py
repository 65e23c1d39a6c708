"""Bits per byte: the validation loss in a unit that does not depend on the tokenizer.

Sum the loss (nats) over target tokens and the UTF-8 bytes those tokens stand for; special tokens
(0 bytes) and ignored targets (-1) count for neither. bpb = nats / (ln 2 * bytes).

Why bytes and not tokens: a tokenizer with a larger vocab has fewer, harder tokens per file, so loss
per token rewards vocab size as much as modelling; the loss per byte of the same text does not, and
it compares across tokenizers and with other models' published bpb.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor) -> float:
    """`batches` yields (inputs, targets) of shape (B, T); token_bytes (V,) on the model's device.
    Under DDP the sums are all-reduced, so every rank gets the global value."""
    device = token_bytes.device
    # float64 sums: millions of per-token losses added in fp32 lose digits (~1e-7 relative per add)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        counted = (
            nbytes > 0
        )  # a special-token target (0 bytes) must not add nats with no bytes to divide by
        total_nats += (loss * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
