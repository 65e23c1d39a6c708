"""Agentic coding tasks with verifiers: what scripts/agent_eval.py runs the agent on.

A task is a small scratch repository, a request, and a verifier:
    {"id": str, "kind": one of KINDS, "files": {path: text}, "request": str,
     "verify": a bash command run in the scratch dir after the agent is done (exit 0 = solved),
     "verify_files": {path: text} written just before the verifier runs (the tests the agent must
                     not weaken, hidden checks under .verify/),
     "deny": [tool names the user refuses], "budget": {"tool_calls": int, "tokens": int},
     "solution": {"calls": [{"name", "arguments"}, ...], "answer": str}}  (the reference solution)
The agent's final text (every text part of its reply) is written to .verify/answer.txt, so "answer"
and "report" tasks are checked by the content of the answer.

Kinds: fix (a bug, so a failing test passes), implement (a function from its docstring and tests),
add_test (a test that passes on the code and fails on a mutant), rename (a function, across two
files), answer (a question about the code), report (run a script, say what it printed), deny (the
user refuses the tool calls the request needs: the file must stay as it was and the answer say so).

The templates here are held out from the SFT data (nanocode/synth.py uses other functions, programs
and phrasings), so the suite measures more than recall of training trajectories. make_suite(seed, n)
is deterministic; nanocode/data/agent_suite.jsonl is make_suite(0, 28), shipped so that numbers are
comparable across runs even if the templates change.
"""

import json
import random
import shutil
import tempfile
from functools import partial
from pathlib import Path

from nanocode.common import NanocodeError, read_jsonl, write_tree
from nanocode.engine import message_text
from nanocode.sandbox import run_command
from nanocode.tools import SCRATCH_SHOWN_AS, run_tool, show_workdir_as

KINDS = ["fix", "implement", "add_test", "rename", "answer", "report", "deny"]
FIELDS = ("id", "kind", "files", "request", "verify", "budget", "solution")
SUITE_PATH = Path(__file__).resolve().parent / "data" / "agent_suite.jsonl"
VERIFY_TIMEOUT = 20.0  # seconds for a verifier (a few python runs)
TOOL_TIMEOUT = 10.0  # seconds per bash call of the agent
# The report's summary numbers of an agent eval (keys of summarize()).
HEADLINE = ["success", "tasks", "valid_call_rate", "calls_per_task", "cut_offs"]

# (name, args, correct body, buggy body, mutant body, docstring, test calls [(call, expected)])
FUNCS = [
    (
        "dedupe",
        "xs",
        "    seen, out = set(), []\n    for x in xs:\n        if x not in seen:\n"
        "            seen.add(x)\n            out.append(x)\n    return out\n",
        "    return list(set(xs))\n",
        "    return xs[:]\n",
        "Return xs without repeated items, keeping the first occurrence of each, in order.",
        [("dedupe([3, 1, 3, 2, 1])", "[3, 1, 2]"), ("dedupe([])", "[]"), ("dedupe([5, 5])", "[5]")],
    ),
    (
        "digit_sum",
        "n",
        "    return sum(int(d) for d in str(abs(n)))\n",
        "    return sum(int(d) for d in str(n)[1:])\n",
        "    return len(str(abs(n)))\n",
        "Return the sum of the decimal digits of the integer n (its sign ignored).",
        [("digit_sum(1234)", "10"), ("digit_sum(-56)", "11"), ("digit_sum(0)", "0")],
    ),
    (
        "is_palindrome",
        "s",
        "    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]\n",
        "    return s == s[::-1]\n",
        "    return len(s) > 0\n",
        "Return True if s reads the same backwards, ignoring case and anything not a letter or "
        "digit.",
        [
            ("is_palindrome('Never odd or even')", "True"),
            ("is_palindrome('abc')", "False"),
            ("is_palindrome('A man, a plan, a canal: Panama')", "True"),
        ],
    ),
    (
        "flatten",
        "rows",
        "    return [x for row in rows for x in row]\n",
        "    return [row[0] for row in rows if row]\n",
        "    return list(rows)\n",
        "Return the items of the lists in rows, one flat list, in order.",
        [
            ("flatten([[1, 2], [3], []])", "[1, 2, 3]"),
            ("flatten([])", "[]"),
            ("flatten([[4], [5, 6]])", "[4, 5, 6]"),
        ],
    ),
    (
        "argmax",
        "xs",
        "    best = 0\n    for i in range(1, len(xs)):\n        if xs[i] > xs[best]:\n"
        "            best = i\n    return best\n",
        "    best = 0\n    for i in range(1, len(xs)):\n        if xs[i] < xs[best]:\n"
        "            best = i\n    return best\n",
        "    return len(xs) - 1\n",
        "Return the index of the largest item of the non-empty list xs (the first one on ties).",
        [("argmax([3, 9, 2])", "1"), ("argmax([7])", "0"), ("argmax([1, 5, 5, 0])", "1")],
    ),
    (
        "title_words",
        "text",
        "    return ' '.join(w[:1].upper() + w[1:] for w in text.split())\n",
        "    return text.upper()\n",
        "    return text\n",
        "Return text with the first letter of every word upper-cased (words split on whitespace, "
        "joined by one space).",
        [
            ("title_words('hello big world')", "'Hello Big World'"),
            ("title_words('a')", "'A'"),
            ("title_words('x  y')", "'X Y'"),
        ],
    ),
    (
        "count_char",
        "s, ch",
        "    return sum(1 for c in s if c == ch)\n",
        "    return s.find(ch) + 1\n",
        "    return 1 if ch in s else 0\n",
        "Return how many times the character ch occurs in s.",
        [
            ("count_char('banana', 'a')", "3"),
            ("count_char('xyz', 'q')", "0"),
            ("count_char('aaaa', 'a')", "4"),
        ],
    ),
    (
        "safe_ratio",
        "a, b",
        "    return 0.0 if b == 0 else a / b\n",
        "    return a / b\n",
        "    return 0.0\n",
        "Return a / b, or 0.0 when b is zero.",
        [("safe_ratio(6, 3)", "2.0"), ("safe_ratio(1, 0)", "0.0"), ("safe_ratio(5, 2)", "2.5")],
    ),
]
MODULES = ["listkit", "numkit", "strkit", "toolbox", "shared", "basics", "ops", "routines"]
CONSTS = ["MAX_RETRIES", "PAGE_SIZE", "CACHE_TTL", "BATCH_LIMIT", "WORKER_COUNT", "PORT_OFFSET"]


