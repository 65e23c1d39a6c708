"""The GPT: rotary embeddings (base 100,000), QK RMSNorm, ReLU² MLP, parameter-free RMSNorm, no biases,
untied embedding and head, logit softcap 15, grouped-query attention. Sized by one number, `depth`.

On top of that, three small additions from modded-nanogpt and nanochat's current recipe:
- value embeddings (ResFormer, Zhou et al. 2024): on alternating layers (the last one included) a
  second embedding of the input tokens is added to V through a per-head gate 2·sigmoid(W x[:32]),
  zero-initialized so that it starts at 1;
- learned per-layer scalars: before block i, x <- resid_lambdas[i]·x + x0_lambdas[i]·x0, where x0 is
  the normalized token embedding (init 1 and 0.1);
- sliding-window attention: `window_pattern` tiled over the layers, S = a window of a quarter of the
  context, L = full context, the last layer always L (SSSL: three cheap layers per full one).
Each can be switched off in GPTConfig (the October 2025 recipe: value_embeds=False, lambdas=False,
window_pattern="L", rope_base=10000, embed_init_std=1.0, mlp_init_scale=1.0).

The hot ops go through the `kernels` package (Triton on GPUs, PyTorch references elsewhere;
NANOCODE_KERNELS=torch forces the references). Attention uses FlashAttention 3 or 2 when installed
on CUDA, and PyTorch's SDPA otherwise.
"""

import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from nanocode.common import nvtx_range

SOFTCAP = 15.0
NORM_EPS = 1e-6
VE_GATE_CHANNELS = 32

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
    window_pattern: str = (
        "SSSL"  # per layer, tiled: S = sequence_len // 4 keys back, L = full; last layer L
    )
    value_embeds: bool = True
    lambdas: bool = True  # per-layer residual and x0 scalars
    rope_base: float = 100_000.0
    embed_init_std: float = 0.8
    mlp_init_scale: float = 0.4  # c_fc's init std relative to the other input matrices

    def __post_init__(self):
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(
                f"window_pattern must be a string of S and L, got {self.window_pattern!r}"
            )

    @classmethod
    def from_depth(
        cls,
        depth: int,
        vocab_size: int,
        sequence_len: int = 2048,
        n_kv_head: int | None = None,
        **recipe,
    ):
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
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_kv_head,
            n_embd=n_embd,
            **recipe,
        )

    def window_sizes(self) -> list[int | None]:
        """Per layer, how many earlier keys each query sees (None: all of them)."""
        pattern = self.window_pattern.upper()
        sizes = [
            self.sequence_len // 4 if pattern[i % len(pattern)] == "S" else None
            for i in range(self.n_layer)
        ]
        sizes[-1] = None
        return sizes

    def has_value_embed(self, layer_idx: int) -> bool:
        """Alternating layers, counted from the last one (which always has one)."""
        return self.value_embeds and layer_idx % 2 == (self.n_layer - 1) % 2

    def to_dict(self):
        return asdict(self)


def norm(x):
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


def compute_dtype(x):
    """The dtype the fused kernels run in: autocast's (bf16 on GPUs) when enabled, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_warned_slow_windows = False


def _warn_slow_windows():
    """Once per process: SDPA has no sliding-window kernel, so a banded mask costs more, not less."""
    global _warned_slow_windows
    if not _warned_slow_windows:
        _warned_slow_windows = True
        warnings.warn(
            "sliding-window attention without FlashAttention: PyTorch SDPA with a banded mask computes "
            "every query-key pair and loses the fused causal kernel, so windowed layers are slower than "
            "full ones, not faster (CPU, fwd+bwd: 1.16x at T=256, 1.9x at T=2048). On CUDA install "
            "flash-attn; or train with --window-pattern L",
            stacklevel=3,
        )


def windows_are_slow(config, device) -> bool:
    """True when this config has sliding windows that will run on SDPA's banded mask (no FlashAttention)."""
    has_windows = any(w is not None and w < config.sequence_len for w in config.window_sizes())
    return has_windows and not (_flash_attn is not None and torch.device(device).type == "cuda")


