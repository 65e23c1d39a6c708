"""Synthetic tool-use trajectories and DPO preference pairs, with tool outputs from really running the tools.

Every trajectory starts from a small set of files: functions taken from the local code corpus
(`nanocode.dataset.iter_documents`) or small programs from the templates below. The generator writes
them into a scratch directory and acts like the agent: each tool call goes through
`nanocode.tools.run_tool` in that directory, its real output is recorded, and the next step and the
assistant's text are chosen from what the output actually says. Nothing a tool "printed" is written by
hand. The assistant's text follows SOUL.md: it reads before editing, verifies, states what the tool
output showed, and skips praise and filler.

A trajectory record is a conversation with three extra keys, so it can be replayed and checked:
    {"messages": [user, assistant], "kind": str, "files": {path: text} before, "final_files": {path: text} after}
Kinds (TASKS): explain, grep_explain, edit, write_run, test_fix, missing_file, edit_not_found,
edit_not_unique, command_not_found. Phrasing varies by template and seed; the same seed gives the
same records (as long as the tools and the Python running them behave the same).

A preference pair (for scripts/code_dpo.py) keeps the trajectory's user turn as the prompt, its
assistant message as "chosen", and a "rejected" message with one flaw (PAIR_KINDS):
    malformed_call   a tool call naming a tool that does not exist or passing the wrong arguments
    not_unique       an edit_file whose old_string occurs more than once, then a claim that it worked
    unbacked_claim   the verification (or the reading) is skipped but the answer claims its result
    style            the same work wrapped in praise, filler and hedging (breaks SOUL.md)
The rejected side's tool calls are also really executed, from the same starting files ("files").
"""
import ast
import random
import re
import shutil
import tempfile
from pathlib import Path

from nanocode.tools import run_tool

TASKS = ["explain", "grep_explain", "edit", "write_run", "test_fix",
         "missing_file", "edit_not_found", "edit_not_unique", "command_not_found"]
TASK_WEIGHTS = [2, 2, 3, 2, 3, 1, 1, 1, 1]
PAIR_KINDS = ["malformed_call", "not_unique", "unbacked_claim", "style"]


def pick(rng, *options):
    return options[rng.randrange(len(options))]


# -----------------------------------------------------------------------------
# running tools for real

def write_tree(root: Path, files: dict):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


def read_tree(root: Path) -> dict:
    """Every text file under root (no __pycache__), by relative path, sorted."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            out[str(p.relative_to(root))] = p.read_text(encoding="utf-8", errors="replace")
    return out


class Session:
    """A scratch copy of the files where the assistant's tool calls really run. Collects the parts
    of the assistant message: text, tool calls, and the tools' real outputs."""

    def __init__(self, files: dict):
        self.files = dict(files)
        self.dir = Path(tempfile.mkdtemp(prefix="nanocode-synth-"))
        write_tree(self.dir, files)
        self.parts = []

    def say(self, text: str):
        if self.parts and self.parts[-1]["type"] == "text":
            self.parts[-1]["text"] += "\n\n" + text
        else:
            self.parts.append({"type": "text", "text": text})

    def call(self, name: str, **arguments) -> str:
        out = run_tool(name, arguments, self.dir)
        self.parts.append({"type": "tool_call", "name": name, "arguments": arguments})
        self.parts.append({"type": "tool_output", "text": out})
        return out

    def final_files(self) -> dict:
        return read_tree(self.dir)

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def execute(files: dict, parts: list) -> tuple[list, dict]:
    """Run the tool calls of `parts` in order in a fresh scratch copy of `files`; return the parts with
    every tool output replaced by what the tool really printed, and the files at the end."""
    out = []
    with Session(files) as s:
        for part in parts:
            if part["type"] == "tool_call":
                out.append(part)
                out.append({"type": "tool_output", "text": run_tool(part["name"], part["arguments"], s.dir)})
            elif part["type"] == "text":
                out.append(part)
        return out, s.final_files()


def replay(record: dict) -> tuple[list, dict]:
    """Re-run a trajectory (or a pair's side, given as {"files", "messages"}): returns (mismatches,
    final files) where mismatches lists (part index, recorded output, replayed output)."""
    parts = record["messages"][-1]["content"]
    replayed, final = execute(record["files"], parts)
    recorded = [p["text"] for p in parts if p["type"] == "tool_output"]
    got = [p["text"] for p in replayed if p["type"] == "tool_output"]
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(recorded, got)) if a != b]
    if len(recorded) != len(got):
        mismatches.append((-1, f"{len(recorded)} outputs", f"{len(got)} outputs"))
    return mismatches, final


# -----------------------------------------------------------------------------
# functions from the corpus

def _segment(src: str, node, limit: int = 48) -> str | None:
    s = ast.get_source_segment(src, node)
    return s if s and "\n" not in s and len(s) <= limit else None


