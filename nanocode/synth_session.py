"""Where synthetic trajectories run: a scratch directory in which every tool call really executes.

A Session holds the files of one trajectory in a temp dir and the conversation built so far. The
generator acts like the agent: `call` runs a tool through `nanocode.tools.run_tool` and records the
call and its real output; `deny` records a call the user refused (the output is the engine's DENIED
text, the tool never runs); `user` starts a new turn (multi-turn sessions). Nothing a tool "printed"
is ever written by hand, and `replay` re-runs a record to prove it.

A record: {"messages": [...], "kind": str, "files": {path: text} before, "final_files": {path: text}
after, "last_turn_files": the files when the last user turn began (multi-turn records only), and
"setup": a shell command run before the first turn (e.g. `git init`), when there is one}.
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

from nanocode.common import write_tree
from nanocode.engine import DENIED
from nanocode.tools import SCRATCH_SHOWN_AS, run_tool, validate_tool_call


def read_tree(root: Path) -> dict:
    """Every text file under root (no __pycache__ or .git), by relative path, sorted."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and ".git" not in p.relative_to(root).parts:
            out[str(p.relative_to(root))] = p.read_text(encoding="utf-8", errors="replace")
    return out


class Session:
    """A scratch copy of the files where the assistant's tool calls really run. Collects the
    conversation: user turns, and per assistant turn its text, tool calls and their real outputs."""

    def __init__(self, files: dict, setup: str | None = None):
        """Write `files` into a fresh temp dir (removed on leaving the `with` block) and run the
        `setup` shell command there; a failing setup raises CalledProcessError."""
        self.files, self.setup = dict(files), setup
        self.dir = Path(tempfile.mkdtemp(prefix="nanocode-synth-"))
        write_tree(self.dir, files)
        if setup:  # the generator's own command (e.g. git init), trusted: no sandbox
            subprocess.run(["bash", "-c", setup], cwd=self.dir, check=True, capture_output=True)
        self.messages, self.parts, self.last_turn_files = [], [], None

    def say(self, text: str):
        if text and self.parts and self.parts[-1]["type"] == "text":
            self.parts[-1]["text"] += "\n\n" + text
        elif text:
            self.parts.append({"type": "text", "text": text})

    def call(self, name: str, **arguments) -> str:
        # bash runs in run_tool's default sandbox (workspace-write, no network): code from a
        # dataset that the generator runs can write nothing outside this scratch dir
        out = run_tool(name, arguments, self.dir, shown_as=SCRATCH_SHOWN_AS)
        return self._record_call(name, arguments, out)

    def deny(self, name: str, **arguments) -> str:
        """A call the user refused at the approval prompt: recorded, never run."""
        return self._record_call(name, arguments, DENIED)

    def _record_call(self, name: str, arguments: dict, out: str) -> str:
        self.parts.append({"type": "tool_call", "name": name, "arguments": arguments})
        self.parts.append({"type": "tool_output", "text": out})
        return out

    def read(self, path: str) -> str:
        """The current text of a file (for the generator's own decisions; not a tool call)."""
        return (self.dir / path).read_text(encoding="utf-8")

    def user(self, text: str):
        """Close the assistant turn in progress (if any) and start a new user turn."""
        self.end_turn()
        if self.messages:  # a follow-up: the files as the earlier turns left them (a pair's start)
            self.last_turn_files = read_tree(self.dir)
        self.messages.append({"role": "user", "content": text})

    def end_turn(self):
        if self.parts:
            self.messages.append({"role": "assistant", "content": self.parts})
            self.parts = []

    def record(self, user: str | None = None) -> dict:
        """The finished conversation; `user` is the first user message if user() was not called."""
        self.end_turn()
        msgs = ([{"role": "user", "content": user}] if user is not None else []) + self.messages
        rec = {"messages": msgs, "files": self.files, "final_files": read_tree(self.dir)}
        rec.update({"setup": self.setup} if self.setup else {})
        if self.last_turn_files is not None:
            rec["last_turn_files"] = self.last_turn_files
        return rec

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)


def execute_turns(files: dict, turns: list, setup: str | None = None) -> tuple[list, dict]:
    """Run the tool calls of each assistant turn (a list of parts), in order, in one fresh scratch
    copy of `files`: returns the turns with every tool output replaced by what the tool really
    printed (a denied call stays denied), and the files at the end."""
    out = []
    with Session(files, setup) as s:
        for parts in turns:
            for part, after in zip(parts, parts[1:] + [None]):
                # a denied call is known by the DENIED output the record has after it
                if part["type"] == "tool_call" and after == {"type": "tool_output", "text": DENIED}:
                    s.deny(part["name"], **part["arguments"])
                elif part["type"] == "tool_call":
                    s.call(part["name"], **part["arguments"])
                elif part["type"] == "text":
                    s.parts.append(part)
            out.append(s.parts)
            s.parts = []
        return out, read_tree(s.dir)


def execute_after(files: dict, done: list, plan: list) -> list:
    """The parts of `plan` executed from `files`, where `done` holds parts already executed from
    `files` (real outputs). When plan's valid tool calls are the first calls of `done`, in order,
    the same calls on the same files print the same (replay checks it): they get done's outputs
    and nothing runs; a call that fails validation runs nothing anyway. Otherwise the plan runs in
    a scratch copy."""
    done_calls = [(p, done[i + 1]) for i, p in enumerate(done) if p["type"] == "tool_call"]
    out, k = [], 0
    for part in plan:
        if part["type"] == "text":
            out.append(part)
        elif part["type"] == "tool_call":
            if k < len(done_calls) and done_calls[k][0] == part:
                out += [part, done_calls[k][1]]
                k += 1
            elif err := validate_tool_call({"name": part["name"], "arguments": part["arguments"]}):
                out += [part, {"type": "tool_output", "text": f"error: {err}"}]
            else:
                return execute_turns(files, [plan])[0][0]
    return out


def assistant_turns(record: dict) -> list:
    msgs = [m for m in record["messages"] if m["role"] == "assistant"]
    return [m["content"] for m in msgs if isinstance(m["content"], list)]


def replay(record: dict) -> tuple[list, dict]:
    """Re-run a record (or a pair's side, given as {"files", "messages"}): returns (mismatches,
    final files) where mismatches lists (output index, recorded output, replayed output)."""
    turns = assistant_turns(record)
    replayed, final = execute_turns(record["files"], turns, record.get("setup"))
    recorded = [p["text"] for parts in turns for p in parts if p["type"] == "tool_output"]
    got = [p["text"] for parts in replayed for p in parts if p["type"] == "tool_output"]
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(recorded, got)) if a != b]
    if len(recorded) != len(got):
        mismatches.append((-1, f"{len(recorded)} outputs", f"{len(got)} outputs"))
    return mismatches, final


def call_shape(record: dict) -> str:
    """The tool-call sequence of a record: tool names per turn ("-" a turn with no call, "!" a
    denied call, "|" between turns), e.g. "grep read_file edit_file bash|read_file"."""
    turns = []
    for parts in assistant_turns(record) or [[]]:
        calls = [
            (p["name"], o["text"]) for p, o in zip(parts, parts[1:]) if p["type"] == "tool_call"
        ]
        turns.append(" ".join(n + ("!" if o == DENIED else "") for n, o in calls) or "-")
    return "|".join(turns)
