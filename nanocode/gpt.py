"""The GPT: rotary embeddings, QK RMSNorm, ReLU² MLP, parameter-free RMSNorm, no biases, untied
embedding and head, logit softcap 15, grouped-query attention. Sized by one number, `depth`.

The hot ops go through the `kernels` package (Triton on GPUs, PyTorch references elsewhere;
NANOCODE_KERNELS=torch forces the references). Attention uses FlashAttention 3 or 2 when installed
on CUDA, and PyTorch's SDPA otherwise.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from nanocode.common import nvtx_range

SOFTCAP = 15.0
NORM_EPS = 1e-6

# FlashAttention is never required: use it only when importable (3 = Hopper's, then 2).
try:
    from flash_attn_interface import flash_attn_func as _flash_attn  # FlashAttention 3
except ImportError:
    try:
        from flash_attn import flash_attn_func as _flash_attn  # FlashAttention 2
    except ImportError:
        _flash_attn = None


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int = 2048, n_kv_head: int | None = None):
        """width = 64 * depth, heads of 128 (fewer, wider-than-64 heads when the width is not a multiple of 128)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        n_embd = 64 * depth
        n_head = max(1, (n_embd + 127) // 128)
        while n_embd % n_head or (n_embd // n_head) % 2:
            n_head += 1
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_kv_head, n_embd=n_embd)

    def to_dict(self):
        return asdict(self)


def norm(x):
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


def compute_dtype(x):
    """The dtype the fused kernels run in: autocast's (bf16 on GPUs) when enabled, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def attention(q, k, v, mask=None):
    """Causal attention of q (B, Tq, H, D) over k, v (B, Tk, Hk, D), where q's first position is
    key position Tk - Tq: the queries see every cached key and causally the new ones. `mask`
    (B, 1, Tq, Tk), True = visible, replaces that rule for rows at different positions."""
    Tq, Tk = q.size(1), k.size(1)
    if mask is not None:
        gqa = q.size(2) != k.size(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2)
    if _flash_attn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = _flash_attn(q, k, v, causal=True)  # FA aligns the causal mask bottom-right, as needed here
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    if Tq == Tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif Tq == 1:
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:  # a chunk of queries after a cached prefix: bottom-right aligned causal mask
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)

    def forward(self, x, cos, sin, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        with nvtx_range("rope_qknorm"):
            if cos.dim() == 3:  # per-row positions (B, T, D/2): the kernel takes one (T', D/2) table, so T' = B*T
                q, k = kernels.rope_qknorm(q.view(1, B * T, -1, self.head_dim), k.view(1, B * T, -1, self.head_dim),
                                           cos.flatten(0, 1).to(q.dtype), sin.flatten(0, 1).to(q.dtype), NORM_EPS)
                q, k = q.view(B, T, self.n_head, self.head_dim), k.view(B, T, self.n_kv_head, self.head_dim)
            else:
                q, k = kernels.rope_qknorm(q, k, cos.to(q.dtype), sin.to(q.dtype), NORM_EPS)
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
            mask = getattr(kv_cache, "mask", None)
        with nvtx_range("attention"):
            y = attention(q, k, v.to(q.dtype), mask)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        dt = compute_dtype(x)
        with nvtx_range("relu2_mlp"):
            return kernels.relu2_mlp(x.to(dt), self.c_fc.weight.to(dt), self.c_proj.weight.to(dt))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables cover 10x the training context so generation can run past it.
        self.rotary_len = config.sequence_len * 10
        self.register_buffer("cos", torch.empty(self.rotary_len, config.n_embd // config.n_head // 2), persistent=False)
        self.register_buffer("sin", torch.empty(self.rotary_len, config.n_embd // config.n_head // 2), persistent=False)

    @torch.no_grad()
    def init_rotary(self, base: float = 10000.0):
        """(Re)compute the rotary tables; called by init_weights and after loading a checkpoint
        (they are buffers, not saved state)."""
        head_dim = self.config.n_embd // self.config.n_head
        device = self.lm_head.weight.device
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    @torch.no_grad()
    def init_weights(self):
        """Explicit init after `to_empty`: embeddings N(0, 1), head N(0, 0.001), input projections
        uniform with std C^-0.5, output projections zero (each block starts as the identity)."""
        C = self.config.n_embd
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3) * C ** -0.5
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.init_rotary()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """FLOPs per token of a training step (forward + backward): 6 per non-embedding weight
        (the embedding is a lookup), plus attention's 12 * layers * width * T (QK^T and AV,
        forward and backward, counting the full T x T square as nanochat and PaLM do)."""
        nparams = self.num_params() - self.transformer.wte.weight.numel()
        cfg = self.config
        return 6 * nparams + 12 * cfg.n_layer * cfg.n_embd * cfg.sequence_len

    def setup_optimizers(self, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0,
                         adam_betas=(0.8, 0.95), rank=0, world_size=1):
        """Muon for the blocks' 2-D matrices; AdamW for the embedding and the head, with learning
        rates scaled by 1/sqrt(width/768) so they carry across depths. Returns [adamw, muon]."""
        from nanocode.optim import Muon
        matrix_params = list(self.transformer.h.parameters())
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale),
        ]
        fused = self.lm_head.weight.is_cuda
        adamw = torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay, fused=fused)
        muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, rank=rank, world_size=world_size)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if torch.is_tensor(pos):  # one position per row (B,): the engine's batched tool loop
            pos = pos[:, None] + torch.arange(T, device=pos.device)
            end = int(pos.max()) + 1
        else:
            end = pos + T
        if end > self.rotary_len:
            raise ValueError(f"sequence of {end} tokens exceeds the rotary table ({self.rotary_len})")
        cos, sin = (self.cos[pos], self.sin[pos]) if torch.is_tensor(pos) else (self.cos[pos:end], self.sin[pos:end])
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)
        if targets is None:
            logits = self.lm_head(x).float()
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        dt = compute_dtype(x)
        with nvtx_range("linear_softcap_ce"):
            return kernels.linear_softcap_cross_entropy(
                x.reshape(B * T, -1).to(dt), self.lm_head.weight.to(dt), targets.reshape(B * T),
                softcap=SOFTCAP, ignore_index=-1, reduction=loss_reduction)

    @torch.no_grad()
    def generate(self, tokens, max_tokens, temperature=0.0, top_k=None, seed=42):
        """The plain way: re-run the whole sequence for every new token (no KV cache). Slow, and the
        reference the engine's cached generation is tested against. Yields one token id at a time."""
        device = self.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if temperature > 0:
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()


def build_model(config: GPTConfig, device) -> GPT:
    """Build on the meta device (no memory, no wasted init), then materialize on `device` and init."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