def describe_function(src: str) -> dict:
    """Facts about a top-level function, read off its AST: what an honest explanation may say."""
    fn = ast.parse(src).body[0]
    args = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
    if fn.args.vararg:
        args.append("*" + fn.args.vararg.arg)
    if fn.args.kwarg:
        args.append("**" + fn.args.kwarg.arg)
    facts = {"name": fn.name, "args": args, "doc": None, "loops": [], "ifs": [], "calls": [], "returns": [],
             "raises": [], "catches": [], "yields": False, "defaults": []}
    doc = ast.get_docstring(fn)
    if doc:
        first = doc.strip().split("\n\n")[0].replace("\n", " ")
        first = re.split(r"(?<=\.)\s", first)[0]
        if len(first) <= 120:
            facts["doc"] = first
    pos = fn.args.posonlyargs + fn.args.args
    for a, d in zip(pos[len(pos) - len(fn.args.defaults):], fn.args.defaults):
        if isinstance(d, ast.Constant) and type(d.value) in (int, bool):
            facts["defaults"].append((a.arg, d.value))
    for node in ast.walk(fn):
        if isinstance(node, ast.For) and (t := _segment(src, node.target)) and (it := _segment(src, node.iter)):
            facts["loops"].append(f"{t} in {it}")
        elif isinstance(node, ast.While) and (t := _segment(src, node.test)):
            facts["loops"].append(f"while {t}")
        elif isinstance(node, ast.If) and (t := _segment(src, node.test, 40)):
            facts["ifs"].append(t)
        elif isinstance(node, ast.Call) and (c := _segment(src, node.func, 30)):
            if c not in facts["calls"]:
                facts["calls"].append(c)
        elif isinstance(node, ast.Return):
            r = _segment(src, node.value, 40) if node.value is not None else "None"
            if r and r not in facts["returns"]:
                facts["returns"].append(r)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if (e := _segment(src, exc, 30)) and e not in facts["raises"]:
                facts["raises"].append(e)
        elif isinstance(node, ast.ExceptHandler) and node.type is not None and (e := _segment(src, node.type, 30)):
            facts["catches"].append(e)
        elif isinstance(node, (ast.Yield, ast.YieldFrom)):
            facts["yields"] = True
    facts["has_doc"] = doc is not None
    facts["body_line"] = fn.body[1].lineno if doc and len(fn.body) > 1 else fn.body[0].lineno  # 1-based, in src
    return facts


def corpus_functions(docs, limit: int = 2000, min_lines: int = 4, max_lines: int = 22) -> list[dict]:
    """Short, plain top-level Python functions from corpus documents, as {"src", "facts"}."""
    out = []
    for doc in docs:
        if doc.get("lang") != "python":
            continue
        text = doc["text"]
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.decorator_list:
                continue
            n = node.end_lineno - node.lineno + 1
            src = "\n".join(lines[node.lineno - 1:node.end_lineno])
            if not (min_lines <= n <= max_lines) or "\t" in src or "\r" in src or not src.isascii():
                continue
            if any(len(line) > 100 for line in src.splitlines()) or '"""' in src.split("\n", 1)[0]:
                continue
            try:
                facts = describe_function(src)
            except (SyntaxError, ValueError, IndexError):
                continue
            out.append({"src": src, "facts": facts})
            if len(out) >= limit:
                return out
    return out


MODULE_NAMES = ["utils", "helpers", "core", "tools", "common", "misc", "support", "parsing", "io_utils", "text"]
MODULE_DIRS = ["", "src/", "lib/", "app/", "pkg/"]


def corpus_module(rng, funcs: list) -> tuple[str, str, dict, dict]:
    """A module file made of 1-3 corpus functions: (path, text, the chosen function, its line range)."""
    chosen = rng.sample(funcs, rng.randint(1, 3))
    names = [f["facts"]["name"] for f in chosen]
    while len(set(names)) != len(names):  # duplicate names would make "the function" ambiguous
        chosen.pop()
        names.pop()
    target = rng.randrange(len(chosen))
    path = pick(rng, *MODULE_DIRS) + pick(rng, *MODULE_NAMES) + ".py"
    text, line = "", 1
    for i, f in enumerate(chosen):
        if i == target:
            start = line
        text += f["src"] + "\n\n\n"
        line += f["src"].count("\n") + 3
    text = text.rstrip("\n") + "\n"
    f = chosen[target]
    return path, text, f, {"start": start, "end": start + f["src"].count("\n")}


def _list(items: list, limit: int = 3) -> str:
    items = [f"`{x}`" for x in items[:limit]]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def explain(rng, facts: dict, path: str, lines: dict) -> str:
    """A short explanation built only from facts visible in the code the assistant just read."""
    name = facts["name"]
    s = [pick(rng, f"`{name}` is at lines {lines['start']}-{lines['end']} of `{path}`.",
              f"`{name}` (`{path}`, lines {lines['start']}-{lines['end']}):",
              f"Here's what `{name}` does, from lines {lines['start']}-{lines['end']} of `{path}`.")]
    if facts["doc"]:
        s.append(pick(rng, f"Its docstring says: \"{facts['doc']}\"", f"The docstring sums it up: \"{facts['doc']}\""))
    args = [a for a in facts["args"] if a not in ("self", "cls")]
    s.append(f"It takes {_list(args, 4)}." if args else "It takes no arguments.")
    body = []
    if facts["loops"]:
        body.append(f"loops over `{facts['loops'][0]}`" if not facts["loops"][0].startswith("while")
                    else f"loops `{facts['loops'][0]}`")
    if facts["ifs"]:
        body.append(f"branches on `{facts['ifs'][0]}`")
    if facts["catches"]:
        body.append(f"catches `{facts['catches'][0]}`")
    if facts["raises"]:
        body.append(f"raises {_list(facts['raises'], 2)}")
    if body:
        s.append("It " + (body[0] if len(body) == 1 else ", ".join(body[:-1]) + " and " + body[-1]) + ".")
    calls = [c for c in facts["calls"] if c not in facts["raises"]]
    if calls:
        s.append(pick(rng, f"It calls {_list(calls)}.", f"Along the way it calls {_list(calls)}."))
    if facts["yields"]:
        s.append("It is a generator: it yields its results instead of returning them.")
    elif facts["returns"] == ["None"] or not facts["returns"]:
        s.append("It returns nothing useful (None); it works by side effect.")
    elif len(facts["returns"]) == 1:
        s.append(f"It returns `{facts['returns'][0]}`.")
    else:
        s.append(f"Depending on the path it returns {_list(facts['returns'], 3).replace(' and ', ' or ')}.")
    return " ".join(s)


