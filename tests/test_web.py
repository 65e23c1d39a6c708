"""The HTTP server with a scripted fake model, started with uvicorn on a free local port: the
official openai client in both modes, tool calls run server-side only with --allow-tools, 4xx errors
with a message for bad requests, and the web UI in headless Chromium (message sent, streamed reply
rendered, screenshot saved)."""

import base64
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time

import httpx
import openai
import pytest

from tests.helpers import (
    REPO,
    free_port,
    real_tokenizer,
    save_tiny_checkpoint,
    script_argv,
    script_env,
    start_server,
    stop_server,
)

CALL = '<|tool_start|>{"name": "bash", "arguments": {"command": "cat hello.txt"}}<|tool_end|>'
TOOL_TURN = "Let me look." + CALL + "It says hi."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
FORMAT = {"name": "when", "parameters": {"type": "string", "format": "date"}}
STRICT = dict(WEATHER["function"], strict="yes")
BASH = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "run a command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}},
    },
}


@contextlib.contextmanager
def server(tmp_path, turns, *flags, sequence_len=4096):
    """The server on a free port: with a scripted fake model given `turns`, or with `flags` alone if
    None."""
    if turns is not None:
        script = tmp_path / "script.json"
        script.write_text(json.dumps({"turns": turns, "sequence_len": sequence_len}))
        flags = ("--fake-script", str(script), *flags)
    proc, url = start_server(flags, tmp_path / "server.log")
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    (d / "hello.txt").write_text("hi there\n")
    return d


