"""The sandbox: every kind of misbehaving sample is contained, reported as a failure, leaves nothing
behind outside its scratch dir (no files changed, no processes alive), and the evaluator keeps
going."""

import os

import pytest

from nanocode.execution import run_many, run_program
from tests.helpers import alive


def leftovers(result) -> list[int]:
    """The programs below print their scratch dir first: it is in the command line of their
    processes."""
    return alive(result.stdout.split()[0])


@pytest.fixture
def precious(tmp_path):
    """A directory outside any scratch dir, with files a sample must not touch."""
    d = tmp_path / "precious"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("keep me")
    (d / "sub" / "b.txt").write_text("me too")
    return d


def assert_intact(d):
    assert (d / "a.txt").read_text() == "keep me"
    assert (d / "sub" / "b.txt").read_text() == "me too"
    assert sorted(p.name for p in d.rglob("*")) == ["a.txt", "b.txt", "sub"]


def test_passing_program_and_output():
    r = run_program("print('hello')\nimport sys\nprint('oops', file=sys.stderr)")
    assert r.passed and r.status == "passed"
    assert r.stdout == "hello\n" and r.stderr == "oops\n"


@pytest.mark.parametrize(
    "src,status",
    [
        ("assert 1 == 2", "failed: AssertionError"),
        ("raise ValueError('bad value')", "failed: ValueError: bad value"),
        ("def f(:\n  pass", "failed: SyntaxError: invalid syntax"),
        (
            "import sys; sys.exit(0)",
            "failed: SystemExit: 0",
        ),  # exiting before the tests ran is not passing
        ("exit()", "failed: TypeError: 'NoneType' object is not callable"),
    ],
)
def test_failures_are_reported(src, status):
    r = run_program(src)
    assert not r.passed
    assert r.status == status


@pytest.mark.parametrize("sandbox", [True, False])
def test_infinite_loop_times_out(sandbox):
    r = run_program(
        "print(__import__('os').getcwd(), flush=True)\nwhile True:\n    pass",
        timeout=1.0,
        sandbox=sandbox,
    )
    assert not r.passed and r.status == "timed out"
    assert leftovers(r) == []


@pytest.mark.parametrize("sandbox", [True, False])
def test_fork_bomb_is_contained(sandbox):
    bomb = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    os.fork()\n"
    r = run_program(bomb, timeout=2.0, sandbox=sandbox)
    assert not r.passed and "NoneType" in r.status  # os.fork is disabled in the child
    assert leftovers(r) == []


@pytest.mark.parametrize("sandbox", [True, False])
@pytest.mark.parametrize("main_exits", [False, True])
def test_spawned_processes_die_with_the_session(main_exits, sandbox):
    """Even with the guard off (os.fork enabled) a bounded tree of sleeping children is killed,
    whether the main process hangs (timeout) or exits leaving them behind (no waiting for the
    deadline)."""
    src = (
        "import os, time\n"
        "for _ in range(2):\n"
        "    if os.fork() == 0:\n"
        "        os.fork()\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "print(os.getcwd(), flush=True)\n" + ("" if main_exits else "time.sleep(60)\n")
    )
    r = run_program(src, timeout=5.0 if main_exits else 1.0, guard=False, sandbox=sandbox)
    assert r.status == ("passed" if main_exits else "timed out")
    assert leftovers(r) == []


def test_memory_hog_fails():
    r = run_program(
        "x = []\nwhile True:\n    x.append(bytearray(10**7))", memory_mb=256, timeout=10
    )
    assert not r.passed and r.status == "failed: MemoryError"


def test_file_size_limit():
    r = run_program("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (4 << 20))", fsize_mb=1)
    assert not r.passed and "File too large" in r.status


@pytest.mark.parametrize(
    "src",
    [
        "import os; os.system('rm -rf {d}')",
        "import shutil; shutil.rmtree('{d}')",
        "import subprocess; subprocess.run(['rm', '-rf', '{d}'])",
        "from shutil import rmtree; rmtree('{d}')",
        "import importlib; importlib.import_module('subprocess').run(['rm', '-rf', '{d}'])",
        "import shutil, importlib; importlib.reload(shutil).rmtree('{d}')",
        "import os; os.remove('{d}/a.txt')",
        "import pathlib; pathlib.Path('{d}/a.txt').unlink()",
        "import os; os.rename('{d}/a.txt', 'stolen.txt')",
        "import os; os.chmod('{d}/a.txt', 0)",
    ],
)
def test_deletions_outside_scratch_fail(precious, src):
    r = run_program(src.format(d=precious))
    assert not r.passed and r.status.startswith("failed: ")
    assert_intact(precious)


