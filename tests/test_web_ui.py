"""The chat page at / in headless Chromium: a message sent, the streamed reply rendered, a
screenshot saved (skipped where no Chromium is installed)."""

import base64
import json
import os
import shutil
import subprocess
import time

import pytest

from tests.helpers import (
    TOOL_TURN,
    hello_workdir,
    serving,
)


@pytest.fixture
def workdir(tmp_path):
    return hello_workdir(tmp_path)


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
    with serving(tmp_path, [TOOL_TURN, "Still hi."], "--allow-tools", str(workdir)) as url:
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