def test_openai_client_both_modes_with_tools(tmp_path, workdir):
    with server(tmp_path, [TOOL_TURN, TOOL_TURN], "--allow-tools", str(workdir)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["nanocode-fake"]

        resp = client.chat.completions.create(
            model="nanocode", messages=[{"role": "user", "content": "hello.txt?"}]
        )
        choice = resp.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason == "stop"
        assert choice.message.content == "Let me look.It says hi."
        parts = choice.message.model_extra["parts"]
        assert parts[1] == {
            "type": "tool_call",
            "name": "bash",
            "arguments": {"command": "cat hello.txt"},
        }
        assert parts[2] == {"type": "tool_output", "text": "hi there\n"}
        assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0

        stream = client.chat.completions.create(
            model="nanocode",
            stream=True,
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "again?"},
            ],
        )
        texts, tool_events, finish = [], [], None
        for chunk in stream:
            delta = chunk.choices[0].delta
            if delta.content:
                texts.append(delta.content)
            if (delta.model_extra or {}).get("nanocode"):
                tool_events.append(delta.model_extra["nanocode"])
            finish = chunk.choices[0].finish_reason or finish
        assert "".join(texts) == "Let me look.It says hi." and len(texts) > 2  # streamed in pieces
        assert [e["type"] for e in tool_events] == ["tool_call", "tool_output"]
        assert tool_events[1]["text"] == "hi there\n"
        assert finish == "stop"

        # the raw stream is server-sent events ending in [DONE]
        raw = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "stream": True},
            timeout=60,
        ).text
        events = [line for line in raw.split("\n\n") if line]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_tools_off_without_allow_tools_and_bad_requests(tmp_path, workdir):
    turn = "Try." + CALL.replace("cat hello.txt", "echo ran > ran.txt") + "Done."
    with server(tmp_path, [turn], sequence_len=256) as url:
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "go"}]},
            timeout=60,
        )
        assert r.status_code == 200
        parts = r.json()["choices"][0]["message"]["parts"]
        assert parts[2] == {"type": "tool_output", "text": "error: tools are disabled here"}
        assert not list(REPO.glob("ran.txt")) and not (workdir / "ran.txt").exists()
        assert httpx.get(url + "/health").json()["tools"] is None

        user = [{"role": "user", "content": "hi"}]
        bad = [
            (b"{not json", 400, "not valid JSON"),
            (b"[1, 2]", 400, "must be a JSON object"),
            ({"model": "x"}, 400, "'messages' is required"),
            ({"messages": []}, 400, "'messages' is required"),
            (
                {"messages": [{"role": "tool", "content": "x"}]},
                400,
                "a role 'tool' message must answer a tool call",
            ),
            (
                {"messages": [{"role": "robot", "content": "x"}]},
                400,
                "role must be system, user, assistant or tool",
            ),
            (
                {"messages": user + [{"role": "assistant", "content": "hey"}]},
                400,
                "must end with a user message or with a tool result",
            ),
            (
                {
                    "messages": user
                    + [
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "c1",
                                    "type": "function",
                                    "function": {"name": "bash", "arguments": "{}"},
                                }
                            ],
                        }
                    ]
                },
                400,
                "tool call(s) c1 have no role 'tool' result",
            ),
            (
                {
                    "messages": user
                    + [
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "c1",
                                    "type": "function",
                                    "function": {"name": "bash", "arguments": "not json"},
                                }
                            ],
                        }
                    ]
                },
                400,
                "arguments: JSON object text",
            ),
            ({"messages": user, "tools": [{"type": "function"}]}, 400, "tools[0]: expected"),
            (
                {"messages": user, "tool_choice": "any", "tools": [WEATHER]},
                400,
                "'tool_choice' must",
            ),
            ({"messages": user, "tool_choice": "required"}, 400, "needs at least one tool"),
            ({"messages": user, "functions": [WEATHER["function"]]}, 400, "use 'tools'"),
            (
                {"messages": user, "tools": [{"type": "custom", "custom": {"name": "sql"}}]},
                400,
                "tools[0]: type 'custom' is not supported, only 'function'",
            ),
            (
                {"messages": user, "tools": [{"type": "function", "function": FORMAT}]},
                400,
                "unsupported JSON Schema keyword 'format' in the parameters of 'when'",
            ),
            (
                {"messages": user, "tools": [dict(WEATHER, function=STRICT)]},
                400,
                "tools[0].function.strict must be true or false",
            ),
            (
                {"messages": user, "response_format": {"type": "xml"}},
                400,
                "'response_format' type must be text, json_object or json_schema",
            ),
            (
                {"messages": user, "response_format": {"type": "json_schema", "json_schema": 1}},
                400,
                "json_schema: expected {name, schema, strict}",
            ),
            (
                {"messages": user, "tools": [WEATHER], "tool_choice": {"type": "allowed_tools"}},
                400,
                "'tool_choice' must be 'auto', 'none', 'required'",
            ),
            (
                {
                    "messages": user,
                    "tool_choice": {"type": "function", "function": {"name": "nope"}},
                    "tools": [WEATHER],
                },
                400,
                "'tool_choice' names 'nope', which is not in 'tools'",
            ),
            (
                {"messages": user, "stop": ["a", "b", "c", "d", "e"]},
                400,
                "'stop' must be a string or a list",
            ),
            (
                {"messages": [{"role": "user", "content": 5}]},
                400,
                "content must be a string or a list",
            ),
            (
                {"messages": user, "temperature": 5},
                400,
                "'temperature' must be a number in [0, 2]",
            ),
            ({"messages": user, "temperature": "hot"}, 400, "'temperature' must be a number"),
            (
                {"messages": user, "max_tokens": 10**6},
                400,
                "'max_tokens' must be an integer in [1, 1024]",
            ),
            ({"messages": user, "n": 100}, 400, "'n' must be an integer in [1, 8]"),
            ({"messages": user, "top_p": 0}, 400, "'top_p' must be a number in (0, 1]"),
            ({"messages": user, "top_k": 0}, 400, "'top_k' must be an integer"),
            ({"messages": user, "stream": "yes"}, 400, "'stream' must be true or false"),
            (b"x" * 1_100_000, 413, "exceeds the limit"),
        ]
        for body, status, message in bad:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = httpx.post(
                url + "/v1/chat/completions",
                headers={"content-type": "application/json"},
                timeout=60,
                **kw,
            )
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"]["message"], (body, r.text)
        r = httpx.get(url + "/v1/nope")
        assert r.status_code == 404 and "GET /v1/nope" in r.json()["error"]["message"]

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model="nanocode", messages=user, temperature=3)
        assert (
            httpx.get(url + "/health").json()["free"] == 1
        )  # no replica leaked by the bad requests


