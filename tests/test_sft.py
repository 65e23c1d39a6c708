"""SFT: the loss mask is exactly the assistant's tokens, padded rows never see each other, and a
short run on a tiny random model goes end to end (checkpoint, report, validity numbers)."""

import json

import pytest
import torch

from nanocode import synth
from nanocode.conversations import pad_batch, write_jsonl
from tests.helpers import nudged_model, reference_step, trajectories

CONV = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is in main.py?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_call", "name": "read_file", "arguments": {"path": "main.py"}},
                {"type": "tool_output", "text": "     1\tprint('hi')"},
                {"type": "text", "text": "It prints hi."},
            ],
        },
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]
}


def expected_segments(conv):
    """The rendered text per the docs/DESIGN.md template, as (text, is_assistant_token) segments."""
    msgs = conv["messages"]
    system = msgs[0]["content"] + "\n\n" if msgs[0]["role"] == "system" else ""
    segs = [("<|bos|>", False)]
    for m in msgs[1 if system else 0 :]:
        if m["role"] == "user":
            segs += [("<|user_start|>" + system + m["content"] + "<|user_end|>", False)]
            system = ""
            continue
        segs.append(("<|assistant_start|>", False))
        parts = (
            [{"type": "text", "text": m["content"]}]
            if isinstance(m["content"], str)
            else m["content"]
        )
        for p in parts:
            if p["type"] == "text":
                segs.append((p["text"], True))
            elif p["type"] == "tool_call":
                segs.append(
                    (
                        "<|tool_start|>"
                        + json.dumps({"name": p["name"], "arguments": p["arguments"]})
                        + "<|tool_end|>",
                        True,
                    )
                )
            else:
                segs.append(("<|output_start|>" + p["text"] + "<|output_end|>", False))
        segs.append(("<|assistant_end|>", True))
    return segs


@pytest.fixture(scope="module")
def funcs(stdlib_functions):
    return stdlib_functions(30, 200)


@pytest.fixture(scope="module")
def tokenizer(module_base_dir, funcs):
    texts = [f["src"] for f in funcs] + [json.dumps(CONV)] * 5
    tokenizer_mod = pytest.importorskip("nanocode.tokenizer")
    tok = tokenizer_mod.Tokenizer.train(texts, vocab_size=600)
    tok.save(module_base_dir / "tokenizer")
    return tok


def test_loss_mask_is_exactly_the_assistant_tokens(tokenizer):
    ids, mask = tokenizer.render_conversation(CONV)
    x, y = pad_batch([(list(ids), list(mask))], tokenizer.bos_id)
    targets = y[0]
    assert torch.equal(
        x[0, 1:], torch.tensor(ids[1:-1])
    )  # inputs are the ids, targets shifted by one
    trained = [t for t in targets.tolist() if t != -1]
    ignored = [ids[0]] + [ids[i + 1] for i, t in enumerate(targets.tolist()) if t == -1]
    segs = expected_segments(CONV)
    assert tokenizer.decode(trained) == "".join(s for s, a in segs if a)
    assert tokenizer.decode(ignored) == "".join(s for s, a in segs if not a)


def test_padding_never_lets_rows_see_each_other(tokenizer):
    model = nudged_model(2, tokenizer.vocab_size, 128)
    short = tokenizer.render_conversation({"messages": CONV["messages"][:3]})
    long = tokenizer.render_conversation(CONV)
    x, y = pad_batch(
        [(list(short[0]), list(short[1])), (list(long[0]), list(long[1]))], tokenizer.bos_id
    )
    assert (y[0, len(short[0]) - 1 :] == -1).all()
    with torch.no_grad():
        both = model(x)
        alone = model(x[:1, : len(short[0]) - 1])
    torch.testing.assert_close(both[0, : len(short[0]) - 1], alone[0], rtol=1e-4, atol=1e-4)


def test_sft_short_run_end_to_end(module_base_dir, tokenizer, funcs):
    from nanocode.checkpoint import checkpoint_dir, list_steps, save_checkpoint
    from nanocode.gpt import GPTConfig, build_model
    from scripts import code_sft

    config = GPTConfig.from_depth(2, tokenizer.vocab_size, 512)
    model = build_model(config, "cpu")
    save_checkpoint(
        checkpoint_dir("base", "d2"),
        0,
        model.state_dict(),
        None,
        {"model_config": config.to_dict()},
    )
    kinds = ["explain", "write_run", "test_fix"]
    with (
        pytest.MonkeyPatch.context() as mp
    ):  # single-turn records: each held-out call fits the rows
        mp.setattr(synth, "FOLLOWUP_RATE", 0.0)
        write_jsonl(
            module_base_dir / "sft" / "synth_train.jsonl",
            trajectories(6, 0, funcs, kinds),
        )
        write_jsonl(
            module_base_dir / "sft" / "synth_val.jsonl",
            trajectories(3, 1, funcs, kinds),
        )
    code_sft.main(
        [
            "--model-tag",
            "d2",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--eval-prompts",
            "2",
            "--gen-tokens",
            "4",
            "--eval-every",
            "2",
            "--device-type",
            "cpu",
        ]
    )
    assert list_steps(checkpoint_dir("sft", "d2")) == [3]
    report = json.loads((module_base_dir / "report" / "sft.json").read_text())
    assert report["steps"] == 3 and len(report["curves"]["loss"]) == 3
    assert report["validity_after"]["prompts"] == 2
    assert 0.0 <= report["tool_call_validity"] <= 1.0


