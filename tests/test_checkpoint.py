"""Checkpoints: what loads where (weights to the device, the rest to the CPU), safe loading, and the
meta-written-last rule, also under DDP (2 gloo processes) when a rank dies between the files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanocode.checkpoint import list_steps, load_checkpoint, save_checkpoint
from nanocode.common import NanocodeError
from nanocode.dataloader import DataLoader
from nanocode.gpt import GPTConfig, build_model

REPO = Path(__file__).resolve().parent.parent


class StubTokenizer:  # all a DataLoader's state needs (no batches are drawn here)
    bos_id, vocab_size = 0, 97


def train_state(model):
    """What base_train saves per rank: optimizer states after one step, a loader state holding
    buffered documents, and the RNG state."""
    opts = model.setup_optimizers()
    model(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))).backward()
    for o in opts:
        o.step()
    loader = DataLoader(StubTokenizer(), 2, 16)
    loader._state["buffer"] = (np.arange(5, dtype=np.int32), np.arange(7, dtype=np.int32))
    return (
        opts,
        loader,
        {
            "optimizers": [o.state_dict() for o in opts],
            "loader": loader.state_dict(),
            "rng": {"cpu": torch.get_rng_state()},
        },
    )


def test_weights_go_to_the_device_and_the_rest_to_the_cpu(tmp_path):
    """Resume on a GPU: the weights are mapped to the device, the loader and RNG state must stay CPU
    tensors (the loader calls .numpy(), torch.set_rng_state takes a CPU ByteTensor). The "meta"
    device stands in for CUDA: a CPU-only test of the same split (with everything mapped to the
    device, as before, loading the loader state fails)."""
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, 97, 16), "cpu")
    opts, loader, state = train_state(model)
    save_checkpoint(
        tmp_path, 3, model.state_dict(), state, {"model_config": model.config.to_dict()}
    )
    model_state, optim_state, meta = load_checkpoint(tmp_path, device="meta", load_optim=True)
    assert meta["step"] == 3
    assert all(t.device.type == "meta" for t in model_state.values())
    tensors = [optim_state["rng"]["cpu"], optim_state["loader"]["buffer_tokens"]]
    tensors += [
        v
        for s in optim_state["optimizers"]
        for st in s["state"].values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    ]
    assert tensors and all(t.device.type == "cpu" for t in tensors)

    fresh = DataLoader(StubTokenizer(), 2, 16)
    fresh.load_state_dict(optim_state["loader"])
    assert [d.tolist() for d in fresh._state["buffer"]] == [list(range(5)), list(range(7))]
    torch.set_rng_state(optim_state["rng"]["cpu"])
    for o, sd in zip(model.setup_optimizers(), optim_state["optimizers"]):
        o.load_state_dict(sd)  # moves its state to the parameters' device itself


def test_loading_runs_no_pickled_code(tmp_path):
    """weights_only loading: a file that pickles an object (code that would run on load) is refused
    with one clear error, whatever its size says."""
    model = build_model(GPTConfig.from_depth(1, 97, 16), "cpu")
    save_checkpoint(tmp_path, 1, model.state_dict(), None, {"model_config": model.config.to_dict()})
    f = tmp_path / "model_000001.pt"
    torch.save({"w": torch.zeros(2), "payload": StubTokenizer()}, f)
    meta = tmp_path / "meta_000001.json"
    m = json.loads(meta.read_text())
    m["files"]["model_000001.pt"] = (
        f.stat().st_size
    )  # the size matches: only the content is refused
    meta.write_text(json.dumps(m))
    with pytest.raises(NanocodeError, match="corrupt.*model_000001.pt"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("crash_on", ["model", "meta"])
def test_crash_between_files_keeps_the_previous_step(tmp_path, monkeypatch, crash_on):
    """A crash after the optimizer file (before the model) or after the model (before the meta):
    the step never becomes the latest, the previous one still loads."""
    import nanocode.checkpoint as ckpt

    model = build_model(GPTConfig.from_depth(1, 97, 16), "cpu")
    meta = {"model_config": model.config.to_dict()}
    save_checkpoint(tmp_path, 1, model.state_dict(), {"x": torch.ones(1)}, meta)
    real = ckpt._atomic_write

    def crashing(path, write_fn):
        if path.name.startswith(crash_on):
            raise OSError("simulated crash")
        return real(path, write_fn)

    monkeypatch.setattr(ckpt, "_atomic_write", crashing)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, model.state_dict(), {"x": torch.ones(1)}, meta)
    assert list_steps(tmp_path) == [1]
    _, optim_state, m = load_checkpoint(tmp_path, load_optim=True)
    assert m["step"] == 1 and torch.equal(optim_state["x"], torch.ones(1))


DDP_CRASH = r"""
import os, sys, time, torch
from nanocode.checkpoint import save_checkpoint
from nanocode.common import compute_init, run_main