# -----------------------------------------------------------------------------
# small program templates (write_run) and buggy-function templates (test_fix and friends)

def _program(rng):
    """(user request, file name, source, argv string) for a small deterministic program."""
    k = rng.randrange(8)
    if k == 0:
        n = rng.randint(5, 15)
        return (f"Write a script that prints the first {n} Fibonacci numbers.", pick(rng, "fib.py", "fibonacci.py"),
                f"def fib(n):\n    a, b = 0, 1\n    out = []\n    for _ in range(n):\n        out.append(a)\n"
                f"        a, b = b, a + b\n    return out\n\n\nif __name__ == \"__main__\":\n    print(*fib({n}))\n", "")
    if k == 1:
        n = rng.randint(20, 80)
        return (f"I need a small program that lists the primes below {n}.", pick(rng, "primes.py", "sieve.py"),
                f"def primes_below(n):\n    is_prime = [True] * n\n    out = []\n    for i in range(2, n):\n"
                f"        if is_prime[i]:\n            out.append(i)\n            for j in range(i * i, n, i):\n"
                f"                is_prime[j] = False\n    return out\n\n\nif __name__ == \"__main__\":\n"
                f"    print(*primes_below({n}))\n", "")
    if k == 2:
        n = rng.randint(10, 20)
        return (f"Write fizzbuzz up to {n} and run it.", "fizzbuzz.py",
                f"for i in range(1, {n} + 1):\n    if i % 15 == 0:\n        print(\"FizzBuzz\")\n    elif i % 3 == 0:\n"
                f"        print(\"Fizz\")\n    elif i % 5 == 0:\n        print(\"Buzz\")\n    else:\n        print(i)\n", "")
    if k == 3:
        lo, step = rng.choice([-20, -10, 0]), rng.choice([5, 10, 20])
        hi = lo + step * rng.randint(3, 6)
        return (f"Make a Celsius to Fahrenheit table from {lo} to {hi} in steps of {step}.",
                pick(rng, "temps.py", "c2f.py"),
                f"for c in range({lo}, {hi} + 1, {step}):\n    f = c * 9 / 5 + 32\n    print(f\"{{c:>4}} C = {{f:6.1f}} F\")\n", "")
    if k == 4:
        n = rng.randint(6, 60)
        return (f"How many Collatz steps does {n} take to reach 1? Write a script to compute it.", "collatz.py",
                "import sys\n\n\ndef collatz_steps(n):\n    steps = 0\n    while n != 1:\n"
                "        n = n // 2 if n % 2 == 0 else 3 * n + 1\n        steps += 1\n    return steps\n\n\n"
                "if __name__ == \"__main__\":\n    n = int(sys.argv[1])\n    print(f\"{n} takes {collatz_steps(n)} steps\")\n",
                f" {n}")
    if k == 5:
        words = rng.sample(["tool", "model", "token", "file", "test", "loop", "patch", "shell", "agent", "batch"], 4)
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 10)))
        return (f"Write a script that counts how often each word occurs in the text given on the command line, "
                f"most frequent first, and try it on \"{sentence}\".", pick(rng, "wordfreq.py", "count_words.py"),
                "import sys\nfrom collections import Counter\n\ncounts = Counter(\" \".join(sys.argv[1:]).split())\n"
                "for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):\n    print(f\"{word}: {n}\")\n",
                f" \"{sentence}\"")
    if k == 6:
        a, b = rng.randint(2, 40) * rng.randint(1, 6), rng.randint(2, 40) * rng.randint(1, 6)
        return (f"Write a tiny gcd/lcm calculator and run it on {a} and {b}.", pick(rng, "gcd.py", "gcdlcm.py"),
                "import sys\n\n\ndef gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n\n\n"
                "if __name__ == \"__main__\":\n    a, b = int(sys.argv[1]), int(sys.argv[2])\n"
                "    print(f\"gcd = {gcd(a, b)}\")\n    print(f\"lcm = {a * b // gcd(a, b)}\")\n", f" {a} {b}")
    text = pick(rng, "racecar", "level up", "nanocode", "step on no pets", "abc cba", "python")
    return (f"Write a script that reverses a string and says whether it is a palindrome; test it with \"{text}\".",
            pick(rng, "palindrome.py", "reverse.py"),
            "import sys\n\ns = sys.argv[1]\nprint(f\"reversed: {s[::-1]}\")\nprint(f\"palindrome: {s == s[::-1]}\")\n",
            f" \"{text}\"")


