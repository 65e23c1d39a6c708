"""The agent's tools: bash, read_file, write_file, edit_file, grep.

One entry point, `run_tool(name, arguments, workdir) -> str`. It never raises: every failure comes
back as text starting with "error: ", because the text is fed to the model as the tool's output and
the model should see what went wrong and try again. Outputs are deterministic (no timings, sorted
walks) so that a recorded trajectory replays to the same outputs.

File tools stay inside `workdir`: a path is joined to the workdir, symlinks are resolved, and the
result must still lie inside the (resolved) workdir (no command runs meanwhile that could swap a
symlink: bash calls are one at a time and leave no process behind). `bash` runs in nanocode.sandbox,
per `sandbox`: "workspace-write" (default: only the workdir and a private /tmp writable, no network
unless network=True, nothing of the user's files outside the workdir visible), "read-only" (the file
tools refuse to write, too), or "off" (a plain subprocess in the workdir: the approval prompt is all
there is).
"""

import json
import math
import os
import re
import sys
from pathlib import Path

from nanocode import sandbox as sb

BASH_TIMEOUT = 30.0  # seconds before the command's whole process group is killed
# characters of tool output kept (the rest is cut, with a note): the output goes into the model's
# context, where a flood would crowd out the task
MAX_OUTPUT = 8000
READ_LIMIT = 2000  # default number of lines read_file shows
GREP_MAX_MATCHES = 100  # matching lines grep reports at most
GREP_LINE_CHARS = 200  # each reported line is cut to this many characters
SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules", ".mypy_cache", ".pytest_cache"}
# Python prints absolute paths in tracebacks, and each scratch dir has a random name; outputs from
# a scratch dir show this fixed name instead (run_tool's shown_as), as if every session ran in it:
# synthetic data replays to the same text, and an eval's samples do not depend on the dir's name.
SCRATCH_SHOWN_AS = "/home/user/project"
# The same for a virtualenv's path, which is wherever the checkout is: Python names it in messages
# ("<venv>/bin/python3: Error while finding module specification ...") and in tracebacks through
# site-packages. Shown as this fixed prefix, two checkouts of one commit sample the same text.
VENV_SHOWN_AS = "/usr/local"


def _schema(name: str, description: str, optional=(), **params) -> dict:
    """A tool's JSON schema. params: name="type" or name=("type", "description"); every parameter is
    required but those named in `optional`."""
    props = {
        k: dict(zip(("type", "description"), (v,) if isinstance(v, str) else v))
        for k, v in params.items()
    }
    required = [k for k in params if k not in optional]
    parameters = dict(
        type="object", properties=props, required=required, additionalProperties=False
    )
    return {"name": name, "description": description, "parameters": parameters}


PATH_PARAM = ("string", "file path, relative to the working directory")
TOOL_SCHEMAS = [
    _schema(
        "bash",
        "Run a shell command in the working directory; returns stdout and stderr together.",
        command=("string", "the command line, run with bash -c"),
    ),
    _schema(
        "read_file",
        "Read a text file with line numbers.",
        ("offset", "limit"),
        path=PATH_PARAM,
        offset=("integer", "first line to show (1-based, default 1)"),
        limit=("integer", f"number of lines to show (default {READ_LIMIT})"),
    ),
    _schema(
        "write_file",
        "Create or overwrite a file with the given content.",
        path="string",
        content="string",
    ),
    _schema(
        "edit_file",
        "Replace old_string by new_string in a file; old_string must occur exactly once.",
        path="string",
        old_string="string",
        new_string="string",
    ),
    _schema(
        "grep",
        "Search files for a Python regular expression; prints path:line:text.",
        ("path",),
        pattern="string",
        path=("string", "file or directory to search (default: the working directory)"),
    ),
]
TOOLS = {s["name"]: s for s in TOOL_SCHEMAS}
JSON_TYPES = {"string": str, "integer": int}


def validate_tool_call(obj, tools: dict | None = None) -> str | None:
    """None if `obj` is {"name": <a tool>, "arguments": {...}} with the right keys and types, else
    the problem. tools: {name: schema} that may be called (default: ours); arguments of tools that
    are not ours are only checked to be an object (their caller, e.g. an API client, owns them)."""
    tools = TOOLS if tools is None else tools
    if not isinstance(obj, dict):
        return f"a tool call must be a JSON object, got {type(obj).__name__}"
    if extra := sorted(set(obj) - {"name", "arguments"}):
        return f"unknown key(s) in tool call: {', '.join(extra)} (expected name and arguments)"
    name, args = obj.get("name"), obj.get("arguments")
    if not isinstance(name, str):
        return "tool call has no string 'name'"
    if name not in tools:
        return f"unknown tool {name!r}: available tools are {', '.join(tools) or 'none'}"
    if not isinstance(args, dict):
        return f"tool call to {name} needs an 'arguments' object"
    if name not in TOOLS:  # a client's tool: its arguments are the client's business
        return None
    params = TOOLS[name]["parameters"]
    for key in params["required"]:
        if key not in args:
            return f"{name} is missing required argument {key!r}"
    for key, value in args.items():
        if key not in params["properties"]:
            allowed = ", ".join(params["properties"])
            return f"{name} got unknown argument {key!r} (allowed: {allowed})"
        want = params["properties"][key]["type"]
        # bool is a subclass of int: without the second test, true would pass as an integer
        if not isinstance(value, JSON_TYPES[want]) or isinstance(value, bool):
            return f"{name} argument {key!r} must be of type {want}, got {type(value).__name__}"
    return None


