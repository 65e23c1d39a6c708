"""DPO: the loss matches a hand computation, a side's log-prob counts only the reply's assistant tokens,
and a short run goes end to end."""
import json
import math

import pytest
import torch

from nanocode import synth
from nanocode.conversations import write_jsonl
from scripts.code_dpo import dpo_loss


def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    rc, rr = torch.tensor([-2.0, -4.0]), torch.tensor([-2.5, -2.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 0: h = (-1 + 2) - (-3 + 2.5) = 1.5 -> -log sigmoid(0.75); pair 1: h = 0 -> log 2
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.exp(-0.75)), math.log(2.0)]))
    torch.testing.assert_close(cr, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(rj, torch.tensor([-0.25, 0.0]))
    # ipo: per-token log-ratios (2 and 4 tokens): h' = 1/2 - (-0.5/4) = 0.625, target 1/(2*0.5) = 1
    losses, _, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.5, loss_type="ipo", nc=torch.tensor([2.0]), nr=torch.tensor([4.0]))
    torch.testing.assert_close(losses, torch.tensor([0.140625]))
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(pc, pr, rc, rr, 0.5, "hinge")



@pytest.fixture(scope="module")
def funcs(stdlib_functions):
    return stdlib_functions(30, 200)


@pytest.fixture(scope="module")
def pairs(funcs):
    recs = synth.generate_trajectories(8, 0, funcs, ["explain", "write_run", "test_fix", "edit"])
    return synth.generate_pairs(recs, 0)


@pytest.fixture(scope="module")
def tokenizer(module_base_dir, funcs, pairs):
    tokenizer_mod = pytest.importorskip("nanocode.tokenizer")
    tok = tokenizer_mod.Tokenizer.train([f["src"] for f in funcs] + [json.dumps(p) for p in pairs], vocab_size=600)
    tok.save(module_base_dir / "tokenizer")
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    from nanocode.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    m = build_model(GPTConfig.from_depth(2, tokenizer.vocab_size, 512), "cpu")
    for p in m.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return m


def test_side_logp_counts_only_the_reply(tokenizer, model, pairs):
    from scripts.code_dpo import render_side, side_logps
    p = pairs[0]
    ids, mask = render_side(tokenizer, p["prompt"], p["chosen"], 512)
    n_prompt = len(tokenizer.render_for_completion(p["prompt"]))
    full_ids, full_mask = tokenizer.render_conversation({"messages": p["prompt"]["messages"] + [p["chosen"]]})
    assert mask[:n_prompt] == [0] * n_prompt and mask[n_prompt:] == list(full_mask)[n_prompt:len(ids)]
    logp, n = side_logps(model, [(ids, mask)], tokenizer.bos_id, "cpu", torch.no_grad())
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
    manual = sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids)) if mask[i])
    assert n.item() == sum(mask[1:])
    assert abs(logp.item() - manual) < 1e-3 * max(1.0, abs(manual))


def test_dpo_short_run_end_to_end(module_base_dir, tokenizer, model, pairs):
    from nanocode.checkpoint import checkpoint_dir, list_steps, save_checkpoint
    from scripts import code_dpo
    save_checkpoint(checkpoint_dir("sft", "d2"), 5, model.state_dict(), None, {"model_config": model.config.to_dict()})
    write_jsonl(module_base_dir / "sft" / "dpo_train.jsonl", pairs[:6])
    write_jsonl(module_base_dir / "sft" / "dpo_val.jsonl", pairs[6:])
    code_dpo.main(["--model-tag", "d2", "--steps", "2", "--batch-size", "2", "--device-type", "cpu"])
    assert list_steps(checkpoint_dir("dpo", "d2")) == [2]
    report = json.loads((module_base_dir / "report" / "dpo.json").read_text())
    assert report["val_before"]["reward_accuracy"] == 0.0 and report["val_before"]["ties"] == 1.0  # policy == reference
    assert len(report["curves"]["loss"]) == 2 and report["val_pairs"] == len(pairs) - 6
    assert set(report["val_after"]["reward_accuracy_by_kind"]) <= set(synth.PAIR_KINDS)
