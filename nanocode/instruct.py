"""Public code-instruct datasets turned into tool-use conversations, with every tool output real.

Sources (fetched once with nanocode.hub.hub_file when online; offline -> one NanocodeError):
    code_alpaca        sahil2801/CodeAlpaca-20k                        JSON [{instruction, input,
                                                                       output}]
    evol_codealpaca    theblackcat102/evol-codealpaca-v1               JSONL {instruction, output}
    magicoder          ise-uiuc/Magicoder-Evol-Instruct-110K           JSONL {instruction, response}
    self_oss_instruct  bigcode/self-oss-instruct-sc2-exec-filter-50k   parquet {instruction,
                                                                       response, ...}
    code_feedback      m-a-p/Code-Feedback                             JSONL {messages: [{role,
                                                                       content}, ...]}

Each (request, answer) turn becomes assistant tool use in a scratch directory
(nanocode.synth_session):
  - the answer has Python code and the request has none: write_file the code, run it with
    python3, and the answer's prose plus what the run really printed is the final text;
  - the request contains code and the answer changes it (difflib ratio >= MIN_SIMILARITY): the old
    code is the starting file; the assistant greps for a name in the changed region, reads those
    lines, applies each changed hunk with edit_file (old_string grown until it is unique in the
    file at that moment), then runs the file; the file must end up equal to the answer's code;
  - no Python code in the answer: the explanation stays text.
Code is first run in the guarded sandbox (nanocode.execution.run_program: time, memory and file
limits, destructive calls disabled); a record whose code fails there or in the session, or whose
edits are not unique or do not reproduce the new code, is dropped, and the reason is counted.
"""

import difflib
import json
import re
from collections import Counter
from pathlib import Path

from nanocode.common import NanocodeError
from nanocode.execution import run_program
from nanocode.synth_session import Session