def _func_src(name, args, doc, body):
    return f'def {name}({args}):\n    """{doc}"""\n{body}'


def _test_src(mod, name, cases):
    lines = [f"from {mod} import {name}", ""]
    lines += [f"assert {c} == {want}, {c!r} + ' gave ' + repr({c})" for c, want in cases]
    return "\n".join(lines) + "\nprint('ok')\n"


def _call(name, **arguments):
    return {"name": name, "arguments": arguments}


def make_task(rng: random.Random, kind: str, idx: int) -> dict:
    """One task of `kind` (its function, module, phrasing and values drawn from rng)."""
    name, args, good, bad, mutant, doc, cases = rng.choice(FUNCS)
    mod = rng.choice(MODULES)
    src, test, tests = f"{mod}.py", f"test_{mod}.py", _test_src(mod, name, cases)
    solved = _func_src(name, args, doc, good)
    # budget: (tool calls, tokens) the agent gets for the task
    run_test, verify_files, deny, budget = _call("bash", command=f"python {test}"), {}, [], (6, 768)
    if kind == "fix":
        files = {src: _func_src(name, args, doc, bad), test: tests}
        requests = [
            f"`python {test}` fails. Fix the bug in {src} so that it passes.",
            f"The test {test} is failing; find the bug in {src} and fix it.",
        ]
        # the test is written back before it runs: weakening or deleting it gains nothing
        verify, verify_files = f"python {test}", {test: tests}
        calls = [_call("edit_file", path=src, old_string=bad, new_string=good), run_test]
        answer = f"Fixed {name} in {src}; {test} passes."
    elif kind == "implement":
        files = {src: _func_src(name, args, doc, "    raise NotImplementedError\n"), test: tests}
        requests = [
            f"Implement {name} in {src} as its docstring says; {test} must pass.",
            f"Write the body of {name} ({src}) so that `python {test}` passes.",
        ]
        verify, verify_files = f"python {test}", {test: tests}
        calls = [_call("write_file", path=src, content=solved), run_test]
        answer = f"Implemented {name}; {test} passes."
    elif kind == "add_test":
        new = f"test_{name}.py"
        files = {src: solved}
        requests = [
            f"Add a test file {new} for {name} in {src}: plain assert statements, run as "
            f"`python {new}`.",
            f"Write {new}, a script of asserts that checks {name} from {src}.",
        ]
        # the test must pass on the real code and fail on a wrong one; src is written back first,
        # so the test is judged on the real code, not on one the agent changed to suit it
        verify_files = {src: files[src], f".verify/{src}": _func_src(name, args, doc, mutant)}
        verify = f"test -f {new} && python {new} && cp .verify/{src} {src} && ! python {new}"
        calls = [
            _call("write_file", path=new, content=tests),
            _call("bash", command=f"python {new}"),
        ]
        answer, budget = f"Added {new}; it passes.", (5, 768)
    elif kind == "rename":
        new_name = rng.choice(["compute", "run", "apply", "do"]) + "_" + name
        user, (call, want) = f"main_{mod}.py", cases[0]
        files = {src: solved, user: f"from {mod} import {name}\n\nprint({call})\n"}
        requests = f"Rename the function {name} to {new_name} in {src} and in {user}."
        check = (
            f"import {mod}\nassert hasattr({mod}, {new_name!r}) and not hasattr({mod}, {name!r})\n"
        )
        verify_files = {".verify/check.py": check}
        # -w: compute_dedupe is not the old name dedupe ("_" is a word character); the last test
        # compares what main prints with print's text of the expected value, quoted for the shell
        verify = (
            f"! grep -qw {name} {src} {user} && PYTHONPATH=. python .verify/check.py && "
            f'test "$(python {user})" = {json.dumps(str(eval(want)))}'
        )
        renamed = f"from {mod} import {new_name}\n\nprint({call.replace(name, new_name, 1)})\n"
        calls = [
            _call("edit_file", path=src, old_string=f"def {name}(", new_string=f"def {new_name}("),
            _call("write_file", path=user, content=renamed),
            _call("bash", command=f"python {user}"),
        ]
        answer = f"Renamed {name} to {new_name} in both files."
    elif kind == "answer":
        # the value has 3 digits, the other constants 4: quoting a wrong one never matches
        const, value = rng.choice(CONSTS), rng.randint(101, 989)
        others = [c for c in CONSTS if c != const][:2]
        lines = [f"{o} = {rng.randint(1000, 9999)}" for o in others] + [f"{const} = {value}"]
        rng.shuffle(lines)
        files = {"settings.py": "\n".join(lines) + "\n", src: solved}
        requests = [
            f"What is {const} set to in settings.py?",
            f"Look up the value of {const} in this project and tell me.",
        ]
        verify = f"grep -qw {value} .verify/answer.txt"
        calls, answer = [_call("read_file", path="settings.py")], f"{const} is {value}."
        budget = (4, 384)
    elif kind == "report":
        a, b = rng.randint(3, 9), rng.randint(11, 40)
        script = f"total = 0\nfor i in range({a}, {b}):\n    total += i * i % 7\n"
        files = {"tally.py": script + "print('total', total)\n"}
        total = sum(i * i % 7 for i in range(a, b))
        requests = [
            "Run tally.py and tell me what it prints.",
            "What number does `python tally.py` print?",
        ]
        verify = f"grep -qw {total} .verify/answer.txt"
        calls, answer = [_call("bash", command="python tally.py")], f"It prints: total {total}"
        budget = (4, 384)
    elif kind == "deny":
        log = "".join(f"step {i}: ok\n" for i in range(rng.randint(3, 8)))
        target = rng.choice(["build.log", "run.log", "output.log"])
        files = {target: log, "README.md": "A tiny project.\n"}
        requests = [f"Delete {target}.", f"Please remove the file {target}."]
        deny, verify_files = ["bash", "write_file", "edit_file"], {f".verify/{target}": log}
        verify = (
            f"cmp -s {target} .verify/{target} && "
            "grep -qiE 'denied|not allowed|refused|declined|permission' .verify/answer.txt"
        )
        # the reference tries the call; the user denies it, and the answer says so
        calls = [_call("bash", command=f"rm {target}")]
        answer, budget = f"The command was denied, so {target} is still there.", (3, 256)
    else:
        raise NanocodeError(f"unknown task kind {kind!r} (kinds: {', '.join(KINDS)})")
    # the phrasing is drawn last (rename has one), so the draws above give the shipped suite
    request = requests if isinstance(requests, str) else rng.choice(requests)
    return {
        "id": f"{kind}-{idx:03d}",
        "kind": kind,
        "files": files,
        "request": request,
        "verify": verify,
        "verify_files": verify_files,
        "deny": deny,
        "budget": {"tool_calls": budget[0], "tokens": budget[1]},
        "solution": {"calls": calls, "answer": answer},
    }


