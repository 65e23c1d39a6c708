"""torch.compile with the default Inductor backend over the whole model, on the CPU, as
base_train runs it on GPUs: the PyTorch reference kernels, and the Triton kernels (under
TRITON_INTERPRET=1 here; custom ops, so Inductor compiles around them and the interpreter runs
them). fullgraph=True: a graph break anywhere in the model's forward or backward fails the test.
The NVTX ranges of --profile are on in these tests (a real NVTX call, which Dynamo cannot trace,
behind nvtx_range)."""

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from nanocode import common
from nanocode.gpt import GPTConfig, build_model

VOCAB, T, B = 97, 32, 2
# the kernel modules (kernels.rope_qknorm etc. name the functions the package exports)
rope_mod, mlp_mod, ce_mod = (
    importlib.import_module(f"kernels.{m}") for m in ("rope_qknorm", "relu2_mlp", "softcap_ce")
)


@pytest.fixture
def nvtx_on(monkeypatch):
    """--profile's ranges, through an `nvtx` module whose annotate is torch's own NVTX range (a call
    into torch._C that Dynamo cannot put in a graph)."""
    if not hasattr(torch._C, "_nvtx"):
        pytest.skip("this torch build has no NVTX")
    nvtx = types.ModuleType("nvtx")
    nvtx.annotate = torch.cuda.nvtx.range
    monkeypatch.setitem(sys.modules, "nvtx", nvtx)
    common.set_nvtx(True)
    yield
    common.set_nvtx(False)


def count_calls(monkeypatch, module, name, counts):
    real = getattr(module, name)
    kernel = module.__name__.split(".")[-1]

    def counted(*args, **kwargs):
        key = kernel + (f" mode {args[0]}" if name == "_launch_ce" else "")  # FWD, FWD_GRAD, BWD
        counts[key] = counts.get(key, 0) + 1
        return real(*args, **kwargs)

    # the custom ops look their launchers up at call time
    monkeypatch.setattr(module, name, counted)


# "torch": Inductor compiles every op to C++ (~25 s of CPU, cold cache); "triton": only the glue
# around the custom ops, whose kernels the interpreter runs.
@pytest.mark.parametrize("impl", [pytest.param("torch", marks=pytest.mark.slow), "triton"])
def test_whole_model_under_inductor_matches_eager(monkeypatch, nvtx_on, impl):
    monkeypatch.setenv("NANOCODE_KERNELS", impl)
    assert impl == "torch" or os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    counts = {}
    # rope's and the MLP's _launch run once per launch of a forward and a backward kernel (one
    # rope launch for q and k); a training loss with gradients takes the CE kernel that writes
    # the gradient in its pass.
    for module, name in [(rope_mod, "_launch"), (mlp_mod, "_launch"), (ce_mod, "_launch_ce")]:
        count_calls(monkeypatch, module, name, counts)
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, VOCAB, T), "cpu")
    with torch.no_grad():  # off the init, whose zero output projections give many zero gradients
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randint(0, VOCAB, (B, T)), torch.randint(0, VOCAB, (B, T))

    loss_eager = model(x, y)
    loss_eager.backward()
    grads_eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # default backend: inductor
    loss = compiled(x, y)
    loss.backward()

    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        g = grads_eager[n]
        assert g.abs().max() > 0, f"{n}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=n)
    if impl == "triton":  # the Triton kernels really ran, in eager and inside the compiled graph
        assert set(counts) == {"rope_qknorm", "relu2_mlp", f"softcap_ce mode {ce_mod.FWD_GRAD}"}
        for kernel in ("rope_qknorm", "relu2_mlp"):  # forward and backward, eager and compiled
            assert counts[kernel] % 2 == 0 and counts[kernel] >= 4, counts
    else:
        assert counts == {}, counts


def test_nvtx_ranges_are_real_outside_compile(nvtx_on):
    """The guard is for compilation only: eager code still opens the range (profile runs without
    --compile keep their per-op ranges)."""
    assert common.nvtx_range("x") is not None
    assert not isinstance(common.nvtx_range("x"), type(common.contextlib.nullcontext()))


@pytest.mark.slow
def test_base_train_compile_and_profile_on_cpu(tmp_path, monkeypatch, nvtx_on):
    """scripts.base_train --compile 1 --profile --device-type cpu, a tiny run end to end: it trains
    (loss falls a little over 8 steps) and checkpoints."""
    import scripts.base_train as base_train
    from nanocode.checkpoint import checkpoint_dir, load_checkpoint
    from nanocode.dataset import ShardWriter, data_dir
    from nanocode.tokenizer import Tokenizer

    monkeypatch.setenv("NANOCODE_BASE_DIR", str(tmp_path))
    texts = [
        p.read_text(errors="replace") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:30]
    ]
    writer = ShardWriter(data_dir("code"), shard_chars=200_000, val_fraction=0.1, seed=0)
    for t in texts:
        writer.add(t, "python")
    writer.close()
    Tokenizer.train(texts, vocab_size=300).save(tmp_path / "tokenizer")
    try:
        base_train.main(
            [
                "--depth",
                "1",
                "--max-seq-len",
                "32",
                "--device-batch-size",
                "2",
                "--total-batch-size",
                "64",
                "--eval-tokens",
                "64",
                "--sample-every",
                "-1",
                "--eval-every",
                "-1",
                "--num-iterations",
                "8",
                "--device-type",
                "cpu",
                "--compile",
                "1",
                "--profile",
                "--model-tag",
                "compiled",
            ]
        )
    finally:
        common.set_nvtx(False)
    _, _, meta = load_checkpoint(checkpoint_dir("base", "compiled"))
    losses = [loss for _, loss in meta["curves"]["loss"]]
    assert meta["step"] == 8 and len(losses) == 8 and all(loss == loss for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
