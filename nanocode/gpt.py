"""The GPT, sized by one number, `depth`: width 64 * depth, heads of 128, MLP 4x the width.

- rotary embeddings (base 100,000, half-split) with QK RMSNorm after the rotation; grouped-query
  attention when n_kv_head < n_head;
- ReLU² MLP; parameter-free RMSNorm after the embedding, before attention and MLP, before the head;
  no biases; untied embedding and head; logits softcapped at 15 (15 * tanh(z / 15));
- value embeddings (ResFormer, Zhou et al. 2024): on alternating layers (the last one included) a
  second embedding of the input tokens is added to V through a per-head gate 2·sigmoid(W x[:32]),
  zero-initialized so that it starts at 1;
- learned per-layer scalars: before block i, x <- resid_lambdas[i]·x + x0_lambdas[i]·x0, where x0
  is the normalized token embedding (init 1 and 0.1);
- sliding-window attention: `window_pattern` tiled over the layers, S = a window of a quarter of the
  context, L = full context, the last layer always L (SSSL: three cheap layers per full one).

The hot ops go through the `kernels` package (Triton on GPUs, PyTorch references elsewhere;
NANOCODE_KERNELS=torch forces the references). Training attention uses FlashAttention 3 or 2 when
installed on CUDA, and PyTorch's SDPA otherwise. With a KV cache (nanocode.engine.KVCache: every row
at its own position) attention is SDPA with the cache's mask.
"""

import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from nanocode.common import compute_dtype, nvtx_range
from nanocode.fp8 import fp8_linear, fp8_relu2_mlp