def test_client_disconnect_frees_the_replica(tmp_path):
    # the first reply would take 2000+ tokens x 0.05 s = 100+ s, well past the 60 s guard below
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"turns": ["tick " * 2000, "Fresh reply."], "delay": 0.05}))
    with server(
        tmp_path, None, "--fake-script", str(script), "--max-tokens", "10000", "--max-queue", "0"
    ) as url:
        body = {
            "messages": [{"role": "user", "content": "count"}],
            "stream": True,
            "max_tokens": 10000,
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if '"content": "' in line)
            assert [
                next(lines) for _ in range(3)
            ]  # three streamed pieces of the reply, then hang up
            busy = httpx.post(
                url + "/v1/chat/completions", json=body, timeout=60
            )  # no room left in the queue
            assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"]
            assert httpx.get(url + "/health").json()["queued"] == 0
        deadline = time.monotonic() + 60  # (guards a hang only)
        while httpx.get(url + "/health").json()["free"] != 1:
            assert time.monotonic() < deadline, (
                "the replica was not released after the client hung up"
            )
            time.sleep(0.1)
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
        assert r.json()["choices"][0]["message"]["content"] == "Fresh reply."


def test_tiny_real_checkpoint_same_reply_streamed_or_not(tmp_path):
    save_tiny_checkpoint("tiny-web", real_tokenizer().vocab_size)
    with server(tmp_path, None, "-i", "sft", "--tag", "tiny-web", "--device-type", "cpu") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        kw = dict(
            model="nanocode",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=16,
            temperature=0,
        )
        full = client.chat.completions.create(**kw)
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(stream=True, **kw)
        )
        assert full.usage.completion_tokens <= 16
        assert streamed == full.choices[0].message.content  # greedy: both modes give the same text
        assert [m.id for m in client.models.list()] == ["nanocode-sft"]
        assert full.system_fingerprint.startswith("fp_") and full.system_fingerprint != "fp_fake"

        hot = dict(kw, temperature=1.0, max_tokens=24)
        unseeded = [
            client.chat.completions.create(**hot).choices[0].message.content for _ in range(2)
        ]
        assert unseeded[0] != unseeded[1]  # a fresh seed per request
        seeded = [
            client.chat.completions.create(seed=7, **hot).choices[0].message.content
            for _ in range(2)
        ]
        assert seeded[0] == seeded[1]

        # a forced call that runs out of tokens: "length", and the call's opening shown as text
        forced = client.chat.completions.create(
            tools=[BASH],
            tool_choice={"type": "function", "function": {"name": "bash"}},
            **dict(kw, max_tokens=4),
        )
        opening = forced.choices[0].message.content
        assert (
            forced.choices[0].finish_reason == "length" and not forced.choices[0].message.tool_calls
        )
        assert opening and '{"name": "bash", "arguments": {"command": "'.startswith(opening)

        several = client.chat.completions.create(
            n=3, seed=11, **hot
        )  # one batch; choice i samples with seed 11 + i
        texts = [c.message.content for c in several.choices]
        assert [c.index for c in several.choices] == [0, 1, 2] and len(set(texts)) == 3
        assert texts[1] == client.chat.completions.create(seed=12, **hot).choices[0].message.content
        assert 3 <= several.usage.completion_tokens <= 3 * 24  # summed over the choices
        streamed = ["", ""]
        for c in client.chat.completions.create(n=2, seed=11, stream=True, **hot):
            for choice in c.choices:
                streamed[choice.index] += choice.delta.content or ""
        assert streamed == texts[:2]