def test_validity_counts_real_tool_calls():
    from nanocode.tools import parse_tool_call as parse_call

    assert parse_call('{"name": "read_file", "arguments": {"path": "a.py"}}')[0] is not None
    assert "not valid JSON" in parse_call('{"name": "read_file", "arguments": {"path": "a.py"}')[1]
    assert "unknown tool" in parse_call('{"name": "cat", "arguments": {"path": "a.py"}}')[1]
    assert (
        "missing required" in parse_call('{"name": "edit_file", "arguments": {"path": "a.py"}}')[1]
    )


def reference_sft_losses(
    model,
    rows,
    steps,
    batch_size,
    seed,
    pad_id,
    matrix_lr=0.02,
    embedding_lr=0.2,
    unembedding_lr=0.004,
    init_lr_frac=0.1,
):
    """SFT's training loop written out plainly (one process): a shuffled pass over the rows per
    epoch (each epoch the next torch.randperm of a generator seeded `seed`, as DPO's), loss on the
    masked tokens, learning rates at init_lr_frac decaying linearly to 0."""
    opts = model.setup_optimizers(matrix_lr, embedding_lr, unembedding_lr, 0.0)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * init_lr_frac
    g = torch.Generator().manual_seed(seed)
    order, pos, losses = [], 0, []
    model.train()
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(rows), generator=g).tolist(), 0
        x, y = pad_batch([rows[i] for i in order[pos : pos + batch_size]], pad_id)
        pos += batch_size
        loss = model(x, y)
        loss.backward()
        reference_step(model, opts, step, steps)
        losses.append(loss.item())
    return losses


def test_sft_losses_equal_the_reference_loop(module_base_dir, tokenizer, funcs):
    """The script's loss curve on a fixed seed equals the plain loop above, step for step (exactly:
    CPU fp32, same operations in the same order), across an epoch boundary (5 rows, batches of 2: 2
    steps per epoch)."""
    from nanocode.checkpoint import checkpoint_dir, load_model, save_checkpoint
    from nanocode.conversations import load_mixture
    from scripts import code_sft

    model = nudged_model(1, tokenizer.vocab_size, 256)
    config = model.config
    save_checkpoint(
        checkpoint_dir("base", "ref1"),
        0,
        model.state_dict(),
        None,
        {"model_config": config.to_dict()},
    )
    kinds = ["explain", "write_run", "test_fix"]
    write_jsonl(
        module_base_dir / "sft" / "synth_train.jsonl",
        trajectories(5, 3, funcs, kinds),
    )
    write_jsonl(module_base_dir / "sft" / "synth_val.jsonl", trajectories(2, 4, funcs, kinds))
    code_sft.main(
        [
            "--model-tag",
            "ref1",
            "--mix",
            "synth=1",
            "--steps",
            "5",
            "--batch-size",
            "2",
            "--seed",
            "7",
            "--eval-prompts",
            "1",
            "--gen-tokens",
            "2",
            "--eval-every",
            "-1",
            "--device-type",
            "cpu",
        ]
    )
    report = json.loads((module_base_dir / "report" / "sft.json").read_text())
    got = [loss for _, loss in report["curves"]["loss"]]
    ref_model, _, _ = load_model("base", "cpu", tag="ref1")
    rows = code_sft.render_rows(tokenizer, load_mixture("synth=1", "train", 7), 256)
    want = reference_sft_losses(ref_model, rows, 5, 2, 7, tokenizer.bos_id)
    assert len(rows) == 5 and got == want


def test_user_jsonl_with_an_unknown_tool_is_an_error_naming_file_and_line(tmp_path):
    from nanocode.common import NanocodeError
    from scripts.code_sft import check_tool_calls, load_data

    bad = json.loads(json.dumps(CONV))
    bad["messages"][2]["content"][1]["name"] = "cat"
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(CONV) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(NanocodeError, match=r"mine.jsonl line 3: unknown tool 'cat'"):
        check_tool_calls(path)
    bad["messages"][2]["content"][1] = {
        "type": "tool_call",
        "name": "read_file",
        "arguments": {"file": "a.py"},
    }
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(
        NanocodeError, match=r"mine.jsonl line 1: read_file is missing required argument 'path'"
    ):
        load_data(str(path), "", 0)
    good, val = tmp_path / "good.jsonl", tmp_path / "good_val.jsonl"
    good.write_text(json.dumps(CONV) + "\n")
    val.write_text(json.dumps(CONV) + "\n" + json.dumps(CONV) + "\n")
    train, held_out = load_data(str(good), str(val), 0)
    assert len(train) == 1 and len(held_out) == 2  # the user's own held-out split