def make_suite(seed: int = 0, n: int = 28) -> list[dict]:
    """n tasks, the kinds in turn, deterministic from seed."""
    rng = random.Random(seed)
    return [make_task(rng, KINDS[i % len(KINDS)], i) for i in range(n)]


def load_suite(path=None) -> list[dict]:
    """The tasks of a JSONL suite file (default: the shipped one), each checked for its fields."""
    tasks, seen = [], set()
    for where, task in read_jsonl(path or SUITE_PATH, "agent suite file"):
        if not isinstance(task, dict):
            raise NanocodeError(f"{where}: a task must be a JSON object")
        where = f"{where} (task {task.get('id', '?')!r})"
        if missing := [f for f in FIELDS if f not in task]:
            raise NanocodeError(f"{where}: missing field(s) {', '.join(missing)}")
        if task["kind"] not in KINDS:
            raise NanocodeError(
                f"{where}: unknown kind {task['kind']!r} (kinds: {', '.join(KINDS)})"
            )
        if task["id"] in seen:
            raise NanocodeError(f"{where}: duplicate task id")
        seen.add(task["id"])
        tasks.append({"verify_files": {}, "deny": [], **task})
    return tasks


def scratch(task: dict | None) -> Path:
    """A fresh scratch directory holding the task's files, if any (the caller removes it)."""
    root = Path(tempfile.mkdtemp(prefix=f"agent-{task['id']}-" if task else "nanocode-"))
    write_tree(root, task["files"] if task else {})
    return root


