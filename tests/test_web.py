"""The HTTP server with a scripted fake model, started with uvicorn on a free local port: the official
openai client in both modes, tool calls run server-side only with --allow-tools, 4xx errors with a
message for bad requests, and the web UI in headless Chromium (message sent, streamed reply rendered,
screenshot saved)."""
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time

import httpx
import openai
import pytest

from tests.helpers import REPO, real_tokenizer, save_tiny_checkpoint, script_argv, script_env

CALL = '<|tool_start|>{"name": "bash", "arguments": {"command": "cat hello.txt"}}<|tool_end|>'
TOOL_TURN = "Let me look." + CALL + "It says hi."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags, log):
    """Start code_web on a free port and wait for /health; try another port if this one was taken
    meanwhile (other test runs share the machine). Returns (process, url)."""
    for _ in range(3):
        port = free_port()
        with open(log, "w") as f:
            proc = subprocess.Popen(script_argv("scripts.code_web", "--port", str(port), *flags), cwd=REPO,
                                    env=script_env(), stdout=f, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120  # only guards against a hang
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).json().get("pid") == proc.pid:
                    return proc, url
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        stop(proc)
        if "address already in use" not in log.read_text():
            break
    raise AssertionError(f"the server did not come up:\n{log.read_text()}")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def server(tmp_path, turns, *flags, sequence_len=4096):
    """The server on a free port: with a scripted fake model given `turns`, or with `flags` alone if None."""
    if turns is not None:
        script = tmp_path / "script.json"
        script.write_text(json.dumps({"turns": turns, "sequence_len": sequence_len}))
        flags = ("--fake-script", str(script), *flags)
    proc, url = start_server(flags, tmp_path / "server.log")
    try:
        yield url
    finally:
        stop(proc)


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

        resp = client.chat.completions.create(model="nanocode", messages=[{"role": "user", "content": "hello.txt?"}])
        choice = resp.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason == "stop"
        assert choice.message.content == "Let me look.It says hi."
        parts = choice.message.model_extra["parts"]
        assert parts[1] == {"type": "tool_call", "name": "bash", "arguments": {"command": "cat hello.txt"}}
        assert parts[2] == {"type": "tool_output", "text": "hi there\n"}
        assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0

        stream = client.chat.completions.create(model="nanocode", stream=True, messages=[
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "again?"}])
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
        raw = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                              "stream": True}, timeout=60).text
        events = [line for line in raw.split("\n\n") if line]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_tools_off_without_allow_tools_and_bad_requests(tmp_path, workdir):
    turn = "Try." + CALL.replace("cat hello.txt", "echo ran > ran.txt") + "Done."
    with server(tmp_path, [turn], sequence_len=256) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "go"}]}, timeout=60)
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
            ({"messages": [{"role": "tool", "content": "x"}]}, 400,
             "role must be system, user or assistant, got 'tool' (tools run on the server"),
            ({"messages": user + [{"role": "assistant", "content": "hey"}]}, 400, "must end with a user message"),
            ({"messages": [{"role": "user", "content": 5}]}, 400, "content must be a string or a list"),
            ({"messages": user, "temperature": 5}, 400, "'temperature' must be a number in [0.0, 2.0]"),
            ({"messages": user, "temperature": "hot"}, 400, "'temperature' must be a number"),
            ({"messages": user, "max_tokens": 10**6}, 400, "'max_tokens' must be an integer in [1, 1024]"),
            ({"messages": user, "n": 2}, 400, "'n' must be 1"),
            ({"messages": user, "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
            ({"messages": user, "top_k": 0}, 400, "'top_k' must be an integer"),
            ({"messages": user, "stream": "yes"}, 400, "'stream' must be true or false"),
            ({"messages": [{"role": "user", "content": "word " * 300}]}, 400, "too many tokens"),
            (b"x" * 1_100_000, 413, "exceeds the limit"),
        ]
        for body, status, message in bad:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = httpx.post(url + "/v1/chat/completions", headers={"content-type": "application/json"}, timeout=60, **kw)
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"]["message"], (body, r.text)
        r = httpx.get(url + "/v1/nope")
        assert r.status_code == 404 and "GET /v1/nope" in r.json()["error"]["message"]

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model="nanocode", messages=user, temperature=3)
        assert httpx.get(url + "/health").json()["free"] == 1  # no replica leaked by the bad requests