def test_client_side_tools_with_the_openai_sdk(tmp_path):
    """The protocol's own tool calling: calls come back unrun as tool_calls (streamed too), the
    tool's result goes in as a role "tool" message, tool_choice none / named, other functions, stop,
    trimming, the key."""
    ran = tmp_path / "ran.txt"
    call_ls = '<|tool_start|>{"name": "bash", "arguments": {"command": "ls"}}<|tool_end|>'
    turns = [
        "Let me look."
        + CALL.replace("cat hello.txt", f"touch {ran}")
        + "Never reached.",  # round trip,
        "It says hi.",
        "It says hi, again.",  # after the result
        "Checking." + CALL + "Never reached.",  # streamed call
        "Let me look." + CALL + "It says hi.",  # tool_choice none
        call_ls,  # forced bash
        '<|tool_start|>{"name": "get_weather", "arguments": {"city": "Paris"}}<|tool_end|>',
        "Hello world. Bye.",
        "Hello world. Bye.",  # stop, both modes
        "Long answer.",
    ]  # over the context
    with server(
        tmp_path,
        turns,
        "--api-key",
        "sekret",
        "--cors-origin",
        "http://app.example",
        sequence_len=256,
    ) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        ask = [{"role": "user", "content": "what does hello.txt say?"}]
        r = client.chat.completions.create(model="nanocode", messages=ask, tools=[BASH, WEATHER])
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
        (call,) = choice.message.tool_calls
        assert (
            call.type == "function" and call.id.startswith("call_") and call.function.name == "bash"
        )
        assert json.loads(call.function.arguments) == {"command": f"touch {ran}"}
        assert not ran.exists()  # the server ran nothing
        assert (
            r.system_fingerprint == "fp_fake"
            and r.usage.prompt_tokens > 0
            and r.usage.completion_tokens > 0
        )
        follow = ask + [
            r.choices[0].message,  # sent back as the SDK returned it, as in the README
            {"role": "tool", "tool_call_id": call.id, "content": "hi there"},
        ]
        r = client.chat.completions.create(model="nanocode", messages=follow, tools=[BASH, WEATHER])
        assert (
            r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "It says hi."
        )
        r = client.chat.completions.create(
            model="nanocode",
            tools=[BASH, WEATHER],
            messages=[  # content null
                *ask,
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "hi there"},
            ],
        )
        assert r.choices[0].message.content == "It says hi, again."
        assert not r.choices[0].message.tool_calls

        with client.beta.chat.completions.stream(
            model="nanocode", messages=ask, tools=[BASH]
        ) as stream:
            final = stream.get_final_completion()
        choice = final.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
        assert choice.message.tool_calls[0].function.name == "bash"
        assert json.loads(choice.message.tool_calls[0].function.arguments) == {
            "command": "cat hello.txt"
        }

        r = client.chat.completions.create(  # the scripted call's <|tool_start|> is masked out
            model="nanocode", messages=ask, tools=[BASH], tool_choice="none", seed=1
        )
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
        assert r.choices[0].message.content.startswith("Let me look.")

        r = client.chat.completions.create(
            model="nanocode",
            messages=ask,
            tools=[BASH, WEATHER],
            tool_choice={"type": "function", "function": {"name": "bash"}},
        )
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content is None
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {
            "command": "ls"
        }

        r = client.chat.completions.create(
            model="nanocode", messages=ask, tools=[WEATHER], parallel_tool_calls=False
        )
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
            "city": "Paris"
        }

        r = client.chat.completions.create(model="nanocode", messages=ask, stop=["world"])
        assert r.choices[0].message.content == "Hello " and r.choices[0].finish_reason == "stop"
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="nanocode", messages=ask, stop="world", stream=True
            )
        )
        assert text == "Hello "

        long = [
            {"role": "user", "content": "word " * 300}
        ]  # more than the 256-token context: trimmed, answered
        r = client.chat.completions.create(model="nanocode", messages=long)
        assert r.choices[0].message.content == "Long answer."

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.post(
                url + "/v1/chat/completions", json={"messages": ask}, headers=headers, timeout=60
            )
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/health").status_code == 200  # health needs no key
        pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
        r = httpx.options(url + "/v1/chat/completions", headers=pre)
        assert r.headers.get("access-control-allow-origin") == "http://app.example"
        r = httpx.options(
            url + "/v1/chat/completions", headers=dict(pre, Origin="http://evil.example")
        )
        assert r.headers.get("access-control-allow-origin") is None


def test_request_conversion_and_rendering():
    """OpenAI messages become one assistant turn (call, output, answer), rendered so the model
    continues it."""
    from scripts.code_web import RequestError, parse_request, parser

    args = parser.parse_args([])
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "rain"}]},
    ]
    req = parse_request(json.dumps({"messages": msgs, "tools": [WEATHER]}).encode(), args)
    conv = req["conversation"]["messages"]
    assert (
        conv[0]["role"] == "system"
        and "get_weather" in conv[0]["content"]
        and conv[0]["content"].endswith("be brief")
    )
    assert conv[2] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_call", "name": "get_weather", "arguments": {"city": "Oslo"}},
            {"type": "tool_output", "text": "rain"},
        ],
    }
    tok = real_tokenizer()
    ids = tok.render_for_completion(req["conversation"])
    assert ids[-1] == tok.special_id("<|output_end|>")  # the turn goes on after the tool's output
    msgs += [{"role": "assistant", "content": "Rain."}, {"role": "user", "content": "thanks"}]
    conv = parse_request(json.dumps({"messages": msgs}).encode(), args)["conversation"]["messages"]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user"]
    assert conv[2]["content"][-1] == {"type": "text", "text": "Rain."}
    with pytest.raises(RequestError, match="'n' must be an integer"):
        parse_request(json.dumps({"messages": msgs, "n": 0}).encode(), args)
    seeds = {
        parse_request(json.dumps({"messages": msgs}).encode(), args)["settings"]["seed"]
        for _ in range(3)
    }
    assert len(seeds) == 3  # a fresh seed per request ...
    assert (
        parse_request(json.dumps({"messages": msgs, "seed": 5}).encode(), args)["settings"]["seed"]
        == 5
    )  # ... unless given


