"""The HTTP server with a scripted fake model, started with uvicorn on a free local port: the
official openai client, 4xx errors with a message for bad requests, streaming, disconnects, and
load. Tools: tests/test_web_tools.py; the chat page: tests/test_web_ui.py."""

import json
import threading
import time

import httpx
import openai
import pytest

from tests.helpers import (
    BASH,
    CALL,
    REPO,
    TOOL_TURN,
    WEATHER,
    hello_workdir,
    real_tokenizer,
    save_tiny_checkpoint,
    serving,
    write_turns,
)

FORMAT = {"name": "when", "parameters": {"type": "string", "format": "date"}}
STRICT = dict(WEATHER["function"], strict="yes")


@pytest.fixture
def workdir(tmp_path):
    return hello_workdir(tmp_path)


def test_openai_client_both_modes_with_tools(tmp_path, workdir):
    with serving(tmp_path, [TOOL_TURN, TOOL_TURN], "--allow-tools", str(workdir)) as url:
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
    with serving(tmp_path, [turn], sequence_len=256) as url:
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
            (
                {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
                400,
                "messages[0].content must be a string or a list of text parts",
            ),
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
    with serving(
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
    with serving(tmp_path, None, "-i", "sft", "--tag", "tiny-web", "--device-type", "cpu") as url:
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


def test_load_32_clients(tmp_path):
    """One replica, 32 concurrent clients: half stream (four of those hang up after the first
    piece), all others get whole, well-formed replies; afterwards no replica is leaked and nothing
    is queued."""
    turns = [f"reply {k}: " + "word " * 8 for k in range(40)]
    with serving(
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