def test_validity_counts_no_call_invalid_and_cut_off_apart(tokenizer):
    """Four prompts, a scripted model answering each: a valid call, a malformed one, text and no
    call, and a call too long for a budget of 8 tokens. Seen and unseen kinds are reported apart."""
    from nanocode.training import tool_call_validity
    from tests.scripted_model import ScriptedModel, encode_with_specials

    call = '{"name": "read_file", "arguments": {"path": "main.py"}}'
    turns = [
        f"<|tool_start|>{call}<|tool_end|>",
        '<|tool_start|>{"name": "read_file", <|tool_end|>',
        "No tool needed.",
        "<|tool_start|>" + '{"name": "bash", "arguments": {"command": "' + "x" * 200 + '"}}',
    ]
    model = ScriptedModel(
        [encode_with_specials(tokenizer, t) for t in turns],
        tokenizer.vocab_size,
        tokenizer.special_id("<|assistant_start|>"),
        tokenizer.special_id("<|assistant_end|>"),
    )
    prompt = list(tokenizer.render_for_completion({"messages": CONV["messages"][:2]}))
    ref = CONV["messages"][2]["content"][1]
    prompts = [
        {"ids": prompt, "ref": ref, "ref_tokens": 30, "kind": k, "seen": s}
        for k, s in (("a", True), ("a", True), ("b", False), ("b", False))
    ]
    v = tool_call_validity(
        model, tokenizer, prompts, max_tokens=0
    )  # budget: ref_tokens + 32 = 62 < the long call
    assert (v["valid"], v["invalid"], v["no_call"], v["cut_off"]) == (1, 1, 1, 1)
    assert v["validity"] == 0.25 and v["validity_of_calls"] == 0.5 and v["same_tool"] == 1
    assert v["seen"]["validity"] == 0.5 and v["unseen"] == dict(
        v["unseen"], prompts=2, no_call=1, cut_off=1, validity=0.0
    )
    assert v["by_kind"] == {"a": 0.5, "b": 0.0}


def test_validity_prompts_file_adds_unseen_requests(tokenizer, module_base_dir):
    """gen_synth's validity_prompts.jsonl (bare requests, kinds training never saw) joins the
    held-out prompts with the longest reference call's budget, its seen flag kept; a malformed line
    names itself."""
    from nanocode.common import NanocodeError
    from nanocode.training import validity_file_prompts

    path = module_base_dir / "sft" / "validity_prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [
        {
            "messages": [{"role": "user", "content": "Find every call to parse_args."}],
            "kind": "usage_search",
            "seen": False,
        },
        {"messages": [{"role": "user", "content": "Run main.py."}], "kind": "run", "seen": True},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    held_out = [
        {"ids": [0], "ref": None, "ref_tokens": 40, "kind": "a", "seen": True},
        {"ids": [0], "ref": None, "ref_tokens": 90, "kind": "a", "seen": True},
    ]
    got = validity_file_prompts(tokenizer, held_out, limit=8, max_len=4096)
    assert [(p["kind"], p["seen"], p["ref_tokens"], p["ref"]) for p in got] == [
        ("usage_search", False, 90, None),
        ("run", True, 90, None),
    ]
    assert got[0]["ids"] == list(tokenizer.render_for_completion({"messages": recs[0]["messages"]}))
    assert validity_file_prompts(tokenizer, held_out, limit=0, max_len=4096) == []
    path.write_text(
        json.dumps(recs[0])
        + "\n"
        + json.dumps({"messages": [{"role": "assistant", "content": "x"}]})
        + "\n"
    )
    with pytest.raises(NanocodeError, match="line 2"):
        validity_file_prompts(tokenizer, held_out, limit=8, max_len=4096)
    path.unlink()


def test_held_out_loss_is_the_mean_per_assistant_token(tokenizer):
    """SFT's held-out loss (nanocode.loss_eval.loss_sums without byte counts): the model's own mean
    cross-entropy over the assistant's targets, summed over batches of any split."""
    from nanocode.loss_eval import loss_sums

    model = nudged_model(1, tokenizer.vocab_size, 256)
    rows = [tokenizer.render_conversation(c) for c in (CONV, {"messages": CONV["messages"][:3]})]
    x, y = pad_batch([(list(ids), list(mask)) for ids, mask in rows], tokenizer.bos_id)
    with torch.no_grad():
        want = model(x, y).item()
    nats, nbytes, count = loss_sums(model, [(x[:1], y[:1]), (x[1:], y[1:])], "cpu")[0].tolist()
    assert count == nbytes == (y != -1).sum().item()
    assert nats / count == pytest.approx(want, rel=1e-6)