def finite_number(text: str) -> float:
    """json.loads's parser of the model's numbers: the nearest double, as for 1e-999 (0.0), also
    for 1e999, which a JSON grammar allows: the largest double of its sign, not an inf that a
    reply's strict JSON could not carry (the server would fail)."""
    value = float(text)
    return value if math.isfinite(value) else math.copysign(sys.float_info.max, value)


def no_constant(text: str):
    raise ValueError(f"{text} is not JSON")  # NaN and Infinity, which json.loads would take


def parse_tool_call(text: str, tools: dict | None = None):
    """(call, None) for the text a model wrote between <|tool_start|> and <|tool_end|> when it is a
    valid call of one of `tools` (default: ours), else (None, the problem)."""
    try:
        call = json.loads(text, parse_float=finite_number, parse_constant=no_constant)
    except ValueError as e:  # (json.JSONDecodeError is one)
        return None, f"the tool call is not valid JSON ({e})"
    err = validate_tool_call(call, tools)
    return (call, None) if err is None else (None, err)


def truncate(text: str, limit: int = MAX_OUTPUT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[output truncated: showing {limit} of {len(text)} characters]"


def resolve_path(workdir: Path, path: str) -> Path:
    """The absolute path `path` names; it must lie inside `workdir` once symlinks are resolved."""
    root = Path(workdir).resolve()
    if "\0" in path:
        raise ValueError("path contains a NUL byte")
    p = (root / Path(path).expanduser()).resolve()  # an absolute path replaces root
    # compared by path components, not as a string prefix: /work/ab is not inside /work/a
    if p != root and root not in p.parents:
        raise ValueError(f"path {path!r} is outside the working directory")
    return p


def bash(command, workdir, timeout=BASH_TIMEOUT, sandbox="workspace-write", network=False) -> str:
    """Run `command` through nanocode.sandbox; its combined output (cut to MAX_OUTPUT) plus a note
    on a nonzero exit code or a timeout, or "(no output)"."""
    # 4x the kept characters: the note then says how much more there was
    r = sb.run_command(command, workdir, timeout, sandbox, network, max_output=4 * MAX_OUTPUT)
    if r.timed_out:
        note = f"\nerror: command timed out after {timeout:g} s (killed)"
    else:
        note = f"\n[exit code {r.returncode}]" if r.returncode else ""
    return truncate(r.output) + note if r.output or note else "(no output)"


def read_file(path: str, workdir: Path, offset: int = 1, limit: int = READ_LIMIT) -> str:
    """Lines offset..offset+limit-1 (1-based) of a file, each prefixed by its number (as `cat -n`),
    with a note when more lines follow. Bytes that are not UTF-8 show as U+FFFD."""
    p = resolve_path(workdir, path)
    if not p.is_file():
        return f"error: no such file: {path}"
    if offset < 1 or limit < 1:
        return "error: offset and limit must be at least 1"
    lines = p.read_bytes().decode("utf-8", errors="replace").splitlines()
    if not lines:
        return "(empty file)"
    if offset > len(lines):
        return f"error: offset {offset} is past the end of {path} ({len(lines)} lines)"
    shown = lines[offset - 1 : offset - 1 + limit]
    text = "\n".join(f"{i:6d}\t{line}" for i, line in enumerate(shown, start=offset))
    end = offset - 1 + len(shown)
    if end < len(lines):
        text += f"\n[showing lines {offset}-{end} of {len(lines)}; use offset to read more]"
    return truncate(text)


def write_file(path: str, content: str, workdir: Path) -> str:
    """Write `content` as UTF-8, creating missing parent directories; reports the bytes written."""
    p = resolve_path(workdir, path)
    if p.is_dir():
        return f"error: {path} is a directory"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(content, encoding="utf-8")
    return f"wrote {len(content.encode('utf-8'))} bytes to {path}"


def edit_file(path: str, old_string: str, new_string: str, workdir: Path) -> str:
    """Replace the one occurrence of old_string. Zero or several occurrences is an error that
    tells the model to quote more context, so an edit never lands in the wrong place."""
    p = resolve_path(workdir, path)
    if not p.is_file():
        return f"error: no such file: {path}"
    if not old_string:
        return "error: old_string is empty"
    # bytes that are not UTF-8 come back as U+FFFD and are written back so: text files only
    text = p.read_text(encoding="utf-8", errors="replace")
    count = text.count(old_string)
    if count != 1:
        where = "does not occur" if count == 0 else f"occurs {count} times"
        return (
            f"error: old_string {where} in {path}; it must occur exactly once "
            "(include more surrounding lines)"
        )
    p.write_text(text.replace(old_string, new_string, 1), encoding="utf-8")
    return f"edited {path}"


def grep(pattern: str, workdir: Path, path: str = ".") -> str:
    """Lines matching a Python regex in a file or, sorted, the files under a directory (skipping
    binary files and SKIP_DIRS), as path:line:text relative to workdir; at most GREP_MAX_MATCHES."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        return f"error: invalid regex {pattern!r}: {e}"
    root = Path(workdir).resolve()
    start = resolve_path(root, path)
    if not start.exists():
        return f"error: no such file or directory: {path}"
    hits = []
    for f in [start] if start.is_file() else _walk(start):
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:  # binary
            continue
        lines = data.decode("utf-8", errors="replace").splitlines()
        hits += [(f, n, line) for n, line in enumerate(lines, start=1) if regex.search(line)]
    shown = [f"{f.relative_to(root)}:{n}:{line[:GREP_LINE_CHARS]}" for f, n, line in hits]
    shown = shown[:GREP_MAX_MATCHES]
    if len(hits) > len(shown):
        shown.append(f"[showing {len(shown)} of {len(hits)} matching lines]")
    return truncate("\n".join(shown)) if shown else "no matches"


def _walk(top: Path):
    """Files under `top` in sorted order, skipping VCS/cache dirs and symlinks that leave `top`."""
    for dirpath, dirnames, filenames in os.walk(top):
        # assigned in place: os.walk descends only into the dirs left here, in this order
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not p.is_symlink() or top in p.resolve().parents:
                yield p


def run_tool(
    name,
    arguments,
    workdir,
    timeout=BASH_TIMEOUT,
    sandbox="workspace-write",
    network=False,
    shown_as=None,
) -> str:
    """Run one tool call and return its output text; failures come back as "error: ..." (never
    raised). sandbox: "workspace-write" | "read-only" | "off" (see the module docstring); network:
    for bash. shown_as: a path the output names instead of workdir (the synthetic data's fixed
    project dir, so that a scratch dir's random name never reaches the training data)."""
    workdir = Path(workdir)
    err = validate_tool_call({"name": name, "arguments": arguments})
    if sandbox not in sb.MODES:
        err = err or f"unknown sandbox mode {sandbox!r}"
    if not workdir.is_dir():
        err = err or f"working directory {workdir} does not exist"
    if sandbox == "read-only" and name in ("write_file", "edit_file"):
        err = err or f"{name} is not allowed: the sandbox is read-only"
    try:
        if err:
            out = f"error: {err}"
        elif name == "bash":
            out = bash(arguments["command"], workdir, timeout, sandbox, network)
        else:
            tool = {"read_file": read_file, "write_file": write_file, "edit_file": edit_file}
            out = tool.get(name, grep)(workdir=workdir, **arguments)  # validated: the rest is grep
    except ValueError as e:  # resolve_path's refusals among them (outside the workdir, a NUL)
        out = f"error: {e}"
    except Exception as e:  # noqa: BLE001 -- the model gets the failure as text, and goes on
        out = f"error: {type(e).__name__}: {e}"
    return out if shown_as is None else show_workdir_as(out, workdir, shown_as)


def show_workdir_as(text: str, workdir, shown_as: str) -> str:
    """`text` with the work dir's path written as `shown_as`, and our virtualenv's as VENV_SHOWN_AS
    (run_tool's outputs; a verifier's)."""
    workdir = Path(workdir)
    if sys.prefix != sys.base_prefix:  # a venv (outside one, the prefix is the machine's Python)
        text = text.replace(sys.prefix + os.sep, VENV_SHOWN_AS + os.sep)
    # both spellings: the resolved one (tracebacks, pwd) and the one the caller gave, which
    # differ where the workdir lies under a symlink (macOS: /tmp -> /private/tmp)
    return text.replace(str(workdir.resolve()), shown_as).replace(str(workdir), shown_as)


def tools_prompt(schemas=TOOL_SCHEMAS) -> str:
    """A compact description of tools ({name, description, parameters} each) for a system prompt."""
    return 'Tools (call as JSON {"name": ..., "arguments": {...}}):\n' + "\n".join(
        json.dumps(s, separators=(",", ":")) for s in schemas
    )
