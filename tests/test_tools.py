"""Agent tools: confinement to the workdir, edit uniqueness, bash timeout/truncation, validation,
determinism."""

import functools
import os
import sys

import pytest

from nanocode import tools
from nanocode.tools import TOOL_SCHEMAS, run_tool, validate_tool_call


@pytest.fixture
def wd(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    (d / "a.py").write_text("def f():\n    return 1\n\nprint(f())\n")
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text("hello\nworld\nhello again\n")
    (tmp_path / "secret.txt").write_text("top secret\n")
    return d


def test_read_file_numbered_with_offset_limit(wd):
    out = run_tool("read_file", {"path": "a.py"}, wd)
    assert out.splitlines()[0] == "     1\tdef f():"
    assert out.splitlines()[3] == "     4\tprint(f())"
    out = run_tool("read_file", {"path": "a.py", "offset": 2, "limit": 2}, wd)
    assert out.splitlines()[:2] == ["     2\t    return 1", "     3\t"]
    assert "showing lines 2-3 of 4" in out
    assert run_tool("read_file", {"path": "a.py", "offset": 9}, wd).startswith(
        "error: offset 9 is past the end"
    )
    assert run_tool("read_file", {"path": "nope.py"}, wd) == "error: no such file: nope.py"


@pytest.mark.parametrize("path", ["../secret.txt", "sub/../../secret.txt", "/etc/passwd"])
def test_file_tools_refuse_paths_outside_workdir(wd, path):
    for name, args in [
        ("read_file", {"path": path}),
        ("write_file", {"path": path, "content": "x"}),
        ("edit_file", {"path": path, "old_string": "top", "new_string": "x"}),
        ("grep", {"pattern": "secret", "path": path}),
    ]:
        out = run_tool(name, args, wd)
        assert out.startswith("error: ") and "outside the working directory" in out, (name, out)
    assert (wd.parent / "secret.txt").read_text() == "top secret\n"


def test_absolute_path_inside_workdir_is_allowed(wd):
    assert "def f" in run_tool("read_file", {"path": str(wd / "a.py")}, wd)


def test_symlink_pointing_out_is_refused(wd):
    os.symlink(wd.parent / "secret.txt", wd / "link.txt")
    os.symlink(wd.parent, wd / "up")
    assert "outside the working directory" in run_tool("read_file", {"path": "link.txt"}, wd)
    assert "outside the working directory" in run_tool(
        "write_file", {"path": "up/new.txt", "content": "x"}, wd
    )
    assert not (wd.parent / "new.txt").exists()
    # a recursive grep skips symlinks that lead out of the workdir
    assert "secret" not in run_tool("grep", {"pattern": "top secret"}, wd)


def test_write_and_edit_file(wd):
    assert (
        run_tool("write_file", {"path": "new/dir/c.py", "content": "x = 1\nx = 1\n"}, wd)
        == "wrote 12 bytes to new/dir/c.py"
    )
    out = run_tool(
        "edit_file", {"path": "new/dir/c.py", "old_string": "x = 1", "new_string": "y"}, wd
    )
    assert out.startswith("error: ") and "occurs 2 times" in out
    out = run_tool("edit_file", {"path": "new/dir/c.py", "old_string": "z", "new_string": "y"}, wd)
    assert out.startswith("error: ") and "does not occur" in out
    assert (wd / "new/dir/c.py").read_text() == "x = 1\nx = 1\n"
    out = run_tool(
        "edit_file",
        {"path": "new/dir/c.py", "old_string": "x = 1\nx", "new_string": "y = 2\nx"},
        wd,
    )
    assert out == "edited new/dir/c.py"
    assert (wd / "new/dir/c.py").read_text() == "y = 2\nx = 1\n"


def test_grep(wd):
    out = run_tool("grep", {"pattern": r"hel+o"}, wd)
    assert out.splitlines() == ["sub/b.txt:1:hello", "sub/b.txt:3:hello again"]
    assert run_tool("grep", {"pattern": "return", "path": "a.py"}, wd) == "a.py:2:    return 1"
    assert run_tool("grep", {"pattern": "zzz"}, wd) == "no matches"
    assert run_tool("grep", {"pattern": "("}, wd).startswith("error: invalid regex")


def test_grep_caps_matches(wd, monkeypatch):
    monkeypatch.setattr(tools, "GREP_MAX_MATCHES", 3)
    (wd / "many.txt").write_text("m\n" * 10)
    out = run_tool("grep", {"pattern": "^m$"}, wd)
    assert out.splitlines()[-1] == "[showing 3 of 10 matching lines]"


def test_bash_runs_in_workdir_and_reports_exit_code(wd):
    assert run_tool("bash", {"command": "ls sub"}, wd) == "b.txt\n"
    out = run_tool("bash", {"command": "echo oops >&2; exit 3"}, wd)
    assert out == "oops\n\n[exit code 3]"
    assert run_tool("bash", {"command": "true"}, wd) == "(no output)"


def test_bash_timeout_kills_process_group(wd):
    # the background child would keep the pipe open forever if only bash itself were killed
    out = run_tool("bash", {"command": "echo started; sleep 60 & sleep 60"}, wd, timeout=1)
    assert out.startswith("started\n")
    assert "error: command timed out after 1 s" in out


def test_bash_output_truncated_with_note(wd):
    out = run_tool("bash", {"command": "yes abc | head -c 20000"}, wd)
    assert len(out) < tools.MAX_OUTPUT + 100
    assert out.endswith(f"[output truncated: showing {tools.MAX_OUTPUT} of 20000 characters]")


def test_validate_tool_call():
    assert validate_tool_call({"name": "bash", "arguments": {"command": "ls"}}) is None
    assert (
        validate_tool_call({"name": "read_file", "arguments": {"path": "a", "offset": 2}}) is None
    )
    assert "unknown tool 'rm'" in validate_tool_call({"name": "rm", "arguments": {}})
    assert "missing required argument 'command'" in validate_tool_call(
        {"name": "bash", "arguments": {}}
    )
    assert "unknown argument 'cwd'" in validate_tool_call(
        {"name": "bash", "arguments": {"command": "ls", "cwd": "/"}}
    )
    for offset in ("2", True, 2.0):
        err = validate_tool_call(
            {"name": "read_file", "arguments": {"path": "a", "offset": offset}}
        )
        assert "argument 'offset' must be of type integer" in err
    assert "must be a JSON object" in validate_tool_call(["bash"])
    assert "needs an 'arguments' object" in validate_tool_call({"name": "bash"})
    assert "unknown key" in validate_tool_call(
        {"name": "bash", "arguments": {"command": "ls"}, "id": 1}
    )
    assert {s["name"] for s in TOOL_SCHEMAS} == {
        "bash",
        "read_file",
        "write_file",
        "edit_file",
        "grep",
    }


def test_run_tool_never_raises(wd):
    assert run_tool("nope", {}, wd).startswith("error: unknown tool")
    assert run_tool("bash", {"command": 5}, wd).startswith("error: ")
    assert run_tool("read_file", {"path": "a.py"}, wd / "missing").startswith(
        "error: working directory"
    )
    assert (
        run_tool("write_file", {"path": "sub", "content": "x"}, wd) == "error: sub is a directory"
    )
    assert run_tool("read_file", {"path": "a\0b"}, wd).startswith("error: ")


def test_outputs_are_deterministic(wd):
    calls = [
        ("bash", {"command": "ls -1"}),
        ("grep", {"pattern": "l"}),
        ("read_file", {"path": "sub/b.txt"}),
    ]
    assert [run_tool(n, a, wd) for n, a in calls] == [run_tool(n, a, wd) for n, a in calls]


@pytest.mark.parametrize("sandbox", ["workspace-write", "off"])
def test_bash_runs_an_edited_module_not_its_stale_bytecode(wd, monkeypatch, sandbox):
    """An edit that keeps a module's size and mtime (an agent's edit within the same second) must
    run the new code: Python would trust a cached .pyc, so none is written."""
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    (wd / "lib.py").write_text("X = 1\n")
    (wd / "main.py").write_text("import lib\nprint(lib.X)\n")
    run = functools.partial(run_tool, "bash", {"command": "python main.py"}, wd, sandbox=sandbox)
    assert run().startswith("1")
    mtime = os.stat(wd / "lib.py").st_mtime_ns
    edit = {"path": "lib.py", "old_string": "X = 1", "new_string": "X = 2"}
    assert not run_tool("edit_file", edit, wd, sandbox=sandbox).startswith("error")
    os.utime(wd / "lib.py", ns=(mtime, mtime))
    assert run().startswith("2")


def test_numbers_in_a_call_are_ones_a_reply_can_carry():
    """A grammar lets a model write 1e999 for a "number" (json.loads makes it inf, which the
    server's strict JSON reply could not carry): it becomes the largest double; NaN and Infinity
    (not JSON) make the call malformed."""
    text = '{"name": "get_weather", "arguments": {"city": "Oslo", "days": NUMBER}}'
    schemas = {
        "get_weather": {"properties": {"city": {"type": "string"}, "days": {"type": "number"}}}
    }
    for number, value in [
        ("15", 15),
        ("-1e999", -sys.float_info.max),
        ("1e999", sys.float_info.max),
    ]:
        call, err = tools.parse_tool_call(text.replace("NUMBER", number), schemas)
        assert err is None and call["arguments"]["days"] == value, err
    for number in ["NaN", "Infinity", "-Infinity"]:
        call, err = tools.parse_tool_call(text.replace("NUMBER", number), schemas)
        assert call is None and "not valid JSON" in err, err