def approver(task: dict | None):
    """The user at the approval prompt: every call allowed but the tools the task denies."""
    deny = set(task.get("deny", [])) if task else set()
    return lambda name, arguments: name not in deny


def verify(task: dict, workdir: Path, answer: str) -> tuple[bool, str]:
    """Run the task's verifier in workdir (after the agent): (passed, the verifier's output tail).
    Runs in nanocode.sandbox (the work dir writable, no network, limits); a verifier that cannot
    even start (bash reports 126/127) is the suite's fault, not the agent's: NanocodeError naming
    the task."""
    # Written after the agent is done: every file the verifier reads under .verify/ comes from
    # here, so whatever the agent put there (a fake answer.txt, a copy of check.py) is overwritten.
    write_tree(workdir, {**task.get("verify_files", {}), ".verify/answer.txt": answer})
    result = run_command(task["verify"], workdir, timeout=VERIFY_TIMEOUT)
    if result.returncode in (126, 127):
        raise NanocodeError(
            f"task {task['id']}: the verifier cannot run ({task['verify']!r} exited "
            f"{result.returncode}: {result.output.strip()[-200:]})"
        )
    output = show_workdir_as(result.output, workdir, SCRATCH_SHOWN_AS)  # the same every run
    tail = output[-500:] + ("\n[verifier timed out]" if result.timed_out else "")
    return result.returncode == 0, tail


# -------------------------------------------------------------------------------------------------
# running the agent on tasks, replaying transcripts, scoring


def chat_in_scratch(engine, prompts, tasks, approve=None, strict=True, tool_timeout=None, **kw):
    """Engine.chat_batch on one user prompt per row, each row in a scratch dir of its own (holding
    its task's files; empty for a None task), tools run by tools.run_tool (bash in the sandbox;
    outputs name the dir SCRATCH_SHOWN_AS, as in the SFT data, so samples are reproducible).
    approve: one callable for every row, default: each task's user (approver). A row with a task is
    verified in its dir before the dir goes: result["verdict"] = (passed, verifier output). A
    verifier that cannot run raises (strict) or fails the row. kw: chat_batch's sampling options."""
    convs = [{"messages": [{"role": "user", "content": p}]} for p in prompts]
    approve = approve or [approver(t) for t in tasks]
    runner = partial(run_tool, timeout=tool_timeout or TOOL_TIMEOUT, shown_as=SCRATCH_SHOWN_AS)
    dirs = [scratch(t) for t in tasks]
    try:
        results = engine.chat_batch(convs, approve, dirs, tool_runner=runner, **kw)
        for r, task, d in zip(results, tasks, dirs):
            if task is None:
                continue
            try:
                r["verdict"] = verify(task, d, message_text(r["message"]))
            except Exception as e:  # RL: a broken verifier is reward 0, counted; training goes on
                if strict:
                    raise
                r["verdict"] = (False, f"verifier crashed: {type(e).__name__}: {e}")
        return results
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def call_counts(message: dict) -> tuple[int, int]:
    """(valid tool calls, malformed ones) in an assistant message: the engine keeps a malformed call
    as a text part followed by the error it fed back."""
    parts = message["content"] if isinstance(message["content"], list) else []
    valid = sum(p["type"] == "tool_call" for p in parts)
    malformed = sum(
        p["type"] == "tool_output" and i > 0 and parts[i - 1]["type"] == "text"
        for i, p in enumerate(parts)
    )
    return valid, malformed


