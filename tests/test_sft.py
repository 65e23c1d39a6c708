"""SFT: the loss mask is exactly the assistant's tokens, padded rows never see each other, and a short
run on a tiny random model goes end to end (checkpoint, report, validity numbers)."""
import json

import pytest
import torch

from nanocode import synth
from nanocode.conversations import pad_batch, write_jsonl

CONV = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is in main.py?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_call", "name": "read_file", "arguments": {"path": "main.py"}},
        {"type": "tool_output", "text": "     1\tprint('hi')"},
        {"type": "text", "text": "It prints hi."}]},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]}


def expected_segments(conv):
    """The rendered text per the docs/DESIGN.md template, as (text, is_assistant_token) segments."""
    msgs = conv["messages"]
    system = msgs[0]["content"] + "\n\n" if msgs[0]["role"] == "system" else ""
    segs = [("<|bos|>", False)]
    for m in msgs[1 if system else 0:]:
        if m["role"] == "user":
            segs += [("<|user_start|>" + system + m["content"] + "<|user_end|>", False)]
            system = ""
            continue
        segs.append(("<|assistant_start|>", False))
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for p in parts:
            if p["type"] == "text":
                segs.append((p["text"], True))
            elif p["type"] == "tool_call":
                segs.append(("<|tool_start|>" + json.dumps({"name": p["name"], "arguments": p["arguments"]}) + "<|tool_end|>", True))
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
    assert torch.equal(x[0, 1:], torch.tensor(ids[1:-1]))  # inputs are the ids, targets shifted by one
    trained = [t for t in targets.tolist() if t != -1]
    ignored = [ids[0]] + [ids[i + 1] for i, t in enumerate(targets.tolist()) if t == -1]
    segs = expected_segments(CONV)
    assert tokenizer.decode(trained) == "".join(s for s, a in segs if a)
    assert tokenizer.decode(ignored) == "".join(s for s, a in segs if not a)


def test_padding_never_lets_rows_see_each_other(tokenizer):
    from nanocode.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, tokenizer.vocab_size, 128), "cpu")
    for p in model.parameters():  # the init zeroes the output projections: make every layer do something
        p.data.add_(0.02 * torch.randn_like(p))
    short = tokenizer.render_conversation({"messages": CONV["messages"][:3]})
    long = tokenizer.render_conversation(CONV)
    x, y = pad_batch([(list(short[0]), list(short[1])), (list(long[0]), list(long[1]))], tokenizer.bos_id)
    assert (y[0, len(short[0]) - 1:] == -1).all()
    with torch.no_grad():
        both = model(x)
        alone = model(x[:1, :len(short[0]) - 1])
    torch.testing.assert_close(both[0, :len(short[0]) - 1], alone[0], rtol=1e-4, atol=1e-4)


def test_sft_short_run_end_to_end(module_base_dir, tokenizer, funcs):
    from nanocode.checkpoint import checkpoint_dir, list_steps, save_checkpoint
    from nanocode.gpt import GPTConfig, build_model
    from scripts import code_sft
    config = GPTConfig.from_depth(2, tokenizer.vocab_size, 512)
    model = build_model(config, "cpu")
    save_checkpoint(checkpoint_dir("base", "d2"), 0, model.state_dict(), None, {"model_config": config.to_dict()})
    kinds = ["explain", "write_run", "test_fix"]
    write_jsonl(module_base_dir / "sft" / "synth_train.jsonl", synth.generate_trajectories(6, 0, funcs, kinds))
    write_jsonl(module_base_dir / "sft" / "synth_val.jsonl", synth.generate_trajectories(3, 1, funcs, kinds))
    code_sft.main(["--model-tag", "d2", "--steps", "3", "--batch-size", "2", "--eval-prompts", "2", "--gen-tokens", "4",
                   "--eval-every", "2", "--device-type", "cpu"])
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
    assert "missing required" in parse_call('{"name": "edit_file", "arguments": {"path": "a.py"}}')[1]