def test_server_side_tools_per_conversation(tmp_path, workdir):
    """--allow-tools: each conversation works in its own copy of the directory (two at once here),
    found again by its conversation_id; the directory itself is untouched."""
    command = "mktemp -p . XXXXXX.new >/dev/null; ls"
    make = CALL.replace("cat hello.txt", command)
    with server(tmp_path, [make + "Made."] * 4, "--allow-tools", str(workdir)) as url:

        def converse(results, key):
            ask = [{"role": "user", "content": "make a file"}]
            r = httpx.post(url + "/v1/chat/completions", json={"messages": ask}, timeout=120).json()
            cid = r["conversation_id"]
            first = r["choices"][0]["message"]["parts"][1]["text"].split()
            ask += [
                r["choices"][0]["message"] | {"content": r["choices"][0]["message"]["parts"]},
                {"role": "user", "content": "another"},
            ]
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"messages": ask, "conversation_id": cid},
                timeout=120,
            )
            results[key] = (
                cid,
                first,
                r.json()["choices"][0]["message"]["parts"][1]["text"].split(),
            )

        results = {}
        threads = [threading.Thread(target=converse, args=(results, k)) for k in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        (cid_a, first_a, second_a), (cid_b, first_b, second_b) = results["a"], results["b"]
        assert cid_a != cid_b
        for first, second in ((first_a, second_a), (first_b, second_b)):
            assert (
                "hello.txt" in first and len(first) == 2
            )  # the copy, plus this conversation's one new file
            assert set(first) < set(second) and len(second) == 3  # the same dir on the second turn
        new_a, new_b = set(second_a) - {"hello.txt"}, set(second_b) - {"hello.txt"}
        assert not new_a & new_b  # neither sees the other's files
        assert sorted(p.name for p in workdir.iterdir()) == ["hello.txt"]
        r = httpx.post(
            url + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "x"}],
                "conversation_id": "conv-guessed",
            },
            timeout=60,
        )
        assert r.status_code == 400 and "unknown 'conversation_id'" in r.json()["error"]["message"]
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "n": 2},
            timeout=60,
        )
        assert r.status_code == 400 and "would share one dir" in r.json()["error"]["message"]