# Each: function name, correct source, (buggy line, fixed line) options, and a test-input generator.
BUGGY = [
    ("mean", "def mean(xs):\n    return sum(xs) / len(xs)\n",
     [("    return sum(xs) / len(xs)", "    return sum(xs) / (len(xs) - 1)"),
      ("    return sum(xs) / len(xs)", "    return sum(xs[1:]) / len(xs)")],
     lambda r: [[r.randint(1, 9) for _ in range(r.randint(2, 5))] for _ in range(3)]),
    ("clamp", "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n",
     [("    return max(lo, min(x, hi))", "    return max(lo, min(x, lo))"),
      ("    return max(lo, min(x, hi))", "    return min(lo, max(x, hi))")],
     lambda r: [(r.randint(-20, 20), -5, 5), (r.randint(6, 30), 0, r.randint(1, 5)), (2, 0, 10)]),
    ("factorial", "def factorial(n):\n    result = 1\n    for i in range(1, n + 1):\n        result *= i\n    return result\n",
     [("    for i in range(1, n + 1):", "    for i in range(1, n):"),
      ("    result = 1", "    result = 0")],
     lambda r: [r.randint(3, 8), r.randint(2, 6), 1]),
    ("count_vowels", "def count_vowels(s):\n    return sum(1 for c in s.lower() if c in \"aeiou\")\n",
     [("    return sum(1 for c in s.lower() if c in \"aeiou\")", "    return sum(1 for c in s if c in \"aeiou\")"),
      ("    return sum(1 for c in s.lower() if c in \"aeiou\")", "    return sum(1 for c in s.lower() if c in \"aeio\")")],
     lambda r: [pick(r, "Audio", "Queue", "EUROPE"), pick(r, "unicorn", "umbrella", "Ubuntu"), "sky"]),
    ("last_n", "def last_n(xs, n):\n    return xs[-n:]\n",
     [("    return xs[-n:]", "    return xs[n:]"), ("    return xs[-n:]", "    return xs[:n]")],
     lambda r: [(list(range(r.randint(5, 9))), r.randint(2, 3)), ([4, 5, 6, 7], 1)]),
    ("c_to_f", "def c_to_f(c):\n    return c * 9 / 5 + 32\n",
     [("    return c * 9 / 5 + 32", "    return c * 5 / 9 + 32"), ("    return c * 9 / 5 + 32", "    return (c + 32) * 9 / 5")],
     lambda r: [r.choice([0, 10, 20, 30]), 100, r.choice([-40, 37])]),
    ("chunk", "def chunk(xs, size):\n    return [xs[i:i + size] for i in range(0, len(xs), size)]\n",
     [("    return [xs[i:i + size] for i in range(0, len(xs), size)]",
       "    return [xs[i:i + size] for i in range(0, len(xs) - size, size)]")],
     lambda r: [(list(range(r.randint(5, 9))), r.choice([2, 3])), ([1, 2], 2)]),
    ("word_count", "def word_count(text):\n    return len(text.split())\n",
     [("    return len(text.split())", "    return len(text.split(\" \"))")],
     lambda r: ["one  two", pick(r, "a b c", "x y"), " padded words here "]),
    ("is_leap", "def is_leap(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n",
     [("    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)", "    return year % 4 == 0 and year % 100 != 0"),
      ("    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)", "    return year % 4 == 0")],
     lambda r: [2000, 1900, r.choice([2024, 2020, 1996]), r.choice([2023, 2019])]),
    ("running_total", "def running_total(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n"
     "        out.append(total)\n    return out\n",
     [("        total += x", "        total = x")],
     lambda r: [[r.randint(1, 9) for _ in range(r.randint(3, 5))], [5]]),
    ("median", "def median(xs):\n    s = sorted(xs)\n    mid = len(s) // 2\n    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2\n",
     [("    s = sorted(xs)", "    s = list(xs)")],
     lambda r: [[r.randint(1, 9) for _ in range(r.choice([3, 5]))] + [10], [9, 1, 5], [4, 2, 8, 6]]),
]
MODULES = ["mathutils", "helpers", "util", "funcs", "lib", "core", "calc", "textutil"]


def buggy_task(rng, broken: bool = True):
    """(files, module path, test path, fname, buggy line, fixed line): a module and its test script.
    Retries inputs until the tests really distinguish the bug (checked by running the real function)."""
    fname, src, bugs, gen = BUGGY[rng.randrange(len(BUGGY))]
    good, bad = bugs[rng.randrange(len(bugs))]
    ns_good, ns_bad = {}, {}
    exec(src, ns_good)
    exec(src.replace(good, bad), ns_bad)
    for _ in range(20):
        cases = gen(rng)
        args = [c if isinstance(c, tuple) else (c,) for c in cases]
        try:
            outs_bad = [repr(ns_bad[fname](*a)) for a in args]
        except Exception:  # noqa: BLE001 -- a crashing bug is fine too
            outs_bad = None
        outs = [ns_good[fname](*a) for a in args]
        if outs_bad is None or outs_bad != [repr(o) for o in outs]:
            break
    mod = pick(rng, *MODULES)
    test = f"test_{mod}.py"
    lines = [f"from {mod} import {fname}", ""]
    for i, (a, want) in enumerate(zip(args, outs), 1):
        call = f"{fname}({', '.join(map(repr, a))})"
        lines += ["", f"def test_{fname}_{i}():", f"    got = {call}",
                  f"    assert got == {want!r}, f\"{call.replace('{', '{{').replace('}', '}}')} returned {{got!r}}, expected {want!r}\"", ""]
    lines += ["", "if __name__ == \"__main__\":", "    import sys", "    failed = 0",
              "    tests = [(n, f) for n, f in list(globals().items()) if n.startswith(\"test_\")]",
              "    for name, fn in tests:", "        try:", "            fn()", "            print(f\"PASS {name}\")",
              "        except Exception as e:", "            failed += 1",
              "            print(f\"FAIL {name}: {type(e).__name__}: {e}\")",
              "    print(f\"{len(tests) - failed} passed, {failed} failed\")", "    sys.exit(1 if failed else 0)", ""]
    code = src.replace(good, bad) if broken else src
    return {f"{mod}.py": code, test: "\n".join(lines)}, f"{mod}.py", test, fname, bad, good


