"""Muon for the 2-D block matrices (AdamW, from PyTorch, trains the rest), and the gradient
all-reduce that data parallelism needs.

Muon: Nesterov momentum, then the update is orthogonalized by Newton-Schulz (kernels.newton_schulz),
so every direction of the matrix moves by about the same amount; the step is scaled by
sqrt(max(1, rows/cols)). Weight decay is cautious (Chen et al. 2025, "Cautious Weight Decay"): a
weight decays only where the update already pulls it toward zero (update and weight of the same
sign), so decay never pushes a weight against what its gradient asks for; it is decoupled and
scaled by the (scheduled) learning rate, so it decays with the LR schedule.
Same-shape matrices are stacked and orthogonalized in one batched call.
Under DDP each rank orthogonalizes only its share of each stack and the results are all-gathered,
so the Newton-Schulz work is split across ranks instead of repeated on each.
"""

import math

import torch
import torch.distributed as dist

import kernels


class Muon(torch.optim.Optimizer):
    def __init__(
        self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, rank=0, world_size=1
    ):
        """params: 2-D tensors only (ValueError otherwise), put in one group per shape.
        weight_decay: cautious and scaled by lr (the module docstring). rank, world_size: under
        DDP, which share of each stack this rank orthogonalizes (_orthogonalize)."""
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError(
                f"Muon trains 2-D matrices only, got shapes {[p.shape for p in params]}"
            )
        # One group per shape (in order of first appearance): one batched Newton-Schulz call each.
        shapes = list(dict.fromkeys(tuple(p.shape) for p in params))
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self):
        """Per shape group: its gradients stacked (n, rows, cols), one momentum buffer for the
        stack (kept in the state of the group's first parameter), the (Nesterov) momentum update
        orthogonalized in one batched call, then p -= lr·sqrt(max(1, rows/cols))·u for each
        parameter's slice u, with cautious weight decay. Every parameter needs a .grad."""
        for group in self.param_groups:
            params = group["params"]
            grads = torch.stack([p.grad for p in params])
            state = self.state[params[0]]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grads)
            buf = state["momentum_buffer"]
            # An average (m·buf + (1-m)·g), not SGD's sum (m·buf + g): at a fixed m they differ only
            # by the factor 1-m, which Newton-Schulz's normalization divides away.
            buf.lerp_(grads, 1 - group["momentum"])
            update = grads.lerp_(buf, group["momentum"]) if group["nesterov"] else buf
            update = self._orthogonalize(update)
            rows, cols = params[0].shape
            # An orthogonalized (rows, cols) update has entries of RMS ~1/sqrt(max(rows, cols)); the
            # factor makes that 1/sqrt(cols) for tall matrices too (modded-nanogpt's scaling).
            lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
            wd = group["weight_decay"]
            for p, u in zip(params, update):
                u = u.to(p.dtype)
                if wd:
                    u = u + wd * p * (u * p >= 0)  # p -= lr * u: decay only where u has p's sign
                p.add_(u, alpha=-lr)

    def _orthogonalize(self, update):
        """Newton-Schulz with its default (Polar Express) coefficients, 5 steps."""
        # bf16 on GPUs, as modded-nanogpt and nanochat run it: the iteration only needs to bring
        # singular values near 1; fp32 on the CPU, as the model runs there
        ns_dtype = torch.bfloat16 if update.is_cuda else torch.float32
        n, world = update.size(0), self.world_size
        if world == 1:
            return kernels.newton_schulz(update, dtype=ns_dtype)
        # Rank r orthogonalizes matrices [r*per, (r+1)*per) of the stack (zero-padded to world*per);
        # every rank then holds all results after the all-gather.
        per = math.ceil(n / world)
        padded = update.new_zeros((per * world, *update.shape[1:]))
        padded[:n] = update
        mine = padded[self.rank * per : (self.rank + 1) * per]
        mine = kernels.newton_schulz(mine, dtype=ns_dtype)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine.contiguous())
        return torch.cat(gathered)[:n]


def all_reduce_gradients(model, world_size):
    """Average gradients across ranks (gloo has no AVG, so SUM then divide). Issued asynchronously,
    all at once, then waited on."""
    if world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    works = [dist.all_reduce(g, op=dist.ReduceOp.SUM, async_op=True) for g in grads]
    for g, work in zip(grads, works):
        work.wait()
        g.div_(world_size)
