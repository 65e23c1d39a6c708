"""The isolation boundary: from inside, every attempt to reach the outside fails and leaves it
untouched; legitimate work in the work dir succeeds; no process survives the call. The sandboxed
cases skip only where this machine cannot create the namespaces (the fallback's own tests run
everywhere)."""

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nanocode import sandbox as sb
from nanocode.execution import run_program
from nanocode.tools import run_tool
from tests.helpers import alive

OK, WHY = sb.available()
needs_sandbox = pytest.mark.skipif(not OK, reason=f"no sandbox on this machine: {WHY}")


def run(cmd, wd, timeout=10.0, **kw):
    return sb.run_command(cmd, wd, timeout, **kw)


@pytest.fixture
def wd(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    (d / "inside.txt").write_text("inside")
    return d


@pytest.fixture
def precious(tmp_path):
    d = tmp_path / "precious"
    d.mkdir()
    (d / "a.txt").write_text("keep me")
    return d


@pytest.fixture
def home_secret():
    token = uuid.uuid4().hex
    p = Path.home() / f".nanocode-test-secret-{token[:8]}"
    p.write_text(token)
    yield p, token
    p.unlink()


@needs_sandbox
def test_legit_work_inside_succeeds(wd):
    src = "def test_add():\n    assert 1 + 1 == 2\n"
    r = run(
        f"echo hi > out.txt && cat out.txt inside.txt && python -c 'print(6 * 7)' && "
        f"printf '{src}' > test_x.py && python -m pytest -q -p no:cacheprovider test_x.py",
        wd,
        timeout=60,
    )
    assert r.returncode == 0, r.output
    assert r.output.startswith("hi\ninside42\n") and "1 passed" in r.output
    assert (wd / "out.txt").read_text() == "hi\n"


@needs_sandbox
def test_no_network_unless_asked(wd):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        connect = f"socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        probe = f"python -c \"import socket; {connect}; print('CONNECTED')\""
        r = run(probe, wd)
        assert r.returncode != 0 and "CONNECTED" not in r.output and "refused" in r.output.lower()
        r = run(probe, wd, network=True)  # the same probe does get out when the network is allowed
        assert r.returncode == 0 and "CONNECTED" in r.output, r.output
    finally:
        server.close()


@needs_sandbox
def test_secrets_outside_are_invisible(wd, tmp_path, home_secret):
    (tmp_path / "secret.txt").write_text("s3cr3t-next-door")
    path, token = home_secret
    (wd / "link").symlink_to(path)
    r = run(
        f"cat {path}; cat ~/{path.name}; cat {tmp_path}/secret.txt; cat ../secret.txt; "
        f"cat ../../../..{tmp_path}/secret.txt; "
        f"cat link; cat /etc/shadow; cat /proc/1/root{path}; env",
        wd,
    )
    assert token not in r.output and "s3cr3t" not in r.output
    assert "No such file" in r.output
    assert (
        path.name not in run(f"ls -a {Path.home()} /proc/1/root{Path.home()}", wd).output
    )  # nor listed
    r = run("cat link", wd, mode="off")  # outside the sandbox the same command does read it
    assert token in r.output


@needs_sandbox
def test_scrubbed_environment(wd, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hunter2")
    assert "hunter2" not in run("env", wd).output
    assert "hunter2" in run("env", wd, mode="off").output


@needs_sandbox
def test_writes_and_deletes_outside_fail(wd, precious, tmp_path):
    mark = f"nanocode-test-{uuid.uuid4().hex[:8]}"
    r = run(
        f"echo x > {precious}/new.txt; echo x >> {precious}/a.txt; rm -rf {precious}; "
        "rm -rf ../precious; "
        f"echo x > /usr/{mark}; echo x > /{mark}; echo x > /tmp/{mark}; ls /tmp/{mark}",
        wd,
    )
    assert sorted(p.name for p in precious.iterdir()) == ["a.txt"]
    assert (precious / "a.txt").read_text() == "keep me"
    assert not os.path.exists(f"/usr/{mark}") and not os.path.exists(f"/{mark}")
    assert f"/tmp/{mark}" in r.output and not os.path.exists(f"/tmp/{mark}")  # a private /tmp


@needs_sandbox
def test_read_only_mode(wd):
    r = run(
        "echo x > new.txt; echo x >> inside.txt; rm inside.txt; cat inside.txt",
        wd,
        mode="read-only",
    )
    assert "Read-only file system" in r.output and r.output.rstrip().endswith("inside")
    assert (
        sorted(p.name for p in wd.iterdir()) == ["inside.txt"]
        and (wd / "inside.txt").read_text() == "inside"
    )
    assert run_tool(
        "write_file", {"path": "x", "content": "y"}, wd, sandbox="read-only"
    ).startswith("error: ")
    assert run_tool("bash", {"command": "cat inside.txt"}, wd, sandbox="read-only") == "inside"


@needs_sandbox
def test_outside_processes_are_invisible_and_unkillable(wd):
    token = uuid.uuid4().hex
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token])
    try:
        r = run(
            f"kill -9 {victim.pid}; kill -9 -1; ls /proc; cat /proc/{victim.pid}/cmdline; ps ax", wd
        )
        assert token not in r.output
        assert str(victim.pid) not in r.output.split() or victim.pid < 10
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()