def _summary_line(out: str) -> str:
    m = re.search(r"(\d+) passed, (\d+) failed", out)
    return m.group(0) if m else out.strip().splitlines()[-1]


def _line_of(text: str, needle: str) -> int:
    return text[:text.index(needle)].count("\n") + 1


def unique_context(text: str, line_no: int) -> str:
    """The shortest run of whole lines around line `line_no` (1-based) that occurs exactly once in text."""
    lines = text.split("\n")
    lo = hi = line_no - 1
    while True:
        s = "\n".join(lines[lo:hi + 1])
        if text.count(s) == 1 or (lo == 0 and hi == len(lines) - 1):
            return s
        if lo > 0:
            lo -= 1
        if text.count("\n".join(lines[lo:hi + 1])) != 1 and hi < len(lines) - 1:
            hi += 1


# -----------------------------------------------------------------------------
# the trajectories

OPEN_READ = ["Let me read it first.", "I'll look at the file.", "Reading the file first.", "Let me open it."]
OPEN_GREP = ["I'll find where it's defined.", "Let me search for the definition.", "First, where is it defined?"]


def t_explain(rng, funcs):
    path, text, f, lines = corpus_module(rng, funcs)
    name = f["facts"]["name"]
    user = pick(rng, f"What does `{name}` in {path} do?", f"Can you explain the function {name} in {path}?",
                f"Explain `{name}` ({path}) briefly.", f"I'm reading {path}. What is {name} for?")
    with Session({path: text}) as s:
        s.say(pick(rng, *OPEN_READ))
        s.call("read_file", path=path)
        s.say(explain(rng, f["facts"], path, lines))
        return user, s.files, s.parts, s.final_files()


def _grep_read(s, rng, name):
    """grep for a definition, then read the lines around the hit. Returns (path, first line shown)."""
    out = s.call("grep", pattern=rf"def {name}\(")
    path, line = out.split("\n")[0].split(":")[:2]
    offset = max(1, int(line) - 1)
    return path, offset


def t_grep_explain(rng, funcs):
    path, text, f, lines = corpus_module(rng, funcs)
    other_path, other_text, _, _ = corpus_module(rng, funcs)
    files = {path: text} if other_path == path else {path: text, other_path: other_text}
    name = f["facts"]["name"]
    if other_path != path and re.search(rf"def {name}\(", other_text):
        files = {path: text}
    user = pick(rng, f"What does {name} do?", f"Where is `{name}` defined, and what does it do?",
                f"Explain {name} to me.", f"Walk me through `{name}`.")
    with Session(files) as s:
        s.say(pick(rng, *OPEN_GREP))
        p, offset = _grep_read(s, rng, name)
        s.call("read_file", path=p, offset=offset, limit=lines["end"] - lines["start"] + 3)
        s.say(explain(rng, f["facts"], p, lines))
        return user, s.files, s.parts, s.final_files()


def _edit_request(rng, f, text, lines):
    """One targeted change to function f in a module: (request text, old_string, new_string, summary)."""
    facts, lines_all = f["facts"], text.split("\n")
    name = facts["name"]
    options = ["guard"] if facts["args"] and facts["args"][0] not in ("self", "cls") and not facts["args"][0].startswith("*") else []
    if not facts["has_doc"]:
        options.append("doc")
    if facts["defaults"]:
        options.append("default")
    kind = pick(rng, *options) if options else None
    if kind == "doc":
        def_line = lines["start"] + next(i for i, l in enumerate(f["src"].split("\n")) if l.rstrip().endswith(":"))
        old = unique_context(text, def_line)
        body = lines_all[def_line]
        indent = body[:len(body) - len(body.lstrip())] or "    "
        doc = name.strip("_").replace("_", " ").capitalize()
        new = old + f"\n{indent}\"\"\"{doc}.\"\"\""
        return (pick(rng, f"`{name}` has no docstring. Add a one-line one: \"{doc}.\"",
                     f"Please add the docstring \"{doc}.\" to {name}."), old, new, f"added the docstring to `{name}`")
    if kind == "default":
        arg, val = facts["defaults"][0]
        newval = (not val) if isinstance(val, bool) else (val * 2 if val else 1)
        hit = next((i for i in range(lines["start"], lines["end"] + 1) if re.search(rf"\b{arg}\s*=\s*{val!r}(?![\w.])", lines_all[i - 1])), None)
        if hit is not None:
            old = unique_context(text, hit)
            new = re.sub(rf"\b({arg}\s*=\s*){val!r}(?![\w.])", rf"\g<1>{newval!r}", old, count=1)
            return (pick(rng, f"Change the default of `{arg}` in `{name}` from {val!r} to {newval!r}.",
                         f"In {name}, make {arg} default to {newval!r} instead of {val!r}."),
                    old, new, f"`{arg}` now defaults to `{newval!r}` in `{name}`")
    if options and options[0] == "guard":  # chosen, or the fallback when no default matched
        arg = facts["args"][0]
        body_line = lines["start"] + facts["body_line"] - 1
        old = unique_context(text, body_line)
        body = lines_all[body_line - 1]
        indent = body[:len(body) - len(body.lstrip())]
        guard = f"{indent}if {arg} is None:\n{indent}    raise ValueError(\"{arg} must not be None\")\n"
        return (pick(rng, f"Make `{name}` raise a ValueError when `{arg}` is None.",
                     f"{name} should fail fast with ValueError if {arg} is None. Can you add that?"),
                old, guard + old, f"`{name}` now raises `ValueError` when `{arg}` is None")
    return None