SOURCES = {
    "code_alpaca": ("sahil2801/CodeAlpaca-20k", "code_alpaca_20k.json", "alpaca"),
    "evol_codealpaca": ("theblackcat102/evol-codealpaca-v1", "train.jsonl", "alpaca"),
    "magicoder": (
        "ise-uiuc/Magicoder-Evol-Instruct-110K",
        "data-evol_instruct-decontaminated.jsonl",
        "response",
    ),
    "self_oss_instruct": (
        "bigcode/self-oss-instruct-sc2-exec-filter-50k",
        "data/train-00000-of-00001.parquet",
        "response",
    ),
    "code_feedback": ("m-a-p/Code-Feedback", "Code-Feedback.jsonl", "messages"),
}
MIN_SIMILARITY = 0.3  # below this the "new" code is a rewrite, not an edit of the old one
MAX_CODE_LINES = 120  # longer programs make rows longer than SFT keeps
MAX_CONTEXT = 6  # lines of context an edit's old_string may add on each side to be unique
RUN_TIMEOUT = 5.0  # seconds; dataset programs that run longer (or wait for input) are dropped
CODE_BLOCK = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)```", re.S)


def fetch(name: str) -> Path:
    """The local path of a source's data file (downloaded once)."""
    from nanocode.hub import hub_file

    if name not in SOURCES:
        raise NanocodeError(f"unknown instruct source {name!r}: use one of {', '.join(SOURCES)}")
    repo, filename, _ = SOURCES[name]
    return hub_file(repo, filename, hint=f"leave {name} out of --mix (synth works offline)")


def read_rows(path) -> list[dict]:
    """Rows of a .json (a list), .jsonl or .parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def turns_of(row: dict, schema: str) -> list[tuple[str, str]]:
    """(request, answer) pairs of one dataset row, in order."""
    if schema == "alpaca":
        extra = row.get("input") or ""
        return [(row["instruction"] + ("\n\n" + extra if extra.strip() else ""), row["output"])]
    if schema == "response":
        return [(row["instruction"], row["response"])]
    msgs = [m for m in row["messages"] if m.get("role") in ("user", "assistant")]
    return [
        (u["content"], a["content"])
        for u, a in zip(msgs[::2], msgs[1::2])
        if u["role"] == "user" and a["role"] == "assistant"
    ]


def python_blocks(text: str) -> list[str]:
    """Code blocks that are Python: tagged python/py, or untagged and parsing as Python."""
    import ast

    out = []
    for lang, code in CODE_BLOCK.findall(text):
        if lang.lower() in ("python", "py", "python3") or not lang:
            try:
                ast.parse(code)
            except (SyntaxError, ValueError):
                continue
            out.append(code.rstrip("\n") + "\n")
    return out


def prose(text: str) -> str:
    """The answer without its code blocks: the explanation around the code."""
    text = CODE_BLOCK.sub("", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def unique_old_string(text: str, start: int, end: int, max_extra: int = MAX_CONTEXT) -> str | None:
    """The shortest run of whole lines containing lines [start, end) (0-based) that occurs once in
    text, with at most max_extra lines of context on each side; None if there is none (the edit is
    not unique)."""
    lines = text.split("\n")
    for extra in range(max_extra + 1):
        lo, hi = max(0, start - extra), min(len(lines), max(end, start + 1) + extra)
        s = "\n".join(lines[lo:hi])
        if s and _occurs_once(text, s):
            return s
    return None


def _occurs_once(text: str, s: str) -> bool:
    """Exactly one occurrence, overlapping ones counted (str.count does not see "a\na" twice in
    "a\na\na")."""
    i = text.find(s)
    return i >= 0 and text.find(s, i + 1) == -1


def hunks(old: str, new: str) -> list[tuple[int, int, list[str]]]:
    """The changed regions of old -> new as (first old line, end old line, new lines), last first,
    so applying one does not move the line numbers of the ones still to apply."""
    a, b = old.split("\n"), new.split("\n")
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return [(i1, i2, b[j1:j2]) for tag, i1, i2, j1, j2 in reversed(ops) if tag != "equal"]


def _name_near(lines: list[str], i: int) -> str | None:
    """An identifier to grep for: the def/class enclosing line i, else a word on the line."""
    for line in reversed(lines[: i + 1]):
        if m := re.match(r"\s*(?:def|class)\s+(\w+)", line):
            return m.group(1)
    # 4+ characters: a grep for `i` or `df` would match nearly every line
    words = re.findall(r"[A-Za-z_]\w{3,}", lines[min(i, len(lines) - 1)]) if lines else []
    return words[0] if words else None


def _report(out: str) -> str:
    lines = out.rstrip("\n").split("\n")
    if out == "(no output)":
        return "It runs without errors (it prints nothing)."
    shown = lines if len(lines) <= 8 else lines[:6] + ["..."] + lines[-1:]
    return "Ran it:\n```\n" + "\n".join(shown) + "\n```"


def convert_turn(s: Session, request: str, answer: str, stats: Counter, path="solution.py") -> bool:
    """Add the assistant's tool use for one (request, answer) turn to session s. False: drop the
    record (`stats` counts why)."""
    new_blocks, old_blocks = python_blocks(answer), python_blocks(request)
    if not new_blocks:
        s.say(answer.strip())
        stats["text"] += 1
        return True
    new = max(new_blocks, key=len)  # the program; shorter blocks are lost (prose() drops them)
    if new.count("\n") > MAX_CODE_LINES:
        stats["dropped: code too long"] += 1
        return False
    old = max(old_blocks, key=len) if old_blocks else new  # no code in the request: no edit
    is_edit = old != new and difflib.SequenceMatcher(None, old, new).ratio() >= MIN_SIMILARITY
    # First under execution's Python guard: code that deletes files, forks or hangs is dropped
    # before the session's bash runs it with only the sandbox around it.
    if not run_program(new, timeout=RUN_TIMEOUT).passed:
        stats["dropped: code does not run"] += 1
        return False
    text = prose(answer)
    if is_edit:
        s.call("write_file", path=path, content=old)  # the user's code, as they pasted it
        lines = old.split("\n")
        first = hunks(old, new)[-1][0]  # hunks come last first: [-1] is the first change
        if name := _name_near(lines, first):
            s.call("grep", pattern=rf"\b{re.escape(name)}\b", path=path)
        s.call("read_file", path=path, offset=max(1, first - 2), limit=min(len(lines), 12))
        for i1, i2, repl in hunks(old, new):
            cur = s.read(path)
            # an insertion or a deletion keeps a neighbouring line in old_string, so that neither
            # side of the edit is empty and the line breaks around it stay right
            lo_ctx = i1 - 1 if (i1 == i2 or not repl) and i1 > 0 else i1
            hi_ctx = i2 + 1 if not repl and i1 == 0 else i2
            old_string = unique_old_string(cur, lo_ctx, hi_ctx)
            if old_string is None:
                stats["dropped: edit not unique"] += 1
                return False
            # Lines above this hunk still have old's numbers (hunks are applied last first), so
            # i1 and i2 index into block once shifted by where old_string starts.
            first_line = cur[: cur.index(old_string)].count("\n")
            block = old_string.split("\n")
            new_string = "\n".join(block[: i1 - first_line] + repl + block[i2 - first_line :])
            out = s.call("edit_file", path=path, old_string=old_string, new_string=new_string)
            if not out.startswith("edited"):
                stats["dropped: edit failed"] += 1
                return False
        if s.read(path) != new:
            stats["dropped: edits do not reproduce the new code"] += 1
            return False
        stats["edit"] += 1
    else:
        s.call("write_file", path=path, content=new)
        stats["write_run"] += 1
    out = s.call("bash", command=f"python3 {path}")
    # tools.bash's notes; a program that prints "timed out" itself is dropped too
    if "[exit code" in out or "timed out" in out:
        stats["dropped: code does not run"] += 1
        stats["edit" if is_edit else "write_run"] -= 1
        return False
    s.say((text + "\n\n" if text else "") + _report(out))
    return True


def convert_row(row: dict, schema: str, stats: Counter) -> dict | None:
    """A dataset row as a conversation record ({"messages", "kind", "files", "final_files"}), or
    None."""
    turns = turns_of(row, schema)
    if not turns:
        stats["dropped: no user turn"] += 1
        return None
    with Session({}) as s:
        for request, answer in turns:
            s.user(request)
            if not convert_turn(s, request, answer, stats):
                return None
        rec = s.record()
    rec["kind"] = "instruct"
    stats["converted"] += 1
    return rec


def convert(rows, schema: str) -> tuple[list[dict], Counter]:
    """The rows that convert, as conversation records, and the count of converted and dropped
    records by reason."""
    stats = Counter()
    records = [convert_row(row, schema, stats) for row in rows]
    return [r for r in records if r is not None], stats
