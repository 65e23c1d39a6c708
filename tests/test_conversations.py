"""Conversation JSONL: errors name the file and line, round trips are exact, the mixture's weights,
hub sources: one clear error offline, converted instruct data cached and split."""

import json
import random

import pytest

from nanocode import synth
from nanocode.common import NanocodeError
from nanocode.conversations import load_jsonl, mixture, parse_mix, write_jsonl


def test_malformed_jsonl_line_is_named(tmp_path):
    good = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(NanocodeError, match=r"data.jsonl line 3: not valid JSON"):
        load_jsonl(path)
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad_role) + "\n")
    with pytest.raises(NanocodeError, match=r"line 2 message 1"):
        load_jsonl(path)
    tool_in_user = {
        "messages": [
            {"role": "user", "content": [{"type": "tool_output", "text": "x"}]},
            {"role": "assistant", "content": "y"},
        ]
    }
    path.write_text(json.dumps(tool_in_user) + "\n")
    with pytest.raises(
        NanocodeError, match=r"line 1 message 0 part 0: a tool_output part may only appear"
    ):
        load_jsonl(path)
    pair = {
        "prompt": good,
        "chosen": {"role": "assistant", "content": "a"},
        "rejected": {"role": "assistant", "content": "b"},
    }
    path.write_text(json.dumps(pair) + "\n")
    with pytest.raises(NanocodeError, match=r"line 1 prompt: must end with a user message"):
        load_jsonl(path, kind="preference")


def test_jsonl_round_trip(tmp_path, stdlib_functions):
    funcs = stdlib_functions(10, 50)
    records = [
        synth.make_trajectory(k, random.Random(i), funcs)
        for i, k in enumerate(["no_tool", "run_report", "denial"])
    ]
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
    from nanocode import conversations, hub

    def offline(*a, **k):
        raise ConnectionError("cannot reach huggingface.co:443 (Name or service not known)")

    monkeypatch.setattr(hub, "_check_reachable", offline)
    with pytest.raises(
        NanocodeError,
        match=r"could not download sahil2801/CodeAlpaca-20k/code_alpaca_20k.json .*offline",
    ):
        conversations.load_source("code_alpaca", "train")


def test_instruct_source_is_converted_once_and_split(module_base_dir, monkeypatch):
    """An instruct source converts its rows once (here the fixture file stands in for the download),
    caches them, and keeps the last HELD_OUT conversations for "val"."""
    from pathlib import Path

    from nanocode import conversations, instruct

    fixture = Path(__file__).parent / "data_fixtures" / "instruct" / "code_alpaca_20k.json"
    calls = []
    monkeypatch.setattr(instruct, "fetch", lambda name: calls.append(name) or fixture)
    monkeypatch.setattr(conversations, "HELD_OUT", 1)
    train = conversations.load_source("code_alpaca", "train")
    val = conversations.load_source("code_alpaca", "val")
    assert calls == ["code_alpaca"]  # the second load read the cache
    assert len(train) == 2 and len(val) == 1  # 4 rows, 1 dropped (10 / 0 does not run)
    assert (module_base_dir / "sft" / "instruct_code_alpaca.jsonl").exists()
    with pytest.raises(NanocodeError, match="unknown source"):
        conversations.load_source("alpaca_typo")
