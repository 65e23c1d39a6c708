"""The distributed paths with 2 gloo processes on the CPU (torch.distributed.run --standalone), each
against the same computation in one process:
- Muon's sharded Newton-Schulz (each rank orthogonalizes its share of a stack, then all-gather);
- evaluate_bpb's all-reduce (2 ranks on half the batches each == 1 rank on all of them);
- code_eval's problem sharding and gather (2 ranks == 1 rank, same per-sample results, same order).
- DDP gradients: 2 processes == 1 process with 2x gradient accumulation.
The scripts join and leave through compute_init/run_main, as the real scripts do (run_main's early
exit keeps torch's gloo teardown from aborting a finished process). Disjoint dataloader shards are
in test_dataloader.py."""

import json

import pytest

from tests.helpers import torchrun

DDP_SCRIPT = r"""
import os, sys, torch
from nanocode.common import compute_init, run_main
from nanocode.gpt import GPTConfig, build_model
from nanocode.optim import all_reduce_gradients

def main():
    _, rank, _, world, _ = compute_init("cpu")
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, 53, 16), "cpu")
    opts = model.setup_optimizers(rank=rank, world_size=world)
    g = torch.Generator().manual_seed(123)
    data = torch.randint(0, 53, (6, 4, 17), generator=g)  # 6 steps x (2 micro-batches of 2 rows)
    for step in range(3):
        batch = data[2 * step: 2 * step + 2]              # two micro-batches per step
        micro = [batch[rank]] if world > 1 else list(batch)
        for mb in micro:
            loss = model(mb[:, :-1], mb[:, 1:])
            (loss / len(micro)).backward()
        all_reduce_gradients(model, world)
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(sys.argv[1], f"world{world}.pt"))

run_main(main)
"""


def test_two_gloo_processes_equal_grad_accumulation(tmp_path):
    """DDP: 2 processes on one micro-batch each == 1 process accumulating both (all-reduce)."""
    import torch

    from nanocode.gpt import GPTConfig, build_model

    torchrun(DDP_SCRIPT, tmp_path, nproc=1)
    torchrun(DDP_SCRIPT, tmp_path, nproc=2)
    a, b = torch.load(tmp_path / "world1.pt"), torch.load(tmp_path / "world2.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    start = build_model(GPTConfig.from_depth(2, 53, 16), "cpu").state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a if "c_proj" in k), (
        "parameters did not move"
    )


MUON_SCRIPT = r"""
import torch, torch.distributed as dist
from nanocode.common import compute_init, run_main
from nanocode.optim import Muon
_, rank, _, world, _ = compute_init("cpu")

def make():
    # 3 matrices of one shape (odd: the stack is zero-padded to 4 for 2 ranks), 1 tall, 2 wide
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 24)] * 3 + [(40, 8)] + [(8, 40)] * 2
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    return params, grads

def train(world_size):
    params, grads = make()
    opt = Muon(params, lr=0.05, rank=rank if world_size > 1 else 0, world_size=world_size)
    for step_grads in grads:                       # 3 steps: momentum state matters too
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]

def main():
    sharded, single = train(world), train(1)
    start = make()[0]
    for a, b, p0 in zip(sharded, single, start):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert not torch.equal(a, p0.detach()), "parameter did not move"
    # both ranks hold the full result
    out = [None] * world
    dist.all_gather_object(out, [t.sum().item() for t in sharded])
    assert out[0] == out[1]
    if rank == 0:
        print("MUON_OK", len(sharded))

run_main(main)
"""


def test_sharded_newton_schulz_equals_single_process(tmp_path):
    assert "MUON_OK 6" in torchrun(MUON_SCRIPT, tmp_path)


BPB_SCRIPT = r"""
import json, sys, torch, torch.distributed as dist
from nanocode.common import compute_init, run_main
from nanocode.gpt import GPTConfig, build_model
from nanocode.loss_eval import evaluate_bpb
torch.manual_seed(0)
V = 61
model = build_model(GPTConfig.from_depth(2, V, 16), "cpu")
torch.nn.init.normal_(model.lm_head.weight, std=0.1)          # a non-uniform prediction
g = torch.Generator().manual_seed(1)
token_bytes = torch.randint(1, 5, (V,), generator=g)
token_bytes[:3] = 0                                             # special tokens count no bytes
batches = []
for i in range(4):
    x = torch.randint(0, V, (3, 16), generator=g)
    y = torch.randint(0, V, (3, 16), generator=g)
    y[0, :5] = -1                                               # ignored targets
    batches.append((x, y))

def main():
    single = evaluate_bpb(model, batches, token_bytes)          # before the process group exists
    _, rank, _, world, _ = compute_init("cpu")
    sharded = evaluate_bpb(model, batches[rank::world], token_bytes)
    dist.destroy_process_group()
    if rank == 0:
        mine_only = evaluate_bpb(model, batches[0::2], token_bytes)
        print("BPB", json.dumps([single, sharded, mine_only]))

run_main(main)
"""


def test_sharded_bpb_equals_single_process(tmp_path):
    out = torchrun(BPB_SCRIPT, tmp_path).splitlines()
    line = next(line for line in out if line.startswith("BPB "))
    single, sharded, rank0_alone = json.loads(line[4:])
    assert sharded == pytest.approx(single, rel=1e-9)
    assert rank0_alone != pytest.approx(
        single, rel=1e-6
    )  # the all-reduce mattered: half the data differs


def test_code_eval_sharding_equals_single_process(tmp_path):
    """Score the same samples (every 3rd problem's canonical solution, an empty body for the others)
    with 1 and 2 processes: identical per-sample results in the problems' order, the same pass@1."""
    from nanocode.code_tasks import load_humaneval

    problems = load_humaneval()[:7]
    records = [
        {
            "task_id": p["task_id"],
            "completion": p["canonical_solution"] if i % 3 == 0 else "    pass\n",
        }
        for i, p in enumerate(problems)
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in records))
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"res{nproc}"
        stdout = torchrun(
            [
                "-m",
                "scripts.code_eval",
                "--samples",
                str(samples),
                "--max-problems",
                "7",
                "--workers",
                "1",
                "--out",
                str(out),
            ],
            tmp_path,
            nproc=nproc,
        )
        assert stdout.strip().splitlines()[-1] == "pass@1: 0.4286"  # 3 of 7
        outs[nproc] = [
            (r["task_id"], r["passed"]) for r in map(json.loads, open(f"{out}_samples.jsonl"))
        ]
    assert outs[1] == outs[2] == [(p["task_id"], i % 3 == 0) for i, p in enumerate(problems)]