def attention(q, k, v, pos, window=None, mask=None):
    """Causal attention of q (B, Tq, H, D) over k, v (B, Tk, Hk, D), where q's first position is
    key position `pos` (Tk = pos + Tq): the queries see every cached key and causally the new ones,
    or with `window` only the keys at most `window` positions back (query i sees keys [i - window, i]).
    `mask` (B, 1, Tq, Tk), True = visible, replaces the causal rule for rows at different positions
    (then `pos` is a (B,) tensor of each row's first query position)."""
    if mask is not None:
        if window is not None:
            qpos = pos.to(mask.device)[:, None] + torch.arange(
                q.size(1), device=mask.device
            )  # (B, Tq)
            mask = (
                mask
                & (torch.arange(k.size(1), device=mask.device) >= qpos[:, :, None] - window)[
                    :, None
                ]
            )
        gqa = q.size(2) != k.size(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=gqa
        )
        return y.transpose(1, 2)
    if _flash_attn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        # FA aligns the causal mask (and the window) bottom-right, as needed here
        kw = {} if window is None else {"window_size": (window, 0)}
        out = _flash_attn(q, k, v, causal=True, **kw)
        return out[0] if isinstance(out, tuple) else out
    if (
        window is not None and pos + q.size(1) - 1 > window
    ):  # some key falls out of some query's window
        start = max(0, pos - window)  # keys before this one are out of every query's window
        k, v, pos = k[:, start:], v[:, start:], pos - start
    else:
        window = None
    Tq, Tk = q.size(1), k.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    if window is not None and Tq > 1:
        if (
            not torch.compiler.is_compiling()
        ):  # base_train warns before compiling (windows_are_slow)
            _warn_slow_windows()
        qpos = torch.arange(pos, pos + Tq, device=q.device)[:, None]
        kpos = torch.arange(Tk, device=q.device)[None, :]
        mask = (kpos <= qpos) & (kpos >= qpos - window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    elif Tq == Tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif Tq == 1:  # one query: every key left (after the window's cut) is visible
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
        self.window = config.window_sizes()[layer_idx]
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        # The value embedding's gate reads the first channels of x only: a per-head scalar needs little.
        self.ve_gate = (
            nn.Linear(min(C, VE_GATE_CHANNELS), self.n_kv_head, bias=False)
            if config.has_value_embed(layer_idx)
            else None
        )

    def forward(self, x, ve, cos, sin, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(
                self.ve_gate(x[..., : self.ve_gate.in_features])
            )  # (B, T, Hk), 1 at init
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        with nvtx_range("rope_qknorm"):
            if (
                cos.dim() == 3
            ):  # per-row positions (B, T, D/2): the kernel takes one (T', D/2) table, so T' = B*T
                q, k = kernels.rope_qknorm(
                    q.view(1, B * T, -1, self.head_dim),
                    k.view(1, B * T, -1, self.head_dim),
                    cos.flatten(0, 1).to(q.dtype),
                    sin.flatten(0, 1).to(q.dtype),
                    NORM_EPS,
                )
                q, k = (
                    q.view(B, T, self.n_head, self.head_dim),
                    k.view(B, T, self.n_kv_head, self.head_dim),
                )
            else:
                q, k = kernels.rope_qknorm(q, k, cos.to(q.dtype), sin.to(q.dtype), NORM_EPS)
        pos, mask = 0, None
        if kv_cache is not None:
            pos, mask = kv_cache.pos, getattr(kv_cache, "mask", None)
            k, v = kv_cache.update(self.layer_idx, k, v)
        with nvtx_range("attention"):
            y = attention(q, k, v.to(q.dtype), pos, self.window, mask)
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

    def forward(self, x, ve, cos, sin, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(config.vocab_size, kv_dim)
                for i in range(config.n_layer)
                if config.has_value_embed(i)
            }
        )
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        # Rotary tables cover 10x the training context so generation can run past it.
        self.rotary_len = config.sequence_len * 10
        self.register_buffer(
            "cos",
            torch.empty(self.rotary_len, config.n_embd // config.n_head // 2),
            persistent=False,
        )
        self.register_buffer(
            "sin",
            torch.empty(self.rotary_len, config.n_embd // config.n_head // 2),
            persistent=False,
        )

    @torch.no_grad()
    def init_rotary(self):
        """(Re)compute the rotary tables; called by init_weights and after loading a checkpoint
        (they are buffers, not saved state). Base 100,000 (Llama 3, Qwen) rotates the slowest pairs
        less than 10,000 does, so they still tell positions apart across long contexts."""
        head_dim = self.config.n_embd // self.config.n_head
        device = self.lm_head.weight.device
        base = self.config.rope_base
        inv_freq = 1.0 / (
            base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        )
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    @torch.no_grad()
    def init_weights(self):
        """Explicit init after `to_empty`: embedding N(0, 0.8), head N(0, 0.001), input projections
        uniform with std C^-0.5 (the MLP's 0.4x that), output projections zero (each block starts as
        the identity), value embeddings like c_v, their gates zero, lambdas 1 (residual) and 0.1 (x0)."""
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=cfg.embed_init_std)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3) * cfg.n_embd**-0.5
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.uniform_(
                block.mlp.c_fc.weight, -bound * cfg.mlp_init_scale, bound * cfg.mlp_init_scale
            )
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        if cfg.lambdas:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.1)
        self.init_rotary()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """The parameters a tokens:params ratio counts: the blocks' matrices and the head, not the
        embeddings (lookups) nor the scalars (nanochat's scaling-law fits are cleanest this way)."""
        return sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()

    def estimate_flops(self) -> float:
        """FLOPs per token of a training step (forward + backward): 6 per matmul weight (blocks and
        head; embeddings are lookups), plus attention's 12 * width * keys per layer (QK^T and AV,
        forward and backward, counting the full T x T square as nanochat and PaLM do; a windowed
        layer counts its window)."""
        cfg = self.config
        keys = [
            cfg.sequence_len if w is None else min(w, cfg.sequence_len) for w in cfg.window_sizes()
        ]
        return 6 * self.num_scaling_params() + 12 * cfg.n_embd * sum(keys)

    def setup_optimizers(
        self,
        matrix_lr=0.02,
        embedding_lr=0.2,
        unembedding_lr=0.004,
        weight_decay=0.0,
        adam_betas=(0.8, 0.95),
        rank=0,
        world_size=1,
        scalar_lr=0.5,
        ns_coeffs=None,
    ):
        """Muon for the blocks' 2-D matrices, with cautious weight decay; AdamW (no weight decay) for
        the rest, each kind with its own learning rate: the embedding and the value embeddings and
        the head scaled by 1/sqrt(width/768) so they carry across depths, the residual scalars at
        scalar_lr/100 and the x0 scalars at scalar_lr with beta1 0.96 (nanochat's). Returns [adamw, muon]."""
        from nanocode.optim import Muon

        matrix_params = list(self.transformer.h.parameters())
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale),
        ]
        if self.value_embeds:
            adam_groups.append(
                dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale)
            )
        if self.config.lambdas:
            adam_groups.append(dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01))
            adam_groups.append(
                dict(params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, adam_betas[1]))
            )
        fused = self.lm_head.weight.is_cuda
        adamw = torch.optim.AdamW(
            adam_groups, betas=adam_betas, eps=1e-10, weight_decay=0.0, fused=fused
        )
        muon = Muon(
            matrix_params,
            lr=matrix_lr,
            momentum=0.95,
            weight_decay=weight_decay,
            rank=rank,
            world_size=world_size,
            **({} if ns_coeffs is None else {"ns_coeffs": ns_coeffs}),
        )
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
            raise ValueError(
                f"sequence of {end} tokens exceeds the rotary table ({self.rotary_len})"
            )
        cos, sin = (
            (self.cos[pos], self.sin[pos])
            if torch.is_tensor(pos)
            else (self.cos[pos:end], self.sin[pos:end])
        )
        x = x0 = norm(self.transformer.wte(idx))
        for i, block in enumerate(self.transformer.h):
            if self.config.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)
        if targets is None:
            logits = self.lm_head(x).float()
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        dt = compute_dtype(x)
        with nvtx_range("linear_softcap_ce"):
            return kernels.linear_softcap_cross_entropy(
                x.reshape(B * T, -1).to(dt),
                self.lm_head.weight.to(dt),
                targets.reshape(B * T),
                softcap=SOFTCAP,
                ignore_index=-1,
                reduction=loss_reduction,
            )

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