def test_client_disconnect_frees_the_replica(tmp_path):
    # the first reply would take 2000+ tokens x 0.05 s = 100+ s, well past the 60 s guard below
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"turns": ["tick " * 2000, "Fresh reply."], "delay": 0.05}))
    with server(tmp_path, None, "--fake-script", str(script), "--max-tokens", "10000") as url:
        body = {"messages": [{"role": "user", "content": "count"}], "stream": True, "max_tokens": 10000}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if '"content": "' in line)
            assert [next(lines) for _ in range(3)]  # three streamed pieces of the reply, then hang up
        deadline = time.monotonic() + 60  # (guards a hang only)
        while httpx.get(url + "/health").json()["free"] != 1:
            assert time.monotonic() < deadline, "the replica was not released after the client hung up"
            time.sleep(0.1)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.json()["choices"][0]["message"]["content"] == "Fresh reply."


def test_tiny_real_checkpoint_same_reply_streamed_or_not(tmp_path):
    save_tiny_checkpoint("tiny-web", real_tokenizer().vocab_size)
    with server(tmp_path, None, "-i", "sft", "--tag", "tiny-web", "--device-type", "cpu") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        kw = dict(model="nanocode", messages=[{"role": "user", "content": "hello"}], max_tokens=16, temperature=0)
        full = client.chat.completions.create(**kw)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
        assert full.usage.completion_tokens <= 16
        assert streamed == full.choices[0].message.content  # greedy: both modes give the same text
        assert [m.id for m in client.models.list()] == ["nanocode-sft"]


def find_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
    messages separated by NUL bytes, we write to its fd 3 and read its fd 4), so no websocket library
    is needed and we can wait for the page itself to say it is done (virtual-time flags cannot see
    the end of a streamed response)."""

    def __init__(self, chromium, profile):
        to_browser, self._w = os.pipe()
        self._r, from_browser = os.pipe()
        flags = f"--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --window-size=1000,700 " \
                f"--user-data-dir={profile} --remote-debugging-pipe"
        command = f'exec "{chromium}" {flags} about:blank 3<&{to_browser} 4>&{from_browser}'
        self.proc = subprocess.Popen(["bash", "-c", command], pass_fds=(to_browser, from_browser),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

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
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

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


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_web_ui_in_headless_chromium(tmp_path, workdir):
    with server(tmp_path, [TOOL_TURN, "Still hi."], "--allow-tools", str(workdir)) as url:
        browser = Browser(find_chromium(), tmp_path / "profile")
        try:
            browser.page("Page.navigate", url=url + "/")
            deadline = time.monotonic() + 120  # guards a hang only
            while True:
                try:  # evaluating while the navigation swaps documents may fail: try again
                    if browser.js("document.readyState === 'complete' && document.body.dataset.state") == "ready":
                        break
                except AssertionError:
                    pass
                assert time.monotonic() < deadline, "the page did not load"
                time.sleep(0.1)
            # type a message and press Send, as a user would
            browser.js("document.getElementById('input').value = 'what is in hello.txt?';"
                       "document.getElementById('send').click()")
            seen_streaming = False
            while (state := browser.js("document.body.dataset.state")) != "done":
                assert state in ("streaming", "ready"), browser.js("document.getElementById('log').innerText")
                seen_streaming |= state == "streaming"
                assert time.monotonic() < deadline, "the reply did not finish"
                time.sleep(0.05)
            log = browser.js("document.getElementById('log').innerText")
            assert "what is in hello.txt?" in log  # the user's message
            assert "Let me look." in log and "It says hi." in log  # the streamed reply
            assert "tool call: bash" in log and "cat hello.txt" in log and "hi there" in log  # the call and its output
            assert browser.js("document.querySelectorAll('.msg.assistant .output').length") == 1
            # a second turn sends the first reply back with its tool parts, which the server must accept
            browser.js("document.getElementById('input').value = 'and now?';document.getElementById('send').click()")
            while (state := browser.js("document.body.dataset.state")) != "done":  # read once: it may finish between reads
                assert state == "streaming", browser.js("document.body.innerText")
                assert time.monotonic() < deadline, "the second reply did not finish"
                time.sleep(0.05)
            assert browser.js("document.querySelectorAll('.msg.assistant').length") == 2
            assert browser.js("document.querySelectorAll('.error').length") == 0
            shot = tmp_path / "ui.png"
            shot.write_bytes(base64.b64decode(browser.page("Page.captureScreenshot", format="png")["data"]))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            print(f"screenshot: {shot} (streaming state seen: {seen_streaming})")
        finally:
            browser.close()