def task_record(task: dict, result: dict) -> dict:
    """What agent_eval keeps of a task's run: result is chat_batch's, with its "verdict"."""
    valid, malformed = call_counts(result["message"])
    return {
        "task": task["id"],
        "kind": task["kind"],
        "passed": result["verdict"][0],
        "finish_reason": result["finish_reason"],
        "usage": result["usage"],
        "tool_calls": valid,
        "call_attempts": valid + malformed,
        "verifier": result["verdict"][1],
        "message": result["message"],
    }


def run_tasks(
    engine,
    tasks,
    batch_size=8,
    temperature=0.0,
    top_k=50,
    seed=42,
    max_tokens=None,
    max_tool_calls=None,
    on_done=None,
    grammar=None,
) -> list[dict]:
    """Let the agent do each task (batches of tasks with the same budget decode together), each
    verified in its own scratch dir. max_tokens / max_tool_calls override the tasks' budgets (a
    small context). One record per task, in order; on_done(record) as each is done. grammar:
    decode under it (nanocode.grammar; agent_eval --constrained)."""
    records, groups = [None] * len(tasks), {}
    for i, t in enumerate(tasks):
        budget = (max_tokens or t["budget"]["tokens"], max_tool_calls or t["budget"]["tool_calls"])
        groups.setdefault(budget, []).append(i)
    sampling = dict(temperature=temperature, top_k=top_k, grammar=grammar)
    for (tokens, calls), idx in groups.items():
        options = dict(sampling, max_tokens=tokens, max_tool_calls=calls)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            batch = [tasks[i] for i in chunk]
            results = chat_in_scratch(
                engine, [t["request"] for t in batch], batch, seed=seed + 1000 * chunk[0], **options
            )
            for i, r in zip(chunk, results):
                records[i] = task_record(tasks[i], r)
                if on_done:
                    on_done(records[i])
    return records


def replay(task: dict, message: dict) -> tuple[bool, str]:
    """Re-verify a transcript from anywhere: run its tool calls in order in a fresh scratch dir (the
    task's denials apply, bash in the sandbox), then the verifier, with the message's text as the
    answer."""
    root, allowed = scratch(task), approver(task)
    try:
        for p in message["content"]:
            if p["type"] == "tool_call" and allowed(p["name"], p["arguments"]):
                run_tool(p["name"], p["arguments"], root, timeout=TOOL_TIMEOUT)
        return verify(task, root, message_text(message))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def replay_record(task: dict, message: dict) -> dict:
    """agent_eval's record of a transcript from anywhere, replayed (no usage known)."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    result = {"message": message, "finish_reason": "stop", "usage": usage}
    return task_record(task, result | {"verdict": replay(task, message)})


def read_transcripts(path, tasks_by_id: dict) -> list[tuple[dict, dict]]:
    """(task, message) pairs from a JSONL of {"task": id, "message": {"role": "assistant",
    "content": parts}} (what agent_eval writes, or any system's transcripts in that format); a bad
    line is named."""
    out = []
    for where, rec in read_jsonl(path, "transcripts file"):
        if not isinstance(rec, dict):
            raise NanocodeError(f"{where}: a transcript must be a JSON object")
        task = rec.get("task")
        if not isinstance(task, str) or task not in tasks_by_id:
            raise NanocodeError(f"{where}: 'task' must name a task of the suite, got {task!r}")
        content = rec["message"].get("content") if isinstance(rec.get("message"), dict) else None
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not all(map(_part_ok, content)):
            raise NanocodeError(
                f"{where}: 'message' must be {{'role': 'assistant', 'content': [parts]}} with "
                "text / tool_call (name, arguments) / tool_output parts"
            )
        out.append((tasks_by_id[task], {"role": "assistant", "content": content}))
    return out


def _part_ok(p) -> bool:
    if not isinstance(p, dict) or p.get("type") not in ("text", "tool_call", "tool_output"):
        return False
    if p["type"] == "tool_call":
        return isinstance(p.get("name"), str) and isinstance(p.get("arguments"), dict)
    return isinstance(p.get("text"), str)


def summarize(records: list[dict]) -> dict:
    """Success overall and per kind, valid-call rate, mean calls and tokens per task, cut-offs."""
    n, by_kind = max(len(records), 1), {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r["passed"])
    calls = sum(r["tool_calls"] for r in records)
    attempts = sum(r["call_attempts"] for r in records)
    return {
        "tasks": len(records),
        "success": sum(r["passed"] for r in records) / n,
        "per_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "valid_call_rate": calls / attempts if attempts else None,
        "calls_per_task": calls / n,
        "tokens_per_task": sum(r["usage"]["completion_tokens"] for r in records) / n,
        "cut_offs": sum(r["finish_reason"] == "length" for r in records),
    }
