"""The GPT (its KV-cache path too), Muon and checkpoints. CPU, fp32, PyTorch references."""

import pytest
import torch

from nanocode.checkpoint import load_checkpoint, save_checkpoint
from nanocode.common import NanocodeError
from nanocode.engine import KVCache
from nanocode.gpt import GPT, GPTConfig, build_model
from nanocode.optim import Muon


def expected_params(depth, vocab, n_kv_head=None):
    cfg = GPTConfig.from_depth(depth, vocab, 64, n_kv_head)
    C, L, hd = cfg.n_embd, cfg.n_layer, cfg.n_embd // cfg.n_head
    kv = cfg.n_kv_head * hd
    per_layer = (
        C * C + 2 * C * kv + C * C + 4 * C * C + 4 * C * C
    )  # q, k+v, attn proj, mlp fc, mlp proj
    ve_layers = (L + 1) // 2  # alternating, counted from the last layer
    gate = (
        min(C, 32) * cfg.n_kv_head
    )  # each value embedding's gate: 32 channels -> one scalar per kv head
    ve_params = ve_layers * (vocab * kv + gate)
    lambda_params = 2 * L  # resid and x0 scalars
    return 2 * vocab * C + L * per_layer + ve_params + lambda_params


@pytest.mark.parametrize(
    "depth,n_kv_head", [(1, None), (2, None), (3, None), (4, 1), (12, None), (20, 5)]
)
def test_param_count_matches_formula(depth, n_kv_head):
    vocab = 1000
    cfg = GPTConfig.from_depth(depth, vocab, 64, n_kv_head)
    with torch.device("meta"):
        model = GPT(cfg)
    assert cfg.n_embd == 64 * depth
    assert model.num_params() == expected_params(depth, vocab, n_kv_head)
    # the scaling count (tokens:params ratio): blocks' matrices (gates included) and the head only
    C, L = cfg.n_embd, cfg.n_layer
    embeddings = vocab * C + (L + 1) // 2 * vocab * cfg.n_kv_head * (C // cfg.n_head)
    assert model.num_scaling_params() == model.num_params() - embeddings - 2 * L
    if depth in (12, 20):
        assert cfg.n_embd // cfg.n_head == 128


def test_bad_config():
    with pytest.raises(ValueError, match="depth"):
        GPTConfig.from_depth(0, 100)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig.from_depth(4, 100, 64, n_kv_head=3)
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")


def test_config_from_dict_reads_old_checkpoints():
    """A config saved before the recipe switches went: read when they hold the one recipe's values,
    refused (naming the key) when they hold the October 2025 recipe's."""
    cfg = GPTConfig.from_depth(2, 100, 64, window_pattern="SL")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    old = dict(
        cfg.to_dict(),
        value_embeds=True,
        lambdas=True,
        rope_base=100000.0,
        embed_init_std=0.8,
        mlp_init_scale=0.4,
    )
    assert GPTConfig.from_dict(old) == cfg
    for key, value in [("lambdas", False), ("rope_base", 10000.0), ("mlp_init_scale", 1.0)]:
        with pytest.raises(ValueError, match=f"{key}=.*October 2025 recipe"):
            GPTConfig.from_dict(dict(old, **{key: value}))
    with pytest.raises(TypeError, match="colour"):
        GPTConfig.from_dict(dict(old, colour="blue"))


def tiny_model(depth=2, vocab=97, T=32, n_kv_head=None, seed=0):
    torch.manual_seed(seed)
    return build_model(GPTConfig.from_depth(depth, vocab, T, n_kv_head), "cpu")