def test_tools_on_a_public_address_need_an_api_key(tmp_path, workdir):
    argv = script_argv(
        "scripts.code_web",
        "--host",
        "0.0.0.0",
        "--port",
        str(free_port()),
        "--allow-tools",
        str(workdir),
    )
    out = subprocess.run(
        argv, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert (
        out.stderr.strip().startswith("error: refusing to serve tools on 0.0.0.0")
        and "--api-key" in out.stderr
    )


def test_load_32_clients(tmp_path):
    """One replica, 32 concurrent clients: half stream (four of those hang up after the first
    piece), all others get whole, well-formed replies; afterwards no replica is leaked and nothing
    is queued."""
    turns = [f"reply {k}: " + "word " * 8 for k in range(40)]
    with server(
        tmp_path,
        None,
        "--fake-script",
        str(write_turns(tmp_path, turns, delay=0.002)),
        "--max-queue",
        "32",
    ) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        ask = [{"role": "user", "content": "hi"}]
        outcomes = [None] * 32

        def one(k):
            if k % 2 == 0:
                r = client.chat.completions.create(model="nanocode", messages=ask)
                outcomes[k] = (r.choices[0].message.content, r.choices[0].finish_reason)
            elif k % 8 == 1:  # hang up mid-stream
                with httpx.stream(
                    "POST",
                    url + "/v1/chat/completions",
                    json={"messages": ask, "stream": True},
                    timeout=120,
                ) as resp:
                    next(
                        line
                        for line in resp.iter_lines()
                        if '"content": "r' in line or '"content": "w' in line
                    )
                outcomes[k] = ("disconnected", None)
            else:
                chunks = list(
                    client.chat.completions.create(model="nanocode", messages=ask, stream=True)
                )
                outcomes[k] = (
                    "".join(c.choices[0].delta.content or "" for c in chunks),
                    chunks[-1].choices[0].finish_reason,
                )

        threads = [threading.Thread(target=one, args=(k,)) for k in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert all(o is not None for o in outcomes), outcomes
        for k, (text, finish) in enumerate(outcomes):
            if text != "disconnected":
                assert text in turns and finish == "stop", (k, text, finish)
        deadline = time.monotonic() + 60  # (guards a hang only)
        while (h := httpx.get(url + "/health").json())["free"] != 1 or h["queued"] != 0:
            assert time.monotonic() < deadline, h
            time.sleep(0.1)


def write_turns(tmp_path, turns, delay=0.0, name="script.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"turns": turns, "delay": delay}))
    return path


def find_chromium():
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
    messages separated by NUL bytes, we write to its fd 3 and read its fd 4), so no websocket
    library is needed and we can wait for the page itself to say it is done (virtual-time flags
    cannot see the end of a streamed response)."""

    def __init__(self, chromium, profile):
        to_browser, self._w = os.pipe()
        self._r, from_browser = os.pipe()
        flags = (
            f"--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --window-size=1000,700 "
            f"--user-data-dir={profile} --remote-debugging-pipe"
        )
        command = f'exec "{chromium}" {flags} about:blank 3<&{to_browser} 4>&{from_browser}'
        self.proc = subprocess.Popen(
            ["bash", "-c", command],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method, session=None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:  # skip events until our answer
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise AssertionError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise AssertionError(f"DevTools {method}: {reply['error']}")
                return reply["result"]

    def page(self, method, **params):
        return self.call(method, session=self.session, **params)

    def js(self, expression):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def close(self):
        try:
            self.call("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.mark.skipif(
    find_chromium() is None, reason="chromium not installed (Debian: apt-get install -y chromium)"
)
def test_web_ui_in_headless_chromium(tmp_path, workdir):
    with server(tmp_path, [TOOL_TURN, "Still hi."], "--allow-tools", str(workdir)) as url:
        browser = Browser(find_chromium(), tmp_path / "profile")
        try:
            browser.page("Page.navigate", url=url + "/")
            deadline = time.monotonic() + 120  # guards a hang only
            while True:
                try:  # evaluating while the navigation swaps documents may fail: try again
                    if (
                        browser.js(
                            "document.readyState === 'complete' && document.body.dataset.state"
                        )
                        == "ready"
                    ):
                        break
                except AssertionError:
                    pass
                assert time.monotonic() < deadline, "the page did not load"
                time.sleep(0.1)
            # type a message and press Send, as a user would
            browser.js(
                "document.getElementById('input').value = 'what is in hello.txt?';"
                "document.getElementById('send').click()"
            )
            seen_streaming = False
            while (state := browser.js("document.body.dataset.state")) != "done":
                assert state in ("streaming", "ready"), browser.js(
                    "document.getElementById('log').innerText"
                )
                seen_streaming |= state == "streaming"
                assert time.monotonic() < deadline, "the reply did not finish"
                time.sleep(0.05)
            log = browser.js("document.getElementById('log').innerText")
            assert "what is in hello.txt?" in log  # the user's message
            assert "Let me look." in log and "It says hi." in log  # the streamed reply
            assert (
                "tool call: bash" in log and "cat hello.txt" in log and "hi there" in log
            )  # the call and its output
            assert browser.js("document.querySelectorAll('.msg.assistant .output').length") == 1
            # a second turn sends the first reply back with its tool parts, which the server must
            # accept
            browser.js(
                "document.getElementById('input').value = 'and now?';"
                "document.getElementById('send').click()"
            )
            while (
                state := browser.js("document.body.dataset.state")
            ) != "done":  # read once: it may finish between reads
                assert state == "streaming", browser.js("document.body.innerText")
                assert time.monotonic() < deadline, "the second reply did not finish"
                time.sleep(0.05)
            assert browser.js("document.querySelectorAll('.msg.assistant').length") == 2
            assert browser.js("document.querySelectorAll('.error').length") == 0
            shot = tmp_path / "ui.png"
            shot.write_bytes(
                base64.b64decode(browser.page("Page.captureScreenshot", format="png")["data"])
            )
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            print(f"screenshot: {shot} (streaming state seen: {seen_streaming})")
        finally:
            browser.close()