def main():
    _, rank, _, world, _ = compute_init("cpu")
    d = sys.argv[1]
    model_state = {"w": torch.full((4,), 1.0)} if rank == 0 else None
    save_checkpoint(d, 1, model_state, {"rank": torch.tensor(rank)}, {"model_config": {}}, rank)
    if rank == 1:  # dies before writing its step-2 file, once rank 0 wrote its own and the model
        for _ in range(600):
            if os.path.exists(os.path.join(d, "model_000002.pt")):
                break
            time.sleep(0.1)
        os._exit(7)
    save_checkpoint(d, 2, model_state, {"rank": torch.tensor(rank)}, {"model_config": {}}, rank)

run_main(main)
"""


def test_ddp_meta_waits_for_every_rank(tmp_path):
    """Under DDP rank 0 writes the meta only after a barrier: rank 1 dying before its optimizer file
    leaves step 1 (complete on both ranks) the latest, never a step-2 meta lacking rank 1's file."""
    script = tmp_path / "crash.py"
    script.write_text(DDP_CRASH)
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--local-addr=127.0.0.1",
            "--nproc_per_node=2",
            str(script),
            str(ckpt),
        ],
        env=env,
        cwd=REPO,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0, "rank 1 was meant to die"
    assert (ckpt / "model_000002.pt").exists(), (
        f"rank 0 should have got as far as its files:\n{p.stderr[-2000:]}"
    )
    assert list_steps(ckpt) == [1]
    for rank in (0, 1):
        _, optim_state, meta = load_checkpoint(ckpt, rank=rank, load_optim=True)
        assert meta["step"] == 1 and int(optim_state["rank"]) == rank


def test_save_training_and_resume_restore_everything(tmp_path):
    """The one save/resume of every training stage: model, optimizer state, RNG and a `stateful`
    object (base_train's data loader) come back as saved; a final (model-only) checkpoint is not
    resumable; a run that differs in what the schedule depends on is refused, naming the key."""
    from nanocode.checkpoint import resume, save_training

    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(1, 97, 16), "cpu")
    opts, loader, _ = train_state(model)
    meta = {"model_config": model.config.to_dict(), "num_steps": 10}
    save_training(tmp_path, 4, model, opts, meta, stateful={"loader": loader})
    rng_after_save = torch.rand(3)
    save_training(tmp_path, 10, model, opts, meta, resumable=False)

    torch.manual_seed(1)
    fresh = build_model(GPTConfig.from_depth(1, 97, 16), "cpu")
    fresh_opts, fresh_loader = fresh.setup_optimizers(), DataLoader(StubTokenizer(), 2, 16)
    saved = resume(tmp_path, fresh, fresh_opts, "cpu", stateful={"loader": fresh_loader}, **meta)
    assert saved["step"] == 4  # the step-10 checkpoint holds no optimizer state
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    for a, b in zip(opts, fresh_opts):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and all(
            torch.equal(x, sb[i][k]) for i, s in sa.items() for k, x in s.items()
        )
    assert [d.tolist() for d in fresh_loader._state["buffer"]] == [list(range(5)), list(range(7))]
    assert torch.equal(torch.rand(3), rng_after_save)
    with pytest.raises(NanocodeError, match="has num_steps 10, this run has 20"):
        resume(tmp_path, fresh, fresh_opts, "cpu", num_steps=20)
    with pytest.raises(NanocodeError, match="no checkpoint to resume from"):
        resume(tmp_path / "none", fresh, fresh_opts, "cpu")
