"""The pretraining recipe: horizon/batch/LR/WD arithmetic, schedules, cautious weight decay,
sliding-window attention against a masked reference (through the KV cache: tests/test_model.py).
CPU, fp32."""

import math

import pytest
import torch

from nanocode.gpt import GPT, GPTConfig, attention, build_model
from nanocode.optim import Muon
from scripts.base_train import lr_multiplier, muon_momentum, training_plan


def scaling_params(depth, vocab=32768):
    with torch.device("meta"):
        return GPT(GPTConfig.from_depth(depth, vocab)).num_scaling_params()


def test_scaling_params_by_hand():
    # d12: width 768, 6 heads of 128; per layer q, k, v, proj (4 C^2) + MLP (8 C^2); value-embedding
    # gates (6 kv heads x 32 channels) on layers 1, 3, ..., 11; head 768 x 32768.
    assert scaling_params(12) == 12 * 12 * 768**2 + 6 * 6 * 32 + 768 * 32768 == 110_101_632
    # d20: width 1280, 10 heads; gates (10 x 32) on layers 1, 3, ..., 19.
    assert scaling_params(20) == 20 * 12 * 1280**2 + 10 * 10 * 32 + 1280 * 32768 == 435_162_240


def test_training_plan_d12_is_the_reference():
    tokens, batch, lr_scale, wd = training_plan(110_101_632, 110_101_632, 12)
    assert tokens == 12 * 110_101_632 == 1_321_219_584
    assert batch == 2**19 and lr_scale == 1.0 and wd == pytest.approx(0.28)


def test_training_plan_d20():
    tokens, batch, lr_scale, wd = training_plan(435_162_240, 110_101_632, 12)
    assert tokens == 5_221_946_880
    # D / D12 = 3.9523; 2**19 * 3.9523**0.383 = 887,490 -> log2 19.76 -> 2**20
    assert batch == 2**20
    assert lr_scale == pytest.approx(math.sqrt(2))
    # 0.28 * sqrt(2) / 3.9523 = 0.10019
    assert wd == pytest.approx(0.100187, rel=1e-4)


def test_training_plan_given_batch_keeps_lr_and_wd():
    tokens, batch, lr_scale, wd = training_plan(
        435_162_240, 110_101_632, 12, total_batch_size=2**17
    )
    assert (tokens, batch, lr_scale, wd) == (5_221_946_880, 2**17, 1.0, 0.28)


def test_lr_schedule():
    n = 1000  # warmup 40, warmdown over the last 650 steps to 5%
    assert lr_multiplier(0, n, 40, 0.65, 0.05) == pytest.approx(1 / 40)
    assert lr_multiplier(39, n, 40, 0.65, 0.05) == 1.0
    assert lr_multiplier(350, n, 40, 0.65, 0.05) == 1.0
    assert lr_multiplier(675, n, 40, 0.65, 0.05) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier(1000, n, 40, 0.65, 0.05) == pytest.approx(0.05)


def test_muon_momentum_schedule():
    n = 2000  # warmdown starts at step 700
    assert muon_momentum(0, n, 0.65) == pytest.approx(0.85)
    assert muon_momentum(150, n, 0.65) == pytest.approx(0.90)
    assert muon_momentum(300, n, 0.65) == pytest.approx(0.95)
    assert muon_momentum(700, n, 0.65) == pytest.approx(0.95)
    assert muon_momentum(1350, n, 0.65) == pytest.approx(0.925)
    assert muon_momentum(2000, n, 0.65) == pytest.approx(0.90)


