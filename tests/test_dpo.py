"""DPO: the loss matches a hand computation, a side's log-prob counts only the reply's assistant
tokens, and a short run goes end to end."""

import contextlib
import json
import math

import pytest
import torch

from nanocode import synth, synth_pairs
from nanocode.conversations import write_jsonl
from scripts.code_dpo import dpo_loss
from tests.helpers import nudged_model, preference_pairs, reference_step, trajectories

NO_NLL = ["--nll-weight", "0"]  # the loop above has no NLL term on the chosen side


def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    rc, rr = torch.tensor([-2.0, -4.0]), torch.tensor([-2.5, -2.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 0: h = (-1 + 2) - (-3 + 2.5) = 1.5 -> -log sigmoid(0.75); pair 1: h = 0 -> log 2
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.exp(-0.75)), math.log(2.0)]))
    torch.testing.assert_close(cr, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(rj, torch.tensor([-0.25, 0.0]))
    # ipo: per-token log-ratios (2 and 4 tokens): h' = 1/2 - (-0.5/4) = 0.625, target 1/(2*0.5) = 1
    losses, _, _ = dpo_loss(
        pc[:1],
        pr[:1],
        rc[:1],
        rr[:1],
        beta=0.5,
        loss_type="ipo",
        nc=torch.tensor([2.0]),
        nr=torch.tensor([4.0]),
    )
    torch.testing.assert_close(losses, torch.tensor([0.140625]))
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(pc, pr, rc, rr, 0.5, "hinge")


@pytest.fixture(scope="module")
def funcs(stdlib_functions):
    return stdlib_functions(30, 200)


@pytest.fixture(scope="module")
def pairs(funcs):
    with (
        pytest.MonkeyPatch.context() as mp
    ):  # single-turn records: every pair's prompt fits the 512-token rows
        mp.setattr(synth, "FOLLOWUP_RATE", 0.0)
        recs = trajectories(8, 0, funcs, ["explain", "write_run", "test_fix", "edit"])
    return preference_pairs(recs, 0)


@pytest.fixture(scope="module")
def tokenizer(module_base_dir, funcs, pairs):
    tokenizer_mod = pytest.importorskip("nanocode.tokenizer")
    tok = tokenizer_mod.Tokenizer.train(
        [f["src"] for f in funcs] + [json.dumps(p) for p in pairs], vocab_size=600
    )
    tok.save(module_base_dir / "tokenizer")
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    return nudged_model(2, tokenizer.vocab_size, 512)


def test_side_logp_counts_only_the_reply(tokenizer, model, pairs):
    from scripts.code_dpo import render_side, side_logps

    p = pairs[0]
    ids, mask = render_side(tokenizer, p["prompt"], p["chosen"], 512)
    n_prompt = len(tokenizer.render_for_completion(p["prompt"]))
    full_ids, full_mask = tokenizer.render_conversation(
        {"messages": p["prompt"]["messages"] + [p["chosen"]]}
    )
    assert (
        mask[:n_prompt] == [0] * n_prompt
        and mask[n_prompt:] == list(full_mask)[n_prompt : len(ids)]
    )
    logp, n = side_logps(model, [(ids, mask)], tokenizer.bos_id, "cpu", torch.no_grad())
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
    manual = sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids)) if mask[i])
    assert n.item() == sum(mask[1:])
    assert abs(logp.item() - manual) < 1e-3 * max(1.0, abs(manual))


def test_dpo_short_run_end_to_end(module_base_dir, tokenizer, model, pairs):
    from nanocode.checkpoint import checkpoint_dir, list_steps, save_checkpoint
    from scripts import code_dpo

    save_checkpoint(
        checkpoint_dir("sft", "d2"),
        5,
        model.state_dict(),
        None,
        {"model_config": model.config.to_dict()},
    )
    write_jsonl(module_base_dir / "sft" / "dpo_train.jsonl", pairs[:6])
    write_jsonl(module_base_dir / "sft" / "dpo_val.jsonl", pairs[6:])
    code_dpo.main(
        ["--model-tag", "d2", "--steps", "2", "--batch-size", "2", "--device-type", "cpu"]
    )
    assert list_steps(checkpoint_dir("dpo", "d2")) == [2]
    report = json.loads((module_base_dir / "report" / "dpo.json").read_text())
    assert (
        report["val_before"]["reward_accuracy"] == 0.0 and report["val_before"]["ties"] == 1.0
    )  # policy == reference
    assert len(report["curves"]["loss"]) == 2 and report["val_pairs"] == len(pairs) - 6
    assert set(report["val_after"]["reward_accuracy_by_kind"]) <= set(synth_pairs.PAIR_KINDS)


