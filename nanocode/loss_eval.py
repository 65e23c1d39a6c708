"""Loss over target tokens, summed: bits per byte (pretraining, base_eval) and the mean loss per
token (SFT's held-out loss) are the same sums divided differently.

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
def loss_sums(model, batches, device, token_bytes=None, groups: int = 1) -> torch.Tensor:
    """(groups, 3): nats, bytes and tokens summed per group over the targets of `batches`, which
    yield (inputs, targets) or (inputs, targets, group ids), each (B, T); base_eval's groups are
    languages. Without token_bytes (V,) every target counts as one byte. Under DDP the sums are
    all-reduced, so every rank must call this and gets the global sums."""
    # float64: millions of per-token losses added in fp32 lose digits (~1e-7 relative per add)
    sums = torch.zeros(groups, 3, dtype=torch.float64, device=device)
    for x, y, *group in batches:
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.reshape(-1)
        # clamp: an ignored target (-1) would index the last token; (y >= 0) then zeroes its bytes
        valid = y >= 0
        nbytes = valid.double() if token_bytes is None else token_bytes[y.clamp(min=0)] * valid
        counted = nbytes > 0  # a special-token target (0 bytes) adds no nats with no bytes
        rows = torch.stack([loss * counted, nbytes.double(), counted.double()], dim=1)
        sums.index_add_(0, group[0].reshape(-1) if group else torch.zeros_like(y), rows)
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums


def bpb(nats: float, nbytes: float) -> float:
    return nats / (math.log(2) * nbytes) if nbytes else float("nan")


def evaluate_bpb(model, batches, token_bytes: torch.Tensor) -> float:
    """Bits per byte over `batches` of (inputs, targets); token_bytes (V,) on the model's device."""
    nats, nbytes, _ = loss_sums(model, batches, token_bytes.device, token_bytes)[0].tolist()
    return bpb(nats, nbytes)