def t_edit(rng, funcs):
    for _ in range(20):
        path, text, f, lines = corpus_module(rng, funcs)
        req = _edit_request(rng, f, text, lines)
        if req:
            break
    request, old, new, summary = req
    name = f["facts"]["name"]
    user = request if rng.random() < 0.5 else f"In {path}: " + request[0].lower() + request[1:]
    with Session({path: text}) as s:
        s.say(pick(rng, *OPEN_GREP))
        p, offset = _grep_read(s, rng, name)
        s.call("read_file", path=p, offset=offset, limit=lines["end"] - lines["start"] + 3)
        s.say(pick(rng, "Now the edit.", "I'll make the change.", "Making the edit."))
        out = s.call("edit_file", path=p, old_string=old, new_string=new)
        assert out.startswith("edited"), out
        if rng.random() < 0.5:
            out = s.call("bash", command=f"python3 -m py_compile {p} && echo compiles")
            check = "it still compiles" if out.strip() == "compiles" else "compiling it failed:\n" + out
        else:
            s.call("read_file", path=p, offset=offset, limit=lines["end"] - lines["start"] + 3 + new.count("\n") - old.count("\n"))
            check = "the read-back shows the new lines in place"
        s.say(pick(rng, f"Done: {summary}; {check}.", f"{summary[0].upper() + summary[1:]}. Checked: {check}."))
        return user, s.files, s.parts, s.final_files()


def _show_output(out: str, max_lines: int = 6) -> str:
    lines = out.rstrip("\n").split("\n")
    if len(lines) <= max_lines:
        return "```\n" + "\n".join(lines) + "\n```"
    return "```\n" + "\n".join(lines[:max_lines - 2] + ["..."] + lines[-1:]) + f"\n```\n({len(lines)} lines in all.)"


def t_write_run(rng, funcs):
    request, path, code, argv = _program(rng)
    with Session({}) as s:
        s.say(pick(rng, f"I'll write `{path}` and run it.", f"Writing `{path}`, then running it.", ""))
        s.call("write_file", path=path, content=code)
        out = s.call("bash", command=f"python3 {path}{argv}")
        ok = "[exit code" not in out and "Traceback" not in out
        s.say(pick(rng, "It runs. Output:\n", "Output:\n", "Ran it:\n") + _show_output(out) if ok
              else "It failed:\n" + _show_output(out))
        return request, s.files, s.parts, s.final_files()


def _fix_flow(s, rng, mod, test, bad, good):
    """Read the module, fix the bug with a unique old_string, rerun the tests; returns the test output."""
    s.call("read_file", path=mod)
    text = (s.dir / mod).read_text()
    line = _line_of(text, bad)
    s.say(pick(rng, f"Line {line} is the bug: `{bad.strip()}` should be `{good.strip()}`.",
               f"The problem is on line {line}: `{bad.strip()}`. It should read `{good.strip()}`."))
    old = unique_context(text, line)
    s.call("edit_file", path=mod, old_string=old, new_string=old.replace(bad, good))
    out = s.call("bash", command=f"python3 {test}")
    return out


def t_test_fix(rng, funcs):
    files, mod, test, fname, bad, good = buggy_task(rng)
    user = pick(rng, f"The tests in {test} are failing. Can you fix it?", f"`{fname}` is broken; {test} shows it. Fix it please.",
                f"Run {test} and fix whatever fails.", f"Something's wrong with {fname} in {mod}. There's a test file, {test}.")
    with Session(files) as s:
        s.say(pick(rng, "Let me run the tests first.", "Running the tests to see the failure.", "First, the failing tests."))
        out = s.call("bash", command=f"python3 {test}")
        fails = [l for l in out.split("\n") if l.startswith("FAIL")]
        s.say(f"{_summary_line(out)}. " + (f"For example: `{fails[0][5:]}`. " if fails else "") + pick(rng, *OPEN_READ))
        out = _fix_flow(s, rng, mod, test, bad, good)
        status = _summary_line(out)
        done = "All tests pass now" if "[exit code" not in out else "Still failing"
        s.say(f"{done} ({status}). The fix: `{bad.strip()}` -> `{good.strip()}` in `{mod}`.")
        return user, s.files, s.parts, s.final_files()


def t_missing_file(rng, funcs):
    path, text, f, lines = corpus_module(rng, funcs)
    name = f["facts"]["name"]
    wrong = pick(rng, *(m + ".py" for m in MODULE_NAMES if m + ".py" != Path(path).name))
    user = pick(rng, f"Look at {wrong} and tell me what `{name}` does.", f"What does {name} in {wrong} do?")
    with Session({path: text}) as s:
        s.call("read_file", path=wrong)
        s.say(pick(rng, f"There's no `{wrong}` here. Let me find where `{name}` is defined.",
                   f"`{wrong}` doesn't exist. I'll search for `{name}` instead."))
        p, offset = _grep_read(s, rng, name)
        s.call("read_file", path=p, offset=offset, limit=lines["end"] - lines["start"] + 3)
        s.say(f"It's in `{p}`, not `{wrong}`. " + explain(rng, f["facts"], p, lines))
        return user, s.files, s.parts, s.final_files()