def test_forward_shapes_and_softcap():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 97) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0
    loss = model(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    per_tok = model(idx, idx, loss_reduction="none")
    assert per_tok.shape == (3 * 17,)
    torch.testing.assert_close(per_tok.mean(), loss)
    # ignored targets (-1) do not count
    tgt = idx.clone()
    tgt[:, :5] = -1
    per_tok = model(idx, tgt, loss_reduction="none")
    assert (per_tok.view(3, 17)[:, :5] == 0).all()


def test_causality():
    """Changing a later token never changes earlier logits."""
    model = tiny_model(depth=3)
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.normal_(0, 0.1)  # zero-init would hide leaks
        model.transformer.h[0].mlp.c_proj.weight.normal_(0, 0.1)
    idx = torch.randint(0, 97, (1, 20))
    a = model(idx)
    idx2 = idx.clone()
    idx2[0, 12] = (idx2[0, 12] + 1) % 97
    b = model(idx2)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_overfits_one_batch():
    model = tiny_model(depth=2, vocab=61, T=32)
    adamw, muon = model.setup_optimizers(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.02)
    torch.manual_seed(1)
    x = torch.randint(0, 61, (4, 32))
    y = torch.roll(x, -1, dims=1)
    first = None
    for _ in range(150):
        loss = model(x, y)
        loss.backward()
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        first = first if first is not None else loss.item()
    assert first > 3.5  # ~ln(61) at init
    assert loss.item() < 0.2, f"did not overfit: {first:.3f} -> {loss.item():.3f}"


def test_muon_update_is_orthogonal():
    """One Muon step from zero momentum moves a matrix by lr * NS(grad): its singular values ~ 1."""
    for shape in [(64, 48), (48, 64), (96, 96)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape)
        opt = Muon([p], lr=1.0, momentum=0.0, nesterov=False)
        opt.step()
        scale = max(1.0, shape[0] / shape[1]) ** 0.5
        s = torch.linalg.svdvals(-p.detach() / scale)
        # The quintic coefficients put singular values in roughly [0.68, 1.13] after 5 steps, except
        # the few tiniest of the gradient (a random square matrix has one near 0), which grow but
        # lag behind.
        assert s.max() < 1.2 and torch.quantile(s, 0.05) > 0.6, (
            shape,
            s.min().item(),
            s.max().item(),
        )
        assert (s - 1).abs().mean() < 0.2


def test_muon_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    save_checkpoint(
        tmp_path, 5, sd, {"x": torch.arange(3)}, {"model_config": model.config.to_dict()}
    )
    ms, os_, meta = load_checkpoint(tmp_path, load_optim=True)
    assert meta["step"] == 5 and torch.equal(os_["x"], torch.arange(3))
    for k in sd:
        assert torch.equal(ms[k], sd[k])
    assert not list(tmp_path.glob(".*tmp*")), "temp files left behind"
    # truncate the model file: one clear error naming it
    f = tmp_path / "model_000005.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(NanocodeError, match="model_000005.pt"):
        load_checkpoint(tmp_path)
    # same size but garbage bytes
    f.write_bytes(b"\0" * len(data))
    with pytest.raises(NanocodeError, match="corrupt.*model_000005.pt"):
        load_checkpoint(tmp_path)
    (tmp_path / "meta_000005.json").write_text("{not json")
    with pytest.raises(NanocodeError, match="meta_000005.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(NanocodeError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def test_kv_cache_rows_at_their_own_lengths():
    """feed() names the rows and where their new tokens go; update() writes there and returns the
    fed rows' keys up to the longest row, with the mask of what each query sees (None: all)."""
    cache = KVCache(batch_size=3, num_layers=1, max_len=6)
    k = torch.randn(3, 2, 1, 4)
    cache.feed([0, 1, 2], [0, 0, 0], 2)
    keys, values, mask = cache.update(0, k, k)
    assert torch.equal(keys, k) and mask[:, 0].tolist() == [[[True, False], [True, True]]] * 3
    cache.feed([2, 0], [2, 1], 1)  # row 2 at position 2, row 0 rewrites its position 1
    new = torch.randn(2, 1, 1, 4)
    keys, _, mask = cache.update(0, new, new)
    assert torch.equal(keys[0], torch.cat([k[2], new[0]])) and torch.equal(keys[1, 1], new[1, 0])
    assert mask[:, 0, 0].tolist() == [[True, True, True], [True, True, False]]
    cache.feed([0, 1], [3, 3], 1)  # one query per row at one position: no mask
    assert cache.update(0, new, new)[2] is None
    cache.feed([1], [2], 1)
    _, _, mask = cache.update(0, new[:1], new[:1], window=1)  # keys [1, 2]: the window cut key 0
    assert mask is None and cache.update(0, new[:1], new[:1], window=1)[0].shape[1] == 2
    cache.copy(1, [2], 3)
    assert torch.equal(cache.k[0][2, :3], cache.k[0][1, :3])
    with pytest.raises(ValueError, match="KV cache overflow"):
        cache.feed([0], [5], 2)


def windowed_model(seed=0):
    """Depth 3 at T = 32, windows of 8 keys on the first two layers, GQA, every weight nonzero."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=32, vocab_size=53, n_layer=3, n_head=2, n_kv_head=1, n_embd=32)
    model = build_model(config, "cpu")
    with torch.no_grad():  # zero-initialized projections would hide what attention does
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def test_cached_positions_match_the_full_forward():
    """The KV cache path: rows at their own lengths, fed chunks (a prompt, a tool's output) and
    single tokens, decoding past several windows, give the logits of each row's full forward."""
    model = windowed_model()
    assert model.config.window_sizes() == [8, 8, None]
    seqs = torch.randint(0, 53, (2, 30))
    with torch.no_grad():
        full = model(seqs)
        cache = KVCache(2, model.config.n_layer, 32)
        # row 0: 5 + 1 + 12 + 1 ... ; row 1: 13 + 1 + 1 ...; then both together, one token each
        feeds = [([0], [0], 5), ([1], [0], 13), ([0, 1], [5, 13], 1), ([0], [6], 12)]
        feeds += [([0, 1], [18 + i, 14 + i], 1) for i in range(8)]
        for rows, starts, T in feeds:
            cache.feed(rows, starts, T)
            idx = torch.stack([seqs[r, s : s + T] for r, s in zip(rows, starts)])
            out = model(idx, kv_cache=cache)
            for b, (r, s) in enumerate(zip(rows, starts)):
                torch.testing.assert_close(out[b], full[r, s : s + T], atol=1e-5, rtol=1e-5)