def reference_dpo_losses(
    model,
    pairs,
    steps,
    batch_size,
    seed,
    beta,
    pad_id,
    matrix_lr=0.02,
    embedding_lr=0.2,
    unembedding_lr=0.004,
    init_lr_frac=0.02,
):
    """DPO's training loop as it was written out in scripts/code_dpo.py before SFT, DPO and RL
    shared nanocode/training.py (one process, sigmoid loss, no NLL term): reference log-probs from
    the start model, a fresh torch.randperm order per epoch, learning rates at init_lr_frac decaying
    linearly to 0."""
    from scripts.code_dpo import pair_logps

    model.eval()
    with torch.no_grad():
        ref_c, ref_r = [], []
        for i in range(0, len(pairs), batch_size):
            c, r, _, _ = pair_logps(
                model, pairs[i : i + batch_size], pad_id, "cpu", torch.no_grad()
            )
            ref_c.append(c), ref_r.append(r)
        ref_c, ref_r = torch.cat(ref_c), torch.cat(ref_r)
    opts = model.setup_optimizers(matrix_lr, embedding_lr, unembedding_lr, 0.0)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * init_lr_frac
    g = torch.Generator().manual_seed(seed)
    order, pos, losses = torch.randperm(len(pairs), generator=g).tolist(), 0, []
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(pairs), generator=g).tolist(), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        model.train()
        pc, pr, _, _ = pair_logps(
            model, [pairs[i] for i in idx], pad_id, "cpu", contextlib.nullcontext()
        )
        loss = (
            -torch.nn.functional.logsigmoid(beta * ((pc - ref_c[idx]) - (pr - ref_r[idx])))
        ).mean()
        loss.backward()
        reference_step(model, opts, step, steps)
        losses.append(loss.item())
    return losses


def test_dpo_losses_equal_the_reference_loop(module_base_dir, tokenizer, model, pairs):
    """The script's loss curve on a fixed seed equals the plain loop above, step for step, across an
    epoch boundary (5 pairs, batches of 2), with a learning rate high enough to move the policy."""
    from nanocode.checkpoint import checkpoint_dir, load_model, save_checkpoint
    from nanocode.conversations import load_jsonl
    from scripts import code_dpo

    save_checkpoint(
        checkpoint_dir("sft", "ref2"),
        1,
        model.state_dict(),
        None,
        {"model_config": model.config.to_dict()},
    )
    write_jsonl(module_base_dir / "ref_train.jsonl", pairs[:5])
    write_jsonl(module_base_dir / "ref_val.jsonl", pairs[5:7])
    code_dpo.main(
        [
            "--model-tag",
            "ref2",
            "--train",
            str(module_base_dir / "ref_train.jsonl"),
            "--val",
            str(module_base_dir / "ref_val.jsonl"),
            "--steps",
            "5",
            "--batch-size",
            "2",
            "--seed",
            "3",
            "--init-lr-frac",
            "0.5",
            "--eval-every",
            "-1",
            "--device-type",
            "cpu",
        ]
        + NO_NLL
    )
    report = json.loads((module_base_dir / "report" / "dpo.json").read_text())
    got = [loss for _, loss in report["curves"]["loss"]]
    ref_model, _, _ = load_model("sft", "cpu", tag="ref2")
    train, _ = code_dpo.render_pairs(
        tokenizer, load_jsonl(module_base_dir / "ref_train.jsonl", kind="preference"), 512
    )
    want = reference_dpo_losses(ref_model, train, 5, 2, 3, 0.1, tokenizer.bos_id, init_lr_frac=0.5)
    assert len(train) == 5 and got == want
    assert len(set(got)) > 1  # the policy moved


def test_self_pairs_reject_the_models_own_failures(module_base_dir, tokenizer, model, monkeypatch):
    """With a verifier (here: the reply's text has an even sum of character codes, true for about
    half of a random model's replies), a task whose samples both pass and fail gives a pair of the
    model's own replies: chosen passes, rejected fails."""
    from nanocode import rl_tasks
    from scripts.code_dpo import self_pairs
    from tests.helpers import install_fixed_answer_reward

    monkeypatch.setattr(rl_tasks, "written_code", rl_tasks.written_code)
    monkeypatch.setattr(rl_tasks, "verify_many", rl_tasks.verify_many)
    install_fixed_answer_reward()

    def even(text):
        return sum(map(ord, text)) % 2 == 0

    rl_tasks.verify_many = lambda tasks, codes, **kw: [(even(c), "") for c in codes]
    tasks = [
        {"id": f"t{i}", "prompt": f"say {i}", "check": {"type": "stdout", "expected": "q"}}
        for i in range(6)
    ]
    path = write_jsonl(module_base_dir / "self_tasks.jsonl", tasks)
    pairs, n = self_pairs(model, tokenizer, str(path), 6, 24, 0)
    assert n == 6 and pairs

    def text(message):
        return "".join(p["text"] for p in message["content"] if p["type"] == "text")

    assert all(even(text(p["chosen"])) and not even(text(p["rejected"])) for p in pairs)
    assert all(p["kind"] == "own_failure" for p in pairs)