# Logits live in (-15, 15) however large the head's output grows: tanh softcapping as in Gemma 2
# and modded-nanogpt, at nanochat's 15.
SOFTCAP = 15.0
# One epsilon for every RMSNorm: norm()'s and the rope_qknorm kernel's, which takes it as an
# argument (F.rms_norm's own default would be fp32's machine epsilon, 1.2e-7).
NORM_EPS = 1e-6
VE_GATE_CHANNELS = 32
ROPE_BASE = 100_000.0
# Config keys of the October 2025 recipe's switches, and the values the one recipe left has.
REMOVED_KEYS = {
    "value_embeds": True,
    "lambdas": True,
    "rope_base": ROPE_BASE,
    "embed_init_std": 0.8,
    "mlp_init_scale": 0.4,
}

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
    window_pattern: str = "SSSL"  # per layer, tiled: S = sequence_len // 4 keys back, L = all

    def __post_init__(self):
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern must be S and L letters, got {self.window_pattern!r}")

    @classmethod
    def from_depth(
        cls, depth, vocab_size, sequence_len=2048, n_kv_head=None, window_pattern="SSSL"
    ):
        """width = 64 * depth, heads of 128 (fewer, wider-than-64 heads when the width is not a
        multiple of 128)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        n_embd = 64 * depth
        n_head = max(1, (n_embd + 127) // 128)
        while n_embd % n_head or (n_embd // n_head) % 2:
            n_head += 1
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
        return cls(sequence_len, vocab_size, depth, n_head, n_kv_head, n_embd, window_pattern)

    @classmethod
    def from_dict(cls, d: dict):
        """The config of a checkpoint's or export's "model_config". Older ones also name the
        switches of the October 2025 recipe: dropped when they hold this recipe's values, refused
        otherwise."""
        d = dict(d)
        for key, value in REMOVED_KEYS.items():
            if key in d and (got := d.pop(key)) != value:
                raise ValueError(
                    f"model_config {key}={got!r}: this model was trained with the October 2025 "
                    "recipe, which this version no longer builds"
                )
        return cls(**d)

    def window_sizes(self) -> list[int | None]:
        """Per layer, how many earlier keys each query sees (None: all of them)."""
        pattern = self.window_pattern.upper()
        short = self.sequence_len // 4
        sizes = [short if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layer)]
        sizes[-1] = None
        return sizes

    def has_value_embed(self, layer_idx: int) -> bool:
        """Alternating layers, counted from the last one (which always has one)."""
        return layer_idx % 2 == (self.n_layer - 1) % 2

    def to_dict(self):
        return asdict(self)


def norm(x):
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


# SDPA has no sliding-window kernel, so a banded mask costs more, not less. (Shown once: Python's
# default warning filter shows a warning once per place it is raised from.)
SLOW_WINDOWS = (
    "sliding-window attention without FlashAttention: PyTorch SDPA with a banded mask computes "
    "every query-key pair and loses the fused causal kernel, so windowed layers are slower than "
    "full ones, not faster (CPU, fwd+bwd: 1.16x at T=256, 1.9x at T=2048). On CUDA install "
    "flash-attn; or train with --window-pattern L"
)


def windows_are_slow(config, device) -> bool:
    """True when this config has sliding windows that will run on SDPA's banded mask (no
    FlashAttention)."""
    has_windows = any(w is not None for w in config.window_sizes())
    return has_windows and not (_flash_attn is not None and torch.device(device).type == "cuda")


def sdpa(q, k, v, mask=None, causal=False):
    """PyTorch's attention on (B, T, H, D) tensors; `mask` (True = visible) broadcasts to
    (B, H, Tq, Tk)."""
    gqa = q.size(2) != k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return y.transpose(1, 2)


def attention(q, k, v, window=None):
    """Causal attention of q (B, T, H, D) over k, v (B, T, Hk, D) of the same T positions; with
    `window`, query i sees only keys [i - window, i]."""
    if _flash_attn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        kw = {} if window is None else {"window_size": (window, 0)}  # (keys left, keys right)
        out = _flash_attn(q, k, v, causal=True, **kw)
        return out[0] if isinstance(out, tuple) else out  # some FA3 versions add softmax_lse
    T = q.size(1)
    if window is None or T - 1 <= window:  # no key falls out of any query's window
        return sdpa(q, k, v, causal=True)
    if not torch.compiler.is_compiling():  # base_train warns before compiling (windows_are_slow)
        warnings.warn(SLOW_WINDOWS, stacklevel=2)
    i = torch.arange(T, device=q.device)
    return sdpa(q, k, v, (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - window))


class Linear(nn.Linear):
    """nn.Linear without a bias, its matmuls in FP8 (nanocode.fp8) while training with `fp8` set
    (GPT.enable_fp8); evaluation and inference run in the model's dtype."""

    fp8 = False

    def forward(self, x):
        return fp8_linear(x, self.weight) if self.fp8 and self.training else super().forward(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        """Projections to n_head query heads and n_kv_head key/value heads of head_dim = n_embd /
        n_head (grouped-query when fewer), this layer's window, and, on layers with a value
        embedding, its gate: the first 32 channels of x -> one scalar per kv head."""
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.window = config.window_sizes()[layer_idx]
        C = config.n_embd
        self.c_q = Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(C, C, bias=False)
        # The value embedding's gate reads the first channels of x only: a per-head scalar needs
        # little.
        self.ve_gate = None
        if config.has_value_embed(layer_idx):
            self.ve_gate = nn.Linear(min(C, VE_GATE_CHANNELS), self.n_kv_head, bias=False)

    def forward(self, x, ve, cos, sin, kv_cache):
        """x (B, T, C), normalized -> (B, T, C). ve: this layer's value embedding of the tokens
        (B, T, Hk*D), or None. cos, sin: the rotary rows of the queries' positions, (T, D/2), or
        with a cache (B*T, D/2). Without a cache, causal attention over the T positions; with one,
        the new keys and values go into it and each query sees its row's cached keys."""
        B, T, C = x.shape
        hd = self.head_dim
        if self.c_q.fp8 and self.training:  # one FP8 matmul: x quantized and saved once, not 3x
            w = torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])
            q, k, v = fp8_linear(x, w).split([self.n_head * hd] + [self.n_kv_head * hd] * 2, -1)
        else:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        q, k = q.view(B, T, self.n_head, hd), k.view(B, T, self.n_kv_head, hd)
        v = v.view(B, T, self.n_kv_head, hd)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # 1 at init
            # autocast skips embedding lookups: ve is in the parameters' dtype, v in autocast's
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, hd).to(v.dtype)
        with nvtx_range("rope_qknorm"):
            # The kernel takes one (T', D/2) table for all rows: T' = T, or with a cache B*T (each
            # query its own position), the rows then seen as one sequence.
            n = cos.size(0)
            q_rows, k_rows = q.view(-1, n, self.n_head, hd), k.view(-1, n, self.n_kv_head, hd)
            q, k = kernels.rope_qknorm(q_rows, k_rows, cos.to(q.dtype), sin.to(q.dtype), NORM_EPS)
            q, k = q.view(B, T, self.n_head, hd), k.view(B, T, self.n_kv_head, hd)
        with nvtx_range("attention"):
            if kv_cache is None:
                y = attention(q, k, v.to(q.dtype), self.window)
            else:
                k, v, mask = kv_cache.update(self.layer_idx, k, v, self.window)
                y = sdpa(q, k, v.to(q.dtype), mask)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    fp8 = False  # as Linear's

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        """x (B, T, C) -> (B, T, C) through the fused ReLU² kernel, in the compute dtype
        (autocast's when on): the weights are cast to it, except under FP8, which quantizes them
        from their own dtype."""
        dt, w_fc, w_proj = compute_dtype(x), self.c_fc.weight, self.c_proj.weight
        with nvtx_range("relu2_mlp"):
            if self.fp8 and self.training:  # FP8 reads the weights in their own dtype
                return fp8_relu2_mlp(x.to(dt), w_fc, w_proj)
            return kernels.relu2_mlp(x.to(dt), w_fc.to(dt), w_proj.to(dt))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        """The modules, their tensors uninitialized: build_model makes them on the meta device,
        then init_weights fills them. value_embeds are keyed by layer index (a string, as
        ModuleDict needs) on the layers that have one; cos and sin are buffers left out of the
        state dict (init_rotary recomputes them)."""
        super().__init__()
        self.config = config
        vocab = config.vocab_size
        wte = nn.Embedding(vocab, config.n_embd)
        blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.transformer = nn.ModuleDict({"wte": wte, "h": blocks})
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        ve_layers = [str(i) for i in range(config.n_layer) if config.has_value_embed(i)]
        self.value_embeds = nn.ModuleDict({i: nn.Embedding(vocab, kv_dim) for i in ve_layers})
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        # Rotary tables cover 10x the training context so generation can run past it.
        self.rotary_len = config.sequence_len * 10
        half = config.n_embd // config.n_head // 2
        self.register_buffer("cos", torch.empty(self.rotary_len, half), persistent=False)
        self.register_buffer("sin", torch.empty(self.rotary_len, half), persistent=False)

    @torch.no_grad()
    def init_rotary(self):
        """(Re)compute the rotary tables; called by init_weights and after loading a checkpoint
        (they are buffers, not saved state). Base 100,000 (Llama 3, Qwen) rotates the slowest pairs
        less than 10,000 does, so they still tell positions apart across long contexts."""
        head_dim = self.config.n_embd // self.config.n_head
        device = self.lm_head.weight.device
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (ROPE_BASE ** (channels / head_dim))
        t = torch.arange(self.rotary_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    @torch.no_grad()
    def init_weights(self):
        """Explicit init after `to_empty`: embedding N(0, 0.8), head N(0, 0.001), input projections
        uniform with std C^-0.5 (the MLP's 0.4x that), output projections zero (each block starts as
        the identity), value embeddings like c_v, their gates zero, lambdas 1 (residual) and 0.1
        (x0)."""
        # forward RMS-normalizes the lookup, so this std never reaches the blocks: it only sets how
        # large an Adam step (about lr per entry) is next to a row
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        # logits of std ~0.001·sqrt(C) (x has RMS 1): near-uniform first predictions, loss ~ln(V)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        # U(-b, b) has std b/sqrt(3), so this b gives std C^-0.5; uniform rather than normal for
        # its lack of outliers (nanochat's init)
        bound = math.sqrt(3) * self.config.n_embd**-0.5
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -bound * 0.4, bound * 0.4)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        self.init_rotary()

    def enable_fp8(self):
        """Train the blocks' matmuls in FP8 (base_train --fp8): attention's four projections
        and the MLP. The embeddings, the head (fused into the cross-entropy kernel) and the value
        embeddings' gates (32 x heads) stay in the model's dtype, as evaluation does."""
        kv = self.config.n_kv_head * (self.config.n_embd // self.config.n_head)
        if kv % 16:  # the width 64 * depth always is
            raise ValueError(f"FP8 needs n_kv_head x head_dim to be a multiple of 16, not {kv}")
        for module in self.transformer.h.modules():
            if isinstance(module, (Linear, MLP)):
                module.fp8 = True

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
        # a window (T // 4) is always shorter than the context
        keys = [cfg.sequence_len if w is None else w for w in cfg.window_sizes()]
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
    ):
        """Muon for the blocks' 2-D matrices, with cautious weight decay; AdamW (no weight decay)
        for the rest, each kind with its own learning rate: the embedding and the value embeddings
        and the head scaled by 1/sqrt(width/768) so they carry across depths, the residual scalars
        at scalar_lr/100 and the x0 scalars at scalar_lr with beta1 0.96 (nanochat's). Returns
        [adamw, muon]."""
        from nanocode.optim import Muon

        # Every block parameter is a 2-D matrix (no biases, parameter-free norms), the value
        # embeddings' gates included, so Muon takes them all. Embeddings, head and scalars stay on
        # AdamW: Muon is for hidden layers (Keller Jordan's Muon write-up, found empirically).
        matrix_params = list(self.transformer.h.parameters())
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale),
            dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale),
            dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, adam_betas[1])),
        ]
        fused = self.lm_head.weight.is_cuda
        # eps 1e-10 (nanochat's), not 1e-8: eps must stay far below sqrt(v), or it shrinks the steps
        # of parameters whose gradients are tiny
        adamw = torch.optim.AdamW(
            adam_groups, betas=adam_betas, eps=1e-10, weight_decay=0.0, fused=fused
        )
        # each of world_size ranks orthogonalizes its share of the matrices
        more = dict(rank=rank, world_size=world_size, weight_decay=weight_decay)
        muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, **more)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """Logits (B, T, V), or the loss when `targets` are given. With `kv_cache` (fed by the
        engine: see nanocode.engine.KVCache) each row's tokens sit at that row's own positions."""
        B, T = idx.shape
        if kv_cache is None:
            end, cos, sin = T, self.cos[:T], self.sin[:T]
        else:  # one table row per query: (B*T, D/2)
            pos = kv_cache.pos.flatten()
            end, cos, sin = kv_cache.end, self.cos[pos], self.sin[pos]
        if end > self.rotary_len:
            raise ValueError(
                f"sequence of {end} tokens exceeds the rotary table ({self.rotary_len})"
            )
        x = x0 = norm(self.transformer.wte(idx))
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, kv_cache)
        x = norm(x)
        if targets is None:  # (the loss path below never materializes the logits)
            logits = self.lm_head(x).float()  # fp32 for the softcap and the sampler's softmax
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        dt = compute_dtype(x)
        with nvtx_range("linear_softcap_ce"):
            return kernels.linear_softcap_cross_entropy(
                x.reshape(B * T, -1).to(dt),
                self.lm_head.weight.to(dt),
                targets.reshape(B * T),
                softcap=SOFTCAP,
                ignore_index=-1,  # targets a stage does not train on (SFT: all but the assistant's)
                reduction=loss_reduction,
            )


def build_model(config: GPTConfig, device) -> GPT:
    """Build on the meta device (no memory, no wasted init), then materialize on `device`, init."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
