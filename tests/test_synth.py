"""Synthetic trajectories and pairs: tool outputs are real (replaying gives the same outputs and files),
the generator is deterministic and covers every task, and conversation JSONL errors name the line."""
import json
import random

import pytest

from nanocode import synth
from nanocode.common import NanocodeError
from nanocode.conversations import (load_jsonl, mixture, parse_mix, validate_conversation, validate_preference,
                                    write_jsonl)
from nanocode.tools import validate_tool_call


@pytest.fixture(scope="module")
def funcs(stdlib_functions):
    """Functions from a few stdlib modules stand in for the corpus (same code path: corpus_functions)."""
    out = stdlib_functions(40, 300)
    assert len(out) > 50
    return out


@pytest.fixture(scope="module")
def records(funcs):
    # two of every task, built directly so each kind is covered regardless of the sampling weights
    return [synth.make_trajectory(kind, random.Random(i), funcs) for kind in synth.TASKS for i in range(2)]


def test_every_tool_output_is_what_the_tool_prints(records):
    n_outputs = 0
    for r in records:
        validate_conversation(r, r["kind"])
        mismatches, _ = synth.replay(r)
        assert mismatches == [], (r["kind"], mismatches[:1])
        n_outputs += sum(p["type"] == "tool_output" for p in r["messages"][-1]["content"])
    assert n_outputs >= 2 * len(records)


def test_each_output_follows_its_call_and_every_call_is_valid(records):
    for r in records:
        parts = r["messages"][-1]["content"]
        for i, p in enumerate(parts):
            if p["type"] == "tool_call":
                assert parts[i + 1]["type"] == "tool_output"
                assert validate_tool_call({"name": p["name"], "arguments": p["arguments"]}) is None
            if p["type"] == "tool_output":
                assert parts[i - 1]["type"] == "tool_call"


def test_replay_reproduces_the_final_files(records):
    changed = 0
    for r in records:
        _, final = synth.replay(r)
        assert final == r["final_files"], r["kind"]
        changed += final != r["files"]
    assert changed >= len(records) // 3  # edits and writes really change files


def test_replay_detects_a_forged_output(records):
    r = json.loads(json.dumps(next(r for r in records if r["kind"] == "test_fix")))
    out = next(p for p in r["messages"][-1]["content"] if p["type"] == "tool_output")
    out["text"] = "3 passed, 0 failed"
    mismatches, _ = synth.replay(r)
    assert len(mismatches) == 1


def test_recovery_trajectories_really_hit_the_errors(records):
    first_output = {}
    for r in records:
        outs = [p["text"] for p in r["messages"][-1]["content"] if p["type"] == "tool_output"]
        first_output.setdefault(r["kind"], outs[0] if r["kind"] != "edit_not_unique" else outs[1])
    assert first_output["missing_file"].startswith("error: no such file")
    assert "does not occur" in first_output["edit_not_found"]
    assert "occurs 2 times" in first_output["edit_not_unique"]
    assert "command not found" in first_output["command_not_found"]
    assert "FAIL" in first_output["test_fix"]


def test_test_fix_ends_green(records):
    for r in (r for r in records if r["kind"] in ("test_fix", "edit_not_found")):
        last = [p["text"] for p in r["messages"][-1]["content"] if p["type"] == "tool_output"][-1]
        assert "0 failed" in last and "[exit code" not in last


def test_deterministic_for_a_seed(funcs):
    a = synth.generate_trajectories(6, seed=3, funcs=funcs)
    b = synth.generate_trajectories(6, seed=3, funcs=funcs)
    c = synth.generate_trajectories(6, seed=4, funcs=funcs)
    assert a == b
    assert a != c


def test_assistant_text_skips_flattery(records):
    for r in records:
        text = " ".join(p["text"] for p in r["messages"][-1]["content"] if p["type"] == "text").lower()
        for phrase in ("great question", "happy to help", "absolutely", "hope this helps"):
            assert phrase not in text


def test_pairs_are_real_and_flawed(records):
    kinds = set()
    for i, r in enumerate(records):
        for kind in synth.PAIR_KINDS:
            pair = synth.make_pair(r, random.Random(i), kind)
            if pair is None:
                continue
            kinds.add(kind)
            validate_preference(pair)
            assert pair["chosen"] != pair["rejected"]
            mismatches, _ = synth.replay({"files": pair["files"], "messages": [pair["rejected"]]})
            assert mismatches == [], kind
            rej = pair["rejected"]["content"]
            if kind == "malformed_call":
                bad = next(p for p in rej if p["type"] == "tool_call")
                assert validate_tool_call({"name": bad["name"], "arguments": bad["arguments"]}) is not None
            if kind == "not_unique":
                assert any("occurs" in p["text"] and "times" in p["text"] for p in rej if p["type"] == "tool_output")
            if kind == "unbacked_claim":
                assert sum(p["type"] == "tool_call" for p in rej) < sum(p["type"] == "tool_call" for p in pair["chosen"]["content"])
    assert kinds == set(synth.PAIR_KINDS)


def test_unique_context_grows_until_unique():
    text = "a = 1\nreturn x\nb = 2\nreturn x\n"
    assert synth.unique_context(text, 4) == "b = 2\nreturn x"
    assert synth.unique_context(text, 1) == "a = 1"


# ---- conversations.py

def test_malformed_jsonl_line_is_named(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(NanocodeError, match=r"data.jsonl line 3: not valid JSON"):
        load_jsonl(path)
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad_role) + "\n")
    with pytest.raises(NanocodeError, match=r"line 2 message 1"):
        load_jsonl(path)
    tool_in_user = {"messages": [{"role": "user", "content": [{"type": "tool_output", "text": "x"}]},
                                 {"role": "assistant", "content": "y"}]}
    path.write_text(json.dumps(tool_in_user) + "\n")
    with pytest.raises(NanocodeError, match=r"line 1 message 0 part 0: a tool_output part may only appear"):
        load_jsonl(path)
    pair = {"prompt": good, "chosen": {"role": "assistant", "content": "a"}, "rejected": {"role": "assistant", "content": "b"}}
    path.write_text(json.dumps(pair) + "\n")
    with pytest.raises(NanocodeError, match=r"line 1 prompt: must end with a user message"):
        load_jsonl(path, kind="preference")


def test_jsonl_round_trip(tmp_path, records):
    path = write_jsonl(tmp_path / "x.jsonl", records)
    assert load_jsonl(path) == records


def test_mixture_weights_and_determinism():
    a, b = list(range(100)), list(range(100, 110))
    mix = mixture([("a", a, 0.5), ("b", b, 2.0)], seed=1)
    assert len(mix) == 50 + 20
    assert sorted(x for x in mix if x >= 100) == sorted(b * 2)
    assert mix == mixture([("a", a, 0.5), ("b", b, 2.0)], seed=1)
    assert mix != mixture([("a", a, 0.5), ("b", b, 2.0)], seed=2)
    assert parse_mix("synth=1, gsm8k=0.5") == [("synth", 1.0), ("gsm8k", 0.5)]
    with pytest.raises(NanocodeError, match="bad weight"):
        parse_mix("synth=lots")


def test_offline_hub_source_gives_a_clear_error(monkeypatch):
    import urllib.request
    from nanocode import conversations

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(NanocodeError, match="Hugging Face hub is unreachable"):
        conversations.load_source("code_alpaca", "train")
