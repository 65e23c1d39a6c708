"""Tools through the HTTP server: client-side tool calls with the official openai SDK (the server
runs nothing), server-side tools with --allow-tools (each conversation in its own copy of the
directory), and the API key such a server needs on a public address."""

import json
import subprocess
import threading

import httpx
import openai
import pytest

from tests.helpers import (
    BASH,
    CALL,
    REPO,
    WEATHER,
    free_port,
    hello_workdir,
    script_argv,
    script_env,
    serving,
)


@pytest.fixture
def workdir(tmp_path):
    return hello_workdir(tmp_path)


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
    with serving(
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


def test_server_side_tools_per_conversation(tmp_path, workdir):
    """--allow-tools: each conversation works in its own copy of the directory (two at once here),
    found again by its conversation_id; the directory itself is untouched."""
    command = "mktemp -p . XXXXXX.new >/dev/null; ls"
    make = CALL.replace("cat hello.txt", command)
    with serving(tmp_path, [make + "Made."] * 4, "--allow-tools", str(workdir)) as url:

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