def test_cautious_weight_decay_never_opposes_the_update():
    """Same state, one Muon step with and without weight decay: the decay's displacement is zero or
    points the way the update moves the weight, and it shrinks exactly what the update shrinks."""
    torch.manual_seed(0)
    w0, g = torch.randn(48, 64), torch.randn(48, 64)
    steps = {}
    for wd in (0.0, 0.5):
        p = torch.nn.Parameter(w0.clone())
        p.grad = g.clone()
        Muon([p], lr=0.1, momentum=0.0, nesterov=False, weight_decay=wd).step()
        steps[wd] = p.detach() - w0
    update, decay = steps[0.0], steps[0.5] - steps[0.0]
    assert (decay * update >= 0).all(), "weight decay moved a weight against its update"
    agree = update * w0 < 0  # the update pulls the weight toward zero
    torch.testing.assert_close(decay[agree], -0.1 * 0.5 * w0[agree])
    assert (decay[~agree] == 0).all()
    assert 0.3 < agree.float().mean() < 0.7  # both cases really occur


def reference_attention(q, k, v, window):
    """Plain softmax attention with an explicit mask: query i sees keys i - window <= j <= i."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (j >= i - window if window is not None else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window,H,Hk", [(None, 2, 2), (5, 2, 2), (5, 4, 2), (0, 2, 1), (40, 2, 2)])
def test_window_attention_matches_masked_reference(window, H, Hk):
    torch.manual_seed(0)
    T, D = 24, 16
    q = torch.randn(2, T, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, T, Hk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, T, Hk, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, T, H, D, dtype=torch.float64)
    out = attention(q, k, v, window)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = reference_attention(q, k, v, window)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def windowed_model(window_pattern="SL", T=32):
    torch.manual_seed(0)
    model = build_model(
        GPTConfig(
            sequence_len=T,
            vocab_size=53,
            n_layer=3,
            n_head=2,
            n_kv_head=1,
            n_embd=32,
            window_pattern=window_pattern,
        ),
        "cpu",
    )
    with torch.no_grad():  # zero-initialized projections would hide what attention does
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.2)
            block.mlp.c_proj.weight.normal_(0, 0.2)
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.normal_(0, 0.5)
    return model


def test_windows_per_layer():
    assert GPTConfig(sequence_len=256, n_layer=6).window_sizes() == [64, 64, 64, None, 64, None]
    assert GPTConfig(sequence_len=256, n_layer=3, window_pattern="L").window_sizes() == [None] * 3
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")


def test_window_changes_the_function():
    """The windowed layers really drop far keys: a token more than a window back changes the last
    position's logits through full layers only, so a model with all-short windows but the last
    (full) differs from a full-attention one with the same weights."""
    idx = torch.randint(0, 53, (1, 32))
    windowed, full = windowed_model("S"), windowed_model("L")
    full.load_state_dict(windowed.state_dict())
    with torch.no_grad():
        assert not torch.allclose(windowed(idx), full(idx))
        # within the first window (8 keys) the two agree
        torch.testing.assert_close(windowed(idx[:, :9]), full(idx[:, :9]))


def test_value_embeds_and_lambdas_get_gradients():
    model = windowed_model()
    idx = torch.randint(0, 53, (2, 16))
    model(idx, idx).backward()
    assert set(model.value_embeds.keys()) == {"0", "2"}  # alternating, the last layer included
    for name in (
        "resid_lambdas",
        "x0_lambdas",
        "value_embeds.2.weight",
        "transformer.h.2.attn.ve_gate.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_optimizer_groups_cover_every_parameter_once():
    model = windowed_model()
    adamw, muon = model.setup_optimizers(weight_decay=0.1)
    seen = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(map(id, seen))) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in adamw.param_groups)
    assert all(g["weight_decay"] == 0.1 for g in muon.param_groups)
    x0_group = next(g for g in adamw.param_groups if g["params"][0] is model.x0_lambdas)
    assert x0_group["betas"][0] == 0.96


def test_windows_are_slow_without_flash_attention():
    from nanocode.gpt import windows_are_slow

    assert windows_are_slow(GPTConfig(sequence_len=256, n_layer=4), "cpu")
    assert not windows_are_slow(GPTConfig(sequence_len=256, n_layer=4, window_pattern="L"), "cpu")
    assert not windows_are_slow(
        GPTConfig(sequence_len=256, n_layer=1), "cpu"
    )  # the last layer is always full