@needs_sandbox
def test_no_capabilities_and_no_sysctl_writes(wd):
    """Mapped to root when nanocode runs as root, the command still holds no capabilities, and the
    host's sysctls (global, under /proc/sys) cannot be written: this one is written with its own
    value."""
    r = run(
        "grep -E 'CapEff|CapBnd|NoNewPrivs' /proc/self/status; "
        "v=$(cat /proc/sys/kernel/printk_ratelimit); "
        "echo $v > /proc/sys/kernel/printk_ratelimit && echo WROTE; "
        "mount -t tmpfs x /tmp && echo MOUNTED",
        wd,
    )
    assert (
        "CapEff:\t0000000000000000" in r.output and "CapBnd:\t0000000000000000" in r.output
    )  # none to regain
    assert "NoNewPrivs:\t1" in r.output  # nor through a setuid program
    assert "WROTE" not in r.output and "MOUNTED" not in r.output


@needs_sandbox
def test_fork_bomb_is_contained(wd):
    token = uuid.uuid4().hex
    r = run(f": {token}; bomb() {{ bomb | bomb & }}; bomb; sleep 2", wd, timeout=5, nproc=32)
    assert "retry" in r.output or "Resource temporarily unavailable" in r.output or r.timed_out
    assert alive(token) == []


@needs_sandbox
def test_file_size_limit(wd):
    r = run("head -c 5000000 /dev/zero > big.bin; echo rc=$?", wd, fsize_mb=1)
    assert "rc=0" not in r.output
    assert (wd / "big.bin").stat().st_size <= 1 << 20


@needs_sandbox
def test_no_process_survives(wd):
    token = uuid.uuid4().hex
    sleeper = f"sh -c 'sleep 300; : {token}'"  # the token stays in its command line
    r = run(
        f"({sleeper} &) ; setsid nohup {sleeper} > /dev/null 2>&1 & {sleeper} & "
        "sleep 0.2; echo started",
        wd,
    )
    assert r.returncode == 0 and r.output == "started\n"
    assert alive(token) == []
    r = run(f"{sleeper} & sleep 300", wd, timeout=1)
    assert r.timed_out and r.returncode is None
    assert alive(token) == []


@needs_sandbox
def test_evaluated_programs_run_inside(tmp_path, home_secret):
    path, token = home_secret
    r = run_program(f"print(open({str(path)!r}).read())")
    assert not r.passed and "FileNotFoundError" in r.status and token not in r.stdout
    # with the Python guard off: the pids cgroup / namespace holds
    bomb = "import os\nwhile True:\n    os.fork()\n"
    r = run_program(bomb, timeout=3, guard=False)
    assert not r.passed
    r = run_program(
        f"print(open({str(path)!r}).read())", sandbox=False
    )  # the guard alone lets it read
    assert r.passed and token in r.stdout


def test_fallback_warns_once_naming_what_is_missing(wd, monkeypatch, capsys):
    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    ok, reason = sb._probe()
    assert not ok and "bubblewrap" in reason
    monkeypatch.setattr(sb, "_available", (False, reason))
    monkeypatch.setattr(sb, "_warned", set())
    for _ in range(2):
        r = run("echo hello", wd)
        assert r.returncode == 0 and r.output == "hello\n"
    err = capsys.readouterr().err
    assert err.count("WARNING: no sandbox") == 1 and "bubblewrap" in err
    assert run_program("print(1)").passed  # the evaluator runs with its guard alone


def test_missing_prlimit_warns_once(wd, monkeypatch, capsys):
    """Without prlimit the rlimits cannot be applied: said once, loudly, never silently."""
    which = sb.shutil.which
    monkeypatch.setattr(sb.shutil, "which", lambda name: None if name == "prlimit" else which(name))
    monkeypatch.setattr(sb, "_warned", set())
    for _ in range(2):
        assert run("echo hi", wd).output == "hi\n"
    err = capsys.readouterr().err
    assert err.count("WARNING: prlimit (util-linux) is not on the PATH: no limits (") == 1
    assert "as, fsize, core, cpu" in err


def test_bad_mode_and_root_workdir(wd):
    with pytest.raises(ValueError, match="unknown sandbox mode"):
        run("true", wd, mode="container")
    assert run_tool("bash", {"command": "true"}, wd, sandbox="container").startswith(
        "error: unknown sandbox mode"
    )


@needs_sandbox
def test_python_installed_under_tmp_is_visible(wd, monkeypatch):
    """A clone and its venv may live under /tmp (CI's fresh clone can): the interpreter's
    directories are bound on top of the private /tmp, not hidden by it, so `python` is found inside.
    """
    venv = Path("/tmp") / f"nanocode-venv-{uuid.uuid4().hex[:8]}"
    (venv / "bin").mkdir(parents=True)
    try:
        (venv / "bin" / "marker").write_text("venv here")
        monkeypatch.setattr(sys, "prefix", str(venv))
        r = run(f"cat {venv}/bin/marker && python3 -c 'print(6 * 7)'", wd)
        assert r.returncode == 0 and "venv here" in r.output and "42" in r.output, r.output
    finally:
        import shutil

        shutil.rmtree(venv)