def _misquote(line: str, text: str) -> str:
    """How a person might quote a line from memory (spacing around operators changed), such that the
    quote does not occur in the file."""
    q = line.strip()
    for cand in (re.sub(r" ([+\-*/%<>=]+) ", r"\1", q), q.replace(" ", "  ", 1), q + " "):
        if cand != q and cand not in text:
            return cand
    raise ValueError(f"cannot misquote {line!r}")


def t_edit_not_found(rng, funcs):
    files, mod, test, fname, bad, good = buggy_task(rng)
    quoted = _misquote(bad, files[mod])
    user = f"In {mod}, replace `{quoted}` with `{good.strip()}`."
    with Session(files) as s:
        out = s.call("edit_file", path=mod, old_string=quoted, new_string=good.strip())
        s.say(pick(rng, f"That text isn't in `{mod}` exactly as quoted. Let me read the file.",
                   f"No exact match for that line in `{mod}`; the spacing probably differs. Reading it."))
        out = _fix_flow(s, rng, mod, test, bad, good)
        s.say(f"Replaced it. I ran {test} to check: {_summary_line(out)}.")
        return user, s.files, s.parts, s.final_files()


PAIRS = [("price", "weight"), ("price", "tax"), ("weight", "volume"), ("cost", "discount"), ("size", "count")]


def t_edit_not_unique(rng, funcs):
    a, b = PAIRS[rng.randrange(len(PAIRS))]
    if rng.random() < 0.5:
        a, b = b, a
    mod = pick(rng, "cart.py", "inventory.py", "orders.py", "stock.py")
    code = "".join(f"def total_{f}(items):\n    total = 0\n    for item in items:\n        total += item[\"{f}\"] * item[\"qty\"]\n"
                   f"    return total\n\n\n" for f in (a, b)).rstrip("\n") + "\n"
    d = rng.randint(1, 3)
    places = "1 decimal place" if d == 1 else f"{d} decimal places"
    user = pick(rng, f"Make total_{b} in {mod} round its result to {places}.",
                f"total_{b} should return a value rounded to {places}.")
    items = [{b: round(rng.uniform(0.1, 9.9), 4), "qty": rng.randint(1, 5)} for _ in range(2)]
    with Session({mod: code}) as s:
        s.say(pick(rng, *OPEN_READ))
        s.call("read_file", path=mod)
        s.call("edit_file", path=mod, old_string="    return total", new_string=f"    return round(total, {d})")
        s.say(pick(rng, f"`return total` appears in both functions. I'll include the line above it so the edit only hits total_{b}.",
                   "That line occurs twice (once per function). Adding the preceding line to make it unique."))
        old = f"        total += item[\"{b}\"] * item[\"qty\"]\n    return total"
        s.call("edit_file", path=mod, old_string=old, new_string=old.replace("return total", f"return round(total, {d})"))
        stem = mod[:-3]
        out = s.call("bash", command=f"python3 -c \"from {stem} import total_{b}; print(total_{b}({items!r}))\"")
        if "[exit code" in out:
            s.say("The edit is in, but the quick check failed:\n" + _show_output(out))
        else:
            s.say(f"Done. `total_{b}` now returns `round(total, {d})`; on a quick example it gives `{out.strip()}`. "
                  f"`total_{a}` is unchanged.")
        return user, s.files, s.parts, s.final_files()


FAKE_COMMANDS = ["nanotest", "ptest", "runtests", "testit", "qtest"]


def t_command_not_found(rng, funcs):
    broken = rng.random() < 0.4
    files, mod, test, fname, bad, good = buggy_task(rng, broken=broken)
    fake = pick(rng, *FAKE_COMMANDS)
    user = pick(rng, f"Run the tests with `{fake} {test}`.", f"Can you run {fake} on {test}?")
    with Session(files) as s:
        s.call("bash", command=f"{fake} {test}")
        s.say(pick(rng, f"`{fake}` isn't installed here. The test file runs on its own, so I'll use Python directly.",
                   f"`{fake}`: command not found. Running `{test}` with python3 instead."))
        out = s.call("bash", command=f"python3 {test}")
        if "[exit code" in out:
            fails = [l[5:] for l in out.split("\n") if l.startswith("FAIL")]
            s.say(f"{_summary_line(out)}. First failure: `{fails[0]}`. Want me to look at `{fname}` in `{mod}`?")
        else:
            s.say(f"All green: {_summary_line(out)}.")
        return user, s.files, s.parts, s.final_files()


BUILDERS = {"explain": t_explain, "grep_explain": t_grep_explain, "edit": t_edit, "write_run": t_write_run,
            "test_fix": t_test_fix, "missing_file": t_missing_file, "edit_not_found": t_edit_not_found,
            "edit_not_unique": t_edit_not_unique, "command_not_found": t_command_not_found}


def make_trajectory(kind: str, rng, funcs: list) -> dict:
    user, files, parts, final = BUILDERS[kind](rng, funcs)
    parts = [p for p in parts if p["type"] != "text" or p["text"]]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": parts}],
            "kind": kind, "files": files, "final_files": final}


def trajectory(i: int, seed: int, funcs: list, kinds: list | None = None) -> dict:
    """Trajectory number i of a seed: depends only on (seed, i), so any one can be regenerated alone."""
    kinds = kinds or TASKS
    rng = random.Random(seed * 1_000_003 + i)
    kind = rng.choices(kinds, [TASK_WEIGHTS[TASKS.index(k)] for k in kinds])[0]
    return make_trajectory(kind, rng, funcs)


