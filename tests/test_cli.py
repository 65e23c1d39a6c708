"""The CLI, driven through a pseudo-terminal with a scripted fake model: approve (y), refuse (n),
always (a), Ctrl-C stops a reply but not the session; and the one-shot mode without a terminal."""

import json
import os
import pty
import select
import signal
import subprocess
import time

from nanocode import sandbox
from tests.helpers import (
    REPO,
    real_tokenizer,
    save_tiny_checkpoint,
    script_argv,
    script_env,
    tool_calling_checkpoint,
)

CALL = '<|tool_start|>{{"name": "bash", "arguments": {{"command": "{}"}}}}<|tool_end|>'
WRITE = (
    '<|tool_start|>{"name": "write_file", "arguments": {"path": "denied.txt", "content": "x"}}'
    "<|tool_end|>"
)
LABEL = (
    "sandbox workspace-write, network off"
    if sandbox.available()[0]
    else "NO sandbox (unavailable: "
)


class Terminal:
    """A child process on a pseudo-terminal (stdin is a tty, Ctrl-C sends SIGINT), read with
    expect()."""

    def __init__(self, argv, cwd, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            # Started with SIGINT ignored, as a shell's background job would be: the CLI must re-arm
            # Ctrl-C.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        self.out, self.pos = "", 0

    def expect(self, text, timeout=120.0):
        """Wait for `text` after the last match; returns what came before it. (The timeout only
        guards against a hang; nothing is asserted about time.)"""
        deadline = time.monotonic() + timeout
        while (i := self.out.find(text, self.pos)) < 0:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(
                    f"no {text!r} on the terminal; it shows:\n{self.out[self.pos :][-3000:]}"
                )
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(
                    f"the CLI exited before printing {text!r}; it showed:\n{self.out[-3000:]}"
                )
            self.out += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        before, self.pos = self.out[self.pos : i], i + len(text)
        return before

    def send(self, text):
        os.write(self.fd, text.encode())

    def wait(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.out += os.read(self.fd, 4096).decode("utf-8", errors="replace")
            except OSError:
                pass
        self.kill()
        raise AssertionError(f"the CLI did not exit; it showed:\n{self.out[-3000:]}")

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def write_script(path, turns, delay=0.0):
    path.write_text(json.dumps({"turns": turns, "delay": delay}))
    return str(path)


def test_repl_approval_flow_and_ctrl_c(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    turns = [
        "Checking." + CALL.format("echo made > made.txt; echo ran-1") + "Made it.",  # y
        "Writing." + WRITE + "Refused, fine.",  # n
        "Twice." + CALL.format("echo ran-2") + CALL.format("echo ran-3") + "Both done.",  # always
        "tick " * 1000,  # Ctrl-C
        "Still here.",
    ]
    script = write_script(tmp_path / "script.json", turns, delay=0.01)
    argv = script_argv("scripts.code_cli", "--fake-script", script, "--workdir", str(work))
    term = Terminal(argv, REPO, script_env())
    try:
        term.expect("> ")
        term.send("make a file\n")
        term.expect("[tool] bash: echo made > made.txt; echo ran-1")
        term.expect(f"allow ({LABEL})? [y]es / [n]o / [a]lways: ")
        assert not (work / "made.txt").exists()
        term.send("y\n")
        term.expect("  | ran-1")
        term.expect("Made it.")
        assert (work / "made.txt").read_text() == "made\n"

        term.expect("> ")
        term.send("write another\n")
        term.expect("[tool] write_file:")
        term.expect("allow (")
        term.send("n\n")
        term.expect("  | denied by the user")
        term.expect("Refused, fine.")
        assert not (work / "denied.txt").exists()

        term.expect("> ")
        term.send("run two\n")
        term.expect("allow (")
        term.send("a\n")
        term.expect("  | ran-2")
        between = term.expect("  | ran-3")
        assert "allow (" not in between, "'always' should approve later calls without asking"
        term.expect("Both done.")

        term.expect("> ")
        term.send("count forever\n")
        term.expect("tick tick tick")
        term.send("\x03")  # Ctrl-C: SIGINT to the foreground process
        before = term.expect("[interrupted]")
        assert before.count("tick") < 1000
        term.expect("> ")
        term.send("still there?\n")
        term.expect("Still here.")
        term.expect("> ")
        term.send("\x04")  # Ctrl-D leaves
        assert term.wait() == 0
    finally:
        term.kill()


def test_one_shot_without_terminal_refuses_unless_yes(tmp_path):
    script = write_script(
        tmp_path / "script.json", ["Try." + CALL.format("echo ran > f.txt") + "Ok."]
    )
    argv = script_argv(
        "scripts.code_cli", "--fake-script", script, "--workdir", str(tmp_path), "-p", "go"
    )
    out = subprocess.run(
        argv,
        cwd=REPO,
        env=script_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "refused: no terminal to ask on (pass --yes" in out.stdout
    assert "  | denied by the user" in out.stdout and out.stdout.rstrip().endswith("Ok.")
    assert not (tmp_path / "f.txt").exists()

    out = subprocess.run(
        argv + ["--yes"],
        cwd=REPO,
        env=script_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "f.txt").read_text() == "ran\n"


def test_sandbox_modes(tmp_path):
    """--sandbox read-only: the same approved calls change nothing; the default mode writes in the
    workdir only."""
    script = write_script(
        tmp_path / "script.json",
        ["Try." + CALL.format(f"echo ran > f.txt; echo x > {tmp_path}/out.txt") + WRITE + "Ok."],
    )
    work = tmp_path / "work"
    work.mkdir()
    argv = script_argv(
        "scripts.code_cli", "--fake-script", script, "--workdir", str(work), "-p", "go", "--yes"
    )
    out = subprocess.run(
        argv + ["--sandbox", "read-only"],
        cwd=REPO,
        env=script_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in work.iterdir()) == [] and not (tmp_path / "out.txt").exists()
    assert "error: write_file is not allowed: the sandbox is read-only" in out.stdout
    out = subprocess.run(
        argv,
        cwd=REPO,
        env=script_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in work.iterdir()) == ["denied.txt", "f.txt"]
    assert (tmp_path / "out.txt").exists() != sandbox.available()[
        0
    ]  # outside the workdir: only without a sandbox


def test_bad_workdir_is_a_clear_error(tmp_path):
    argv = script_argv("scripts.code_cli", "--workdir", str(tmp_path / "missing"), "-p", "hi")
    out = subprocess.run(
        argv,
        cwd=REPO,
        env=script_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: --workdir {tmp_path / 'missing'} is not a directory"


def test_one_shot_with_tiny_real_checkpoint(tmp_path):
    save_tiny_checkpoint("tiny-cli", real_tokenizer().vocab_size)
    argv = script_argv(
        "scripts.code_cli",
        "-i",
        "sft",
        "--tag",
        "tiny-cli",
        "--device-type",
        "cpu",
        "-t",
        "0",
        "--max-tokens",
        "24",
        "--workdir",
        str(tmp_path),
        "-p",
        "write hello world",
    )
    runs = [
        subprocess.run(
            argv,
            cwd=REPO,
            env=script_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
        )
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert (
        runs[0].stdout.strip() and runs[0].stdout == runs[1].stdout
    )  # greedy: the same reply twice


def test_constrained_calls_with_a_tiny_trained_checkpoint(tmp_path):
    """--constrained: the call this tiny model attempts is one of our tools, valid, and runs
    (unconstrained, on this request, it has named a tool that does not exist)."""
    argv = script_argv(
        "scripts.code_cli",
        *("-i", "sft", "--tag", tool_calling_checkpoint(), "--device-type", "cpu", "-t", "0"),
        *("--max-tokens", "64", "--workdir", str(tmp_path), "--yes", "--constrained"),
        *("-p", "Fix the bug in util.py, please."),
    )
    run = subprocess.run(
        argv, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr
    assert "[tool] " in run.stdout, run.stdout
    assert "error: unknown tool" not in run.stdout and "not valid JSON" not in run.stdout