@pytest.mark.parametrize(
    "src",
    [
        "open('{d}/new.txt', 'w').write('x')",
        "open('{d}/a.txt', 'a').write('x')",
        "open('{d}/a.txt', 'r+').write('x')",
        "import pathlib; pathlib.Path('{d}/a.txt').write_text('x')",
        "import os; os.open('{d}/new.txt', os.O_CREAT | os.O_WRONLY)",
        "import os; os.symlink('{d}/a.txt', 'link'); open('link', 'w').write('x')",
        "open('../' * 20 + '{d}/new.txt', 'w')",
    ],
)
def test_writes_outside_scratch_fail(precious, src):
    r = run_program(src.format(d=precious))
    assert not r.passed and r.status.startswith("failed: ")
    assert_intact(precious)


def test_scratch_dir_is_cwd_writable_and_removed():
    r = run_program(
        "import os\nopen('x.txt', 'w').write('hi')\nprint(os.getcwd())\nprint(open('x.txt').read())"
    )
    assert r.passed, r.status
    cwd, text = r.stdout.split()
    assert "nanocode-exec-" in cwd and text == "hi"
    assert not os.path.exists(cwd)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCODE_SECRET_TOKEN", "hunter2")
    r = run_program("import os\nprint(sorted(os.environ))")
    assert r.passed and "NANOCODE_SECRET_TOKEN" not in r.stdout and "hunter2" not in r.stdout


def test_printing_a_gigabyte_is_cut_off():
    r = run_program(
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)",
        timeout=30,
    )
    assert not r.passed and r.status.startswith("failed: output limit exceeded")
    assert len(r.stdout) <= 2000


@pytest.mark.parametrize(
    "src",
    [
        "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
        "import os, signal; os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
        "import os; os.system('kill -9 %d' % os.getppid())",
    ],
)
def test_killing_the_parent_fails(src):
    r = run_program(src)
    assert not r.passed  # and we, the parent, are still here to see it


def test_reading_stdin_fails_immediately():
    r = run_program("x = input()", timeout=10)
    assert not r.passed and r.status.startswith("failed: EOFError")
    r = run_program("import sys\nassert sys.stdin.read() != ''", timeout=10)
    assert not r.passed and r.status == "failed: AssertionError"


def test_limits_cannot_be_raised():
    r = run_program("import resource")
    assert not r.passed and "resource" in r.status
    r = run_program("import ctypes")
    assert not r.passed and "ctypes" in r.status


def test_evaluator_keeps_going(precious):
    """A batch mixing every kind of bad sample with good ones: results come back in order, the good
    ones pass."""
    bad = [
        "while True: pass",
        "import os\nwhile True: os.fork()",
        "x = bytearray(1 << 40)",
        f"import shutil; shutil.rmtree('{precious}')",
        f"open('{precious}/z', 'w')",
        "import os; os.kill(os.getppid(), 9)",
        "input()",
        "print('x' * (1 << 22))",
    ]
    good = [f"assert {i} + {i} == {2 * i}" for i in range(len(bad))]
    programs = [p for pair in zip(bad, good) for p in pair]
    results = run_many(
        programs, workers=2, timeout=3.0
    )  # generous: the good ones must pass on a busy machine
    assert [r.passed for r in results] == [False, True] * len(bad)
    assert results[0].status == "timed out"
    assert_intact(precious)


def test_odd_characters_do_not_break_the_evaluator():
    """Model output can hold lone surrogates (from JSON), NUL bytes or any Unicode: each is just a
    sample."""
    assert run_program('print("h\u00e9llo \u4e16")').stdout == "h\u00e9llo \u4e16\n"
    assert not run_program("x = 1\x00").passed
    r = run_program('x = "\ud800"\nprint(len(x))')
    assert r.passed and r.stdout == "1\n"