def generate_trajectories(n: int, seed: int, funcs: list, kinds: list | None = None) -> list[dict]:
    if not funcs:
        raise ValueError("no corpus functions to build trajectories from")
    return [trajectory(i, seed, funcs, kinds) for i in range(n)]


# -----------------------------------------------------------------------------
# preference pairs

BAD_CALLS = [("cat", lambda a: {"file": a.get("path", "main.py")}), ("read", lambda a: a),
             ("run", lambda a: {"cmd": a.get("command", "ls")}), ("search", lambda a: {"query": a.get("pattern", "def")})]
FLATTERY_OPEN = ["Great question! I'd be absolutely delighted to help you with this!",
                 "What a fantastic request! Your code looks really great already.",
                 "Absolutely! You're completely right to ask about this, it's a wonderful thing to look into."]
FLATTERY_CLOSE = ["I hope this helps! Let me know if there's anything else at all I can do for you. Happy coding!",
                  "Please don't hesitate to reach out if you have any other questions! I'm always happy to help!",
                  "This should probably work, I think, although I can't be completely sure. Hope that helps!"]


def _malformed(rng, parts):
    i = next(i for i, p in enumerate(parts) if p["type"] == "tool_call")
    call = parts[i]
    if rng.random() < 0.5:  # a tool that does not exist
        name, fix = BAD_CALLS[rng.randrange(len(BAD_CALLS))]
        bad = {"type": "tool_call", "name": name, "arguments": fix(call["arguments"])}
    else:  # a real tool with a wrong argument name
        args = dict(call["arguments"])
        key = next(iter(args))
        args[{"path": "file_path", "command": "cmd", "pattern": "regex", "content": "text"}.get(key, key + "_")] = args.pop(key)
        bad = {"type": "tool_call", "name": call["name"], "arguments": args}
    return parts[:i] + [bad, {"type": "text", "text": pick(rng, "Done.", "That's it.", "All set.")}]


def _not_unique(rng, parts, files):
    """Swap the first successful edit's old_string for a piece of it that occurs 2+ times in the file
    (a whole line if one repeats, else a word), then claim success anyway."""
    for i, p in enumerate(parts):
        if p["type"] == "tool_call" and p["name"] == "edit_file" and parts[i + 1]["text"].startswith("edited"):
            _, state = execute(files, parts[:i])
            text, old = state.get(p["arguments"]["path"], ""), p["arguments"]["old_string"]
            lines = sorted(set(old.split("\n")), key=lambda w: (-len(w), w))
            words = sorted(set(re.findall(r"[A-Za-z_]\w+", old)), key=lambda w: (-len(w), w))
            piece = next((w for w in lines + words if w.strip() and text.count(w) >= 2), None)
            if piece is None:
                return None
            args = dict(p["arguments"], old_string=piece)
            return parts[:i] + [{"type": "tool_call", "name": "edit_file", "arguments": args},
                                {"type": "text", "text": pick(rng, "Done, the edit is in.", "Edited.", "Changed it.")}]
    return None


def _unbacked(rng, parts):
    calls = [i for i, p in enumerate(parts) if p["type"] == "tool_call"]
    last = calls[-1]
    if parts[last]["name"] in ("bash", "read_file") and len(calls) > 1:  # drop the final check, keep the claim
        return parts[:last] + parts[last + 2:]
    texts = [p for p in parts if p["type"] == "text"]  # answer without looking at anything
    return [texts[-1]] if texts else None


def _style(rng, parts):
    out = [dict(p) for p in parts]
    texts = [p for p in out if p["type"] == "text"]
    if not texts:
        return None
    if out[0]["type"] == "text":
        out[0]["text"] = pick(rng, *FLATTERY_OPEN) + " " + out[0]["text"]
    else:
        out.insert(0, {"type": "text", "text": pick(rng, *FLATTERY_OPEN)})
    if out[-1]["type"] == "text":
        out[-1] = dict(out[-1], text=out[-1]["text"] + "\n\n" + pick(rng, *FLATTERY_CLOSE))
    else:
        out.append({"type": "text", "text": pick(rng, *FLATTERY_CLOSE)})
    return out


def make_pair(record: dict, rng, kind: str | None = None) -> dict | None:
    """A preference pair from a trajectory: chosen = its assistant message, rejected = a flawed version
    whose tool calls are really executed from the same files. None if `kind` does not apply."""
    parts = [p for p in record["messages"][-1]["content"]]
    kinds = [kind] if kind else rng.sample(PAIR_KINDS, len(PAIR_KINDS))
    for k in kinds:
        plan = {"malformed_call": lambda: _malformed(rng, parts), "not_unique": lambda: _not_unique(rng, parts, record["files"]),
                "unbacked_claim": lambda: _unbacked(rng, parts), "style": lambda: _style(rng, parts)}[k]()
        if plan is None:
            continue
        rejected, _ = execute(record["files"], plan)
        if rejected == parts:
            continue
        return {"prompt": {"messages": record["messages"][:-1]},
                "chosen": {"role": "assistant", "content": parts},
                "rejected": {"role": "assistant", "content": rejected},
                "kind": k, "task": record["kind"], "files": record["files"]}
    return None


def pair(i: int, record: dict, seed: int) -> dict | None:
    return make_pair(record, random.Random(seed * 1_000_003 + i))


def generate_pairs(records: list, seed: int) -> list[dict]:
    return [p for i, r in enumerate(records) if (p := pair(i, r, seed)) is not None]
