"""Synthetic tool-use trajectories and DPO preference pairs, with tool outputs from really running the tools.

Every trajectory starts from a small set of files: functions taken from the local code corpus
(`nanocode.dataset.iter_documents`) or small programs from the templates below. The generator writes
them into a scratch directory and acts like the agent: each tool call goes through
`nanocode.tools.run_tool` in that directory, its real output is recorded, and the next step and the
assistant's text are chosen from what the output actually says. Nothing a tool "printed" is written by
hand. The assistant's text follows SOUL.md: it reads before editing, verifies, states what the tool
output showed, and skips praise and filler.

A trajectory record is a conversation with extra keys, so it can be replayed and checked
(nanocode/synth_session.py runs the tools and replays records):
    {"messages": [user, assistant, (user, assistant)...], "kind": str, "files": {path: text} before,
     "final_files": {path: text} after, "setup": shell command run first (only some kinds)}
KINDS, the one registry, names every kind with its builder, its sampling weight and whether training
sees it: reading and explaining code, edits (one file and several), writing and running programs,
running a user's program and reporting its output, repository exploration and shell work (ls, find,
wc, head, sed -n, git status), tests under pytest/unittest/python -m, other languages (C, JS, Rust,
JSON, TOML, shell), tool errors and the recovery, user denials, long outputs, questions answered from
reading, answers without any tool. A share of sessions (FOLLOWUP_RATE) gets follow-up user turns.
The unseen kinds only appear among the held-out validity prompts (validity_prompt). Phrasing varies
by template and seed; the same seed gives the same records (as long as the tools and the Python
running them behave the same).

A preference pair (for scripts/code_dpo.py) keeps the conversation up to the last user turn as the
prompt, the last assistant message as "chosen", and a "rejected" message with one flaw (PAIR_KINDS):
    malformed_call   a tool call naming a tool that does not exist or passing the wrong arguments
    not_unique       an edit_file whose old_string occurs more than once, then a claim that it worked
    unbacked_claim   the verification (or the reading) is skipped but the answer claims its result
    style            the same work wrapped in praise, filler and hedging (breaks SOUL.md)
The rejected side's tool calls are also really executed, from the same files ("files": the state
before the last turn).
"""

import ast
import random
import re
from pathlib import Path

from nanocode.common import write_tree  # noqa: F401
from nanocode.synth_session import (  # noqa: F401
    Session,
    assistant_turns,
    call_shape,
    execute,
    execute_after,
    execute_turns,
    read_tree,
    replay,
)

PAIR_KINDS = ["malformed_call", "not_unique", "unbacked_claim", "style"]


def pick(rng, *options):
    return options[rng.randrange(len(options))]


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
    facts = {
        "name": fn.name,
        "args": args,
        "doc": None,
        "loops": [],
        "ifs": [],
        "calls": [],
        "returns": [],
        "raises": [],
        "catches": [],
        "yields": False,
        "defaults": [],
    }
    doc = ast.get_docstring(fn)
    if doc:
        first = doc.strip().split("\n\n")[0].replace("\n", " ")
        first = re.split(r"(?<=\.)\s", first)[0]
        if len(first) <= 120:
            facts["doc"] = first
    pos = fn.args.posonlyargs + fn.args.args
    for a, d in zip(pos[len(pos) - len(fn.args.defaults) :], fn.args.defaults):
        if isinstance(d, ast.Constant) and type(d.value) in (int, bool):
            facts["defaults"].append((a.arg, d.value))
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.For)
            and (t := _segment(src, node.target))
            and (it := _segment(src, node.iter))
        ):
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
        elif (
            isinstance(node, ast.ExceptHandler)
            and node.type is not None
            and (e := _segment(src, node.type, 30))
        ):
            facts["catches"].append(e)
        elif isinstance(node, (ast.Yield, ast.YieldFrom)):
            facts["yields"] = True
    facts["has_doc"] = doc is not None
    facts["body_line"] = (
        fn.body[1].lineno if doc and len(fn.body) > 1 else fn.body[0].lineno
    )  # 1-based, in src
    return facts


def corpus_functions(
    docs, limit: int = 2000, min_lines: int = 4, max_lines: int = 22
) -> list[dict]:
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
            src = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            if not (min_lines <= n <= max_lines) or "\t" in src or "\r" in src or not src.isascii():
                continue
            if any(len(line) > 100 for line in src.splitlines()) or '"""' in src.split("\n", 1)[0]:
                continue
            if not src.startswith(
                f"def {node.name}("
            ):  # e.g. "def f (x):": the kinds grep for "def NAME\("
                continue
            try:
                facts = describe_function(src)
            except (SyntaxError, ValueError, IndexError):
                continue
            out.append({"src": src, "facts": facts})
            if len(out) >= limit:
                return out
    return out


MODULE_NAMES = [
    "utils",
    "helpers",
    "core",
    "tools",
    "common",
    "misc",
    "support",
    "parsing",
    "io_utils",
    "text",
]
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
    s = [
        pick(
            rng,
            f"`{name}` is at lines {lines['start']}-{lines['end']} of `{path}`.",
            f"`{name}` (`{path}`, lines {lines['start']}-{lines['end']}):",
            f"Here's what `{name}` does, from lines {lines['start']}-{lines['end']} of `{path}`.",
        )
    ]
    if facts["doc"]:
        s.append(
            pick(
                rng,
                f'Its docstring says: "{facts["doc"]}"',
                f'The docstring sums it up: "{facts["doc"]}"',
            )
        )
    args = [a for a in facts["args"] if a not in ("self", "cls")]
    s.append(f"It takes {_list(args, 4)}." if args else "It takes no arguments.")
    body = []
    if facts["loops"]:
        body.append(
            f"loops over `{facts['loops'][0]}`"
            if not facts["loops"][0].startswith("while")
            else f"loops `{facts['loops'][0]}`"
        )
    if facts["ifs"]:
        body.append(f"branches on `{facts['ifs'][0]}`")
    if facts["catches"]:
        body.append(f"catches `{facts['catches'][0]}`")
    if facts["raises"]:
        body.append(f"raises {_list(facts['raises'], 2)}")
    if body:
        s.append(
            "It " + (body[0] if len(body) == 1 else ", ".join(body[:-1]) + " and " + body[-1]) + "."
        )
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
        s.append(
            f"Depending on the path it returns {_list(facts['returns'], 3).replace(' and ', ' or ')}."
        )
    return " ".join(s)


# -----------------------------------------------------------------------------
# small program templates (write_run) and buggy-function templates (test_fix and friends)


def program_request(rng):
    """(user request, file name, source, argv string) for a small deterministic program."""
    k = rng.randrange(8)
    if k == 0:
        n = rng.randint(5, 15)
        return (
            f"Write a script that prints the first {n} Fibonacci numbers.",
            pick(rng, "fib.py", "fibonacci.py"),
            f"def fib(n):\n    a, b = 0, 1\n    out = []\n    for _ in range(n):\n        out.append(a)\n"
            f'        a, b = b, a + b\n    return out\n\n\nif __name__ == "__main__":\n    print(*fib({n}))\n',
            "",
        )
    if k == 1:
        n = rng.randint(20, 80)
        return (
            f"I need a small program that lists the primes below {n}.",
            pick(rng, "primes.py", "sieve.py"),
            f"def primes_below(n):\n    is_prime = [True] * n\n    out = []\n    for i in range(2, n):\n"
            f"        if is_prime[i]:\n            out.append(i)\n            for j in range(i * i, n, i):\n"
            f'                is_prime[j] = False\n    return out\n\n\nif __name__ == "__main__":\n'
            f"    print(*primes_below({n}))\n",
            "",
        )
    if k == 2:
        n = rng.randint(10, 20)
        return (
            f"Write fizzbuzz up to {n} and run it.",
            "fizzbuzz.py",
            f'for i in range(1, {n} + 1):\n    if i % 15 == 0:\n        print("FizzBuzz")\n    elif i % 3 == 0:\n'
            f'        print("Fizz")\n    elif i % 5 == 0:\n        print("Buzz")\n    else:\n        print(i)\n',
            "",
        )
    if k == 3:
        lo, step = rng.choice([-20, -10, 0]), rng.choice([5, 10, 20])
        hi = lo + step * rng.randint(3, 6)
        return (
            f"Make a Celsius to Fahrenheit table from {lo} to {hi} in steps of {step}.",
            pick(rng, "temps.py", "c2f.py"),
            f'for c in range({lo}, {hi} + 1, {step}):\n    f = c * 9 / 5 + 32\n    print(f"{{c:>4}} C = {{f:6.1f}} F")\n',
            "",
        )
    if k == 4:
        n = rng.randint(6, 60)
        return (
            f"How many Collatz steps does {n} take to reach 1? Write a script to compute it.",
            "collatz.py",
            "import sys\n\n\ndef collatz_steps(n):\n    steps = 0\n    while n != 1:\n"
            "        n = n // 2 if n % 2 == 0 else 3 * n + 1\n        steps += 1\n    return steps\n\n\n"
            'if __name__ == "__main__":\n    n = int(sys.argv[1])\n    print(f"{n} takes {collatz_steps(n)} steps")\n',
            f" {n}",
        )
    if k == 5:
        words = rng.sample(
            ["tool", "model", "token", "file", "test", "loop", "patch", "shell", "agent", "batch"],
            4,
        )
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 10)))
        return (
            f"Write a script that counts how often each word occurs in the text given on the command line, "
            f'most frequent first, and try it on "{sentence}".',
            pick(rng, "wordfreq.py", "count_words.py"),
            'import sys\nfrom collections import Counter\n\ncounts = Counter(" ".join(sys.argv[1:]).split())\n'
            'for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):\n    print(f"{word}: {n}")\n',
            f' "{sentence}"',
        )
    if k == 6:
        a, b = rng.randint(2, 40) * rng.randint(1, 6), rng.randint(2, 40) * rng.randint(1, 6)
        return (
            f"Write a tiny gcd/lcm calculator and run it on {a} and {b}.",
            pick(rng, "gcd.py", "gcdlcm.py"),
            "import sys\n\n\ndef gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n\n\n"
            'if __name__ == "__main__":\n    a, b = int(sys.argv[1]), int(sys.argv[2])\n'
            '    print(f"gcd = {gcd(a, b)}")\n    print(f"lcm = {a * b // gcd(a, b)}")\n',
            f" {a} {b}",
        )
    text = pick(rng, "racecar", "level up", "nanocode", "step on no pets", "abc cba", "python")
    return (
        f'Write a script that reverses a string and says whether it is a palindrome; test it with "{text}".',
        pick(rng, "palindrome.py", "reverse.py"),
        'import sys\n\ns = sys.argv[1]\nprint(f"reversed: {s[::-1]}")\nprint(f"palindrome: {s == s[::-1]}")\n',
        f' "{text}"',
    )


# Each: function name, correct source, (buggy line, fixed line) options, and a test-input generator.
BUGGY = [
    (
        "mean",
        "def mean(xs):\n    return sum(xs) / len(xs)\n",
        [
            ("    return sum(xs) / len(xs)", "    return sum(xs) / (len(xs) - 1)"),
            ("    return sum(xs) / len(xs)", "    return sum(xs[1:]) / len(xs)"),
        ],
        lambda r: [[r.randint(1, 9) for _ in range(r.randint(2, 5))] for _ in range(3)],
    ),
    (
        "clamp",
        "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n",
        [
            ("    return max(lo, min(x, hi))", "    return max(lo, min(x, lo))"),
            ("    return max(lo, min(x, hi))", "    return min(lo, max(x, hi))"),
        ],
        lambda r: [(r.randint(-20, 20), -5, 5), (r.randint(6, 30), 0, r.randint(1, 5)), (2, 0, 10)],
    ),
    (
        "factorial",
        "def factorial(n):\n    result = 1\n    for i in range(1, n + 1):\n        result *= i\n    return result\n",
        [
            ("    for i in range(1, n + 1):", "    for i in range(1, n):"),
            ("    result = 1", "    result = 0"),
        ],
        lambda r: [r.randint(3, 8), r.randint(2, 6), 1],
    ),
    (
        "count_vowels",
        'def count_vowels(s):\n    return sum(1 for c in s.lower() if c in "aeiou")\n',
        [
            (
                '    return sum(1 for c in s.lower() if c in "aeiou")',
                '    return sum(1 for c in s if c in "aeiou")',
            ),
            (
                '    return sum(1 for c in s.lower() if c in "aeiou")',
                '    return sum(1 for c in s.lower() if c in "aeio")',
            ),
        ],
        lambda r: [
            pick(r, "Audio", "Queue", "EUROPE"),
            pick(r, "unicorn", "umbrella", "Ubuntu"),
            "sky",
        ],
    ),
    (
        "last_n",
        "def last_n(xs, n):\n    return xs[-n:]\n",
        [("    return xs[-n:]", "    return xs[n:]"), ("    return xs[-n:]", "    return xs[:n]")],
        lambda r: [(list(range(r.randint(5, 9))), r.randint(2, 3)), ([4, 5, 6, 7], 1)],
    ),
    (
        "c_to_f",
        "def c_to_f(c):\n    return c * 9 / 5 + 32\n",
        [
            ("    return c * 9 / 5 + 32", "    return c * 5 / 9 + 32"),
            ("    return c * 9 / 5 + 32", "    return (c + 32) * 9 / 5"),
        ],
        lambda r: [r.choice([0, 10, 20, 30]), 100, r.choice([-40, 37])],
    ),
    (
        "chunk",
        "def chunk(xs, size):\n    return [xs[i:i + size] for i in range(0, len(xs), size)]\n",
        [
            (
                "    return [xs[i:i + size] for i in range(0, len(xs), size)]",
                "    return [xs[i:i + size] for i in range(0, len(xs) - size, size)]",
            )
        ],
        lambda r: [(list(range(r.randint(5, 9))), r.choice([2, 3])), ([1, 2], 2)],
    ),
    (
        "word_count",
        "def word_count(text):\n    return len(text.split())\n",
        [("    return len(text.split())", '    return len(text.split(" "))')],
        lambda r: ["one  two", pick(r, "a b c", "x y"), " padded words here "],
    ),
    (
        "is_leap",
        "def is_leap(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n",
        [
            (
                "    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)",
                "    return year % 4 == 0 and year % 100 != 0",
            ),
            (
                "    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)",
                "    return year % 4 == 0",
            ),
        ],
        lambda r: [2000, 1900, r.choice([2024, 2020, 1996]), r.choice([2023, 2019])],
    ),
    (
        "running_total",
        "def running_total(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n"
        "        out.append(total)\n    return out\n",
        [("        total += x", "        total = x")],
        lambda r: [[r.randint(1, 9) for _ in range(r.randint(3, 5))], [5]],
    ),
    (
        "median",
        "def median(xs):\n    s = sorted(xs)\n    mid = len(s) // 2\n    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2\n",
        [("    s = sorted(xs)", "    s = list(xs)")],
        lambda r: [
            [r.randint(1, 9) for _ in range(r.choice([3, 5]))] + [10],
            [9, 1, 5],
            [4, 2, 8, 6],
        ],
    ),
]
MODULES = ["mathutils", "helpers", "util", "funcs", "lib", "core", "calc", "textutil"]


def buggy_task(rng, broken: bool = True, style: str = "script"):
    """(files, module path, test path, fname, buggy line, fixed line): a module and its test script
    (style "script": runs on its own with python3, and under pytest; "unittest": a TestCase).
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
    code = src.replace(good, bad) if broken else src
    if style == "unittest":
        lines = [
            "import unittest",
            "",
            f"from {mod} import {fname}",
            "",
            "",
            f"class Test{fname.title().replace('_', '')}(unittest.TestCase):",
        ]
        for i, (a, want) in enumerate(zip(args, outs), 1):
            lines += [
                f"    def test_{i}(self):",
                f"        self.assertEqual({fname}({', '.join(map(repr, a))}), {want!r})",
                "",
            ]
        lines += ["", 'if __name__ == "__main__":', "    unittest.main()", ""]
        return {f"{mod}.py": code, test: "\n".join(lines)}, f"{mod}.py", test, fname, bad, good
    lines = [f"from {mod} import {fname}", ""]
    for i, (a, want) in enumerate(zip(args, outs), 1):
        call = f"{fname}({', '.join(map(repr, a))})"
        lines += [
            "",
            f"def test_{fname}_{i}():",
            f"    got = {call}",
            f'    assert got == {want!r}, f"{call.replace("{", "{{").replace("}", "}}")} returned {{got!r}}, expected {want!r}"',
            "",
        ]
    lines += [
        "",
        'if __name__ == "__main__":',
        "    import sys",
        "    failed = 0",
        '    tests = [(n, f) for n, f in list(globals().items()) if n.startswith("test_")]',
        "    for name, fn in tests:",
        "        try:",
        "            fn()",
        '            print(f"PASS {name}")',
        "        except Exception as e:",
        "            failed += 1",
        '            print(f"FAIL {name}: {type(e).__name__}: {e}")',
        '    print(f"{len(tests) - failed} passed, {failed} failed")',
        "    sys.exit(1 if failed else 0)",
        "",
    ]
    return {f"{mod}.py": code, test: "\n".join(lines)}, f"{mod}.py", test, fname, bad, good


def _summary_line(out: str) -> str:
    m = re.search(r"(\d+) passed, (\d+) failed", out)
    return m.group(0) if m else out.strip().splitlines()[-1]


def _line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def unique_context(text: str, line_no: int) -> str:
    """The shortest run of whole lines around line `line_no` (1-based) that occurs exactly once in text."""
    lines = text.split("\n")
    lo = hi = line_no - 1
    while True:
        s = "\n".join(lines[lo : hi + 1])
        if text.count(s) == 1 or (lo == 0 and hi == len(lines) - 1):
            return s
        if lo > 0:
            lo -= 1
        if text.count("\n".join(lines[lo : hi + 1])) != 1 and hi < len(lines) - 1:
            hi += 1


# -----------------------------------------------------------------------------
# the trajectories

OPEN_READ = [
    "Let me read it first.",
    "I'll look at the file.",
    "Reading the file first.",
    "Let me open it.",
]
OPEN_GREP = [
    "I'll find where it's defined.",
    "Let me search for the definition.",
    "First, where is it defined?",
]


def t_explain(rng, funcs):
    path, text, f, lines = corpus_module(rng, funcs)
    name = f["facts"]["name"]
    user = pick(
        rng,
        f"What does `{name}` in {path} do?",
        f"Can you explain the function {name} in {path}?",
        f"Explain `{name}` ({path}) briefly.",
        f"I'm reading {path}. What is {name} for?",
    )
    with Session({path: text}) as s:
        s.say(pick(rng, *OPEN_READ))
        s.call("read_file", path=path)
        s.say(explain(rng, f["facts"], path, lines))
        return finish(s, rng, user)


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
    user = pick(
        rng,
        f"What does {name} do?",
        f"Where is `{name}` defined, and what does it do?",
        f"Explain {name} to me.",
        f"Walk me through `{name}`.",
    )
    with Session(files) as s:
        s.say(pick(rng, *OPEN_GREP))
        p, offset = _grep_read(s, rng, name)
        s.call("read_file", path=p, offset=offset, limit=lines["end"] - lines["start"] + 3)
        s.say(explain(rng, f["facts"], p, lines))
        return finish(s, rng, user)


def _edit_request(rng, f, text, lines):
    """One targeted change to function f in a module: (request text, old_string, new_string, summary)."""
    facts, lines_all = f["facts"], text.split("\n")
    name = facts["name"]
    options = (
        ["guard"]
        if facts["args"]
        and facts["args"][0] not in ("self", "cls")
        and not facts["args"][0].startswith("*")
        else []
    )
    if not facts["has_doc"]:
        options.append("doc")
    if facts["defaults"]:
        options.append("default")
    kind = pick(rng, *options) if options else None
    if kind == "doc":
        def_line = lines["start"] + next(
            i for i, l in enumerate(f["src"].split("\n")) if l.rstrip().endswith(":")
        )
        old = unique_context(text, def_line)
        body = lines_all[def_line]
        indent = body[: len(body) - len(body.lstrip())] or "    "
        doc = name.strip("_").replace("_", " ").capitalize()
        new = old + f'\n{indent}"""{doc}."""'
        return (
            pick(
                rng,
                f'`{name}` has no docstring. Add a one-line one: "{doc}."',
                f'Please add the docstring "{doc}." to {name}.',
            ),
            old,
            new,
            f"added the docstring to `{name}`",
        )
    if kind == "default":
        arg, val = facts["defaults"][0]
        newval = (not val) if isinstance(val, bool) else (val * 2 if val else 1)
        hit = next(
            (
                i
                for i in range(lines["start"], lines["end"] + 1)
                if re.search(rf"\b{arg}\s*=\s*{val!r}(?![\w.])", lines_all[i - 1])
            ),
            None,
        )
        if hit is not None:
            old = unique_context(text, hit)
            new = re.sub(rf"\b({arg}\s*=\s*){val!r}(?![\w.])", rf"\g<1>{newval!r}", old, count=1)
            return (
                pick(
                    rng,
                    f"Change the default of `{arg}` in `{name}` from {val!r} to {newval!r}.",
                    f"In {name}, make {arg} default to {newval!r} instead of {val!r}.",
                ),
                old,
                new,
                f"`{arg}` now defaults to `{newval!r}` in `{name}`",
            )
    if options and options[0] == "guard":  # chosen, or the fallback when no default matched
        arg = facts["args"][0]
        body_line = lines["start"] + facts["body_line"] - 1
        old = unique_context(text, body_line)
        body = lines_all[body_line - 1]
        indent = body[: len(body) - len(body.lstrip())]
        guard = (
            f'{indent}if {arg} is None:\n{indent}    raise ValueError("{arg} must not be None")\n'
        )
        return (
            pick(
                rng,
                f"Make `{name}` raise a ValueError when `{arg}` is None.",
                f"{name} should fail fast with ValueError if {arg} is None. Can you add that?",
            ),
            old,
            guard + old,
            f"`{name}` now raises `ValueError` when `{arg}` is None",
        )
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
            check = (
                "it still compiles" if out.strip() == "compiles" else "compiling it failed:\n" + out
            )
        else:
            s.call(
                "read_file",
                path=p,
                offset=offset,
                limit=lines["end"] - lines["start"] + 3 + new.count("\n") - old.count("\n"),
            )
            check = "the read-back shows the new lines in place"
        s.say(
            pick(
                rng,
                f"Done: {summary}; {check}.",
                f"{summary[0].upper() + summary[1:]}. Checked: {check}.",
            )
        )
        return finish(s, rng, user)


def _show_output(out: str, max_lines: int = 6) -> str:
    lines = out.rstrip("\n").split("\n")
    if len(lines) <= max_lines:
        return "```\n" + "\n".join(lines) + "\n```"
    return (
        "```\n"
        + "\n".join(lines[: max_lines - 2] + ["..."] + lines[-1:])
        + f"\n```\n({len(lines)} lines in all.)"
    )


def t_write_run(rng, funcs):
    request, path, code, argv = program_request(rng)
    with Session({}) as s:
        s.say(
            pick(rng, f"I'll write `{path}` and run it.", f"Writing `{path}`, then running it.", "")
        )
        s.call("write_file", path=path, content=code)
        out = s.call("bash", command=f"python3 {path}{argv}")
        ok = "[exit code" not in out and "Traceback" not in out
        s.say(
            pick(rng, "It runs. Output:\n", "Output:\n", "Ran it:\n") + _show_output(out)
            if ok
            else "It failed:\n" + _show_output(out)
        )
        return finish(s, rng, request)


def _fix_flow(s, rng, mod, test, bad, good):
    """Read the module, fix the bug with a unique old_string, rerun the tests; returns the test output."""
    s.call("read_file", path=mod)
    text = (s.dir / mod).read_text()
    line = _line_of(text, bad)
    s.say(
        pick(
            rng,
            f"Line {line} is the bug: `{bad.strip()}` should be `{good.strip()}`.",
            f"The problem is on line {line}: `{bad.strip()}`. It should read `{good.strip()}`.",
        )
    )
    old = unique_context(text, line)
    s.call("edit_file", path=mod, old_string=old, new_string=old.replace(bad, good))
    out = s.call("bash", command=f"python3 {test}")
    return out


def t_test_fix(rng, funcs):
    files, mod, test, fname, bad, good = buggy_task(rng)
    user = pick(
        rng,
        f"The tests in {test} are failing. Can you fix it?",
        f"`{fname}` is broken; {test} shows it. Fix it please.",
        f"Run {test} and fix whatever fails.",
        f"Something's wrong with {fname} in {mod}. There's a test file, {test}.",
    )
    with Session(files) as s:
        s.say(
            pick(
                rng,
                "Let me run the tests first.",
                "Running the tests to see the failure.",
                "First, the failing tests.",
            )
        )
        out = s.call("bash", command=f"python3 {test}")
        fails = [l for l in out.split("\n") if l.startswith("FAIL")]
        s.say(
            f"{_summary_line(out)}. "
            + (f"For example: `{fails[0][5:]}`. " if fails else "")
            + pick(rng, *OPEN_READ)
        )
        out = _fix_flow(s, rng, mod, test, bad, good)
        status = _summary_line(out)
        done = "All tests pass now" if "[exit code" not in out else "Still failing"
        s.say(f"{done} ({status}). The fix: `{bad.strip()}` -> `{good.strip()}` in `{mod}`.")
        return finish(s, rng, user)


def t_missing_file(rng, funcs):
    path, text, f, lines = corpus_module(rng, funcs)
    name = f["facts"]["name"]
    wrong = pick(rng, *(m + ".py" for m in MODULE_NAMES if m + ".py" != Path(path).name))
    user = pick(
        rng, f"Look at {wrong} and tell me what `{name}` does.", f"What does {name} in {wrong} do?"
    )
    with Session({path: text}) as s:
        s.call("read_file", path=wrong)
        s.say(
            pick(
                rng,
                f"There's no `{wrong}` here. Let me find where `{name}` is defined.",
                f"`{wrong}` doesn't exist. I'll search for `{name}` instead.",
            )
        )
        p, offset = _grep_read(s, rng, name)
        s.call("read_file", path=p, offset=offset, limit=lines["end"] - lines["start"] + 3)
        s.say(f"It's in `{p}`, not `{wrong}`. " + explain(rng, f["facts"], p, lines))
        return finish(s, rng, user)


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
        s.say(
            pick(
                rng,
                f"That text isn't in `{mod}` exactly as quoted. Let me read the file.",
                f"No exact match for that line in `{mod}`; the spacing probably differs. Reading it.",
            )
        )
        out = _fix_flow(s, rng, mod, test, bad, good)
        s.say(f"Replaced it. I ran {test} to check: {_summary_line(out)}.")
        return finish(s, rng, user)


PAIRS = [
    ("price", "weight"),
    ("price", "tax"),
    ("weight", "volume"),
    ("cost", "discount"),
    ("size", "count"),
]


def t_edit_not_unique(rng, funcs):
    a, b = PAIRS[rng.randrange(len(PAIRS))]
    if rng.random() < 0.5:
        a, b = b, a
    mod = pick(rng, "cart.py", "inventory.py", "orders.py", "stock.py")
    code = (
        "".join(
            f'def total_{f}(items):\n    total = 0\n    for item in items:\n        total += item["{f}"] * item["qty"]\n'
            f"    return total\n\n\n"
            for f in (a, b)
        ).rstrip("\n")
        + "\n"
    )
    d = rng.randint(1, 3)
    places = "1 decimal place" if d == 1 else f"{d} decimal places"
    user = pick(
        rng,
        f"Make total_{b} in {mod} round its result to {places}.",
        f"total_{b} should return a value rounded to {places}.",
    )
    items = [{b: round(rng.uniform(0.1, 9.9), 4), "qty": rng.randint(1, 5)} for _ in range(2)]
    with Session({mod: code}) as s:
        s.say(pick(rng, *OPEN_READ))
        s.call("read_file", path=mod)
        s.call(
            "edit_file",
            path=mod,
            old_string="    return total",
            new_string=f"    return round(total, {d})",
        )
        s.say(
            pick(
                rng,
                f"`return total` appears in both functions. I'll include the line above it so the edit only hits total_{b}.",
                "That line occurs twice (once per function). Adding the preceding line to make it unique.",
            )
        )
        old = f'        total += item["{b}"] * item["qty"]\n    return total'
        s.call(
            "edit_file",
            path=mod,
            old_string=old,
            new_string=old.replace("return total", f"return round(total, {d})"),
        )
        stem = mod[:-3]
        out = s.call(
            "bash",
            command=f'python3 -c "from {stem} import total_{b}; print(total_{b}({items!r}))"',
        )
        if "[exit code" in out:
            s.say("The edit is in, but the quick check failed:\n" + _show_output(out))
        else:
            s.say(
                f"Done. `total_{b}` now returns `round(total, {d})`; on a quick example it gives `{out.strip()}`. "
                f"`total_{a}` is unchanged."
            )
        return finish(s, rng, user)


FAKE_COMMANDS = ["nanotest", "ptest", "runtests", "testit", "qtest"]


def t_command_not_found(rng, funcs):
    broken = rng.random() < 0.4
    files, mod, test, fname, bad, good = buggy_task(rng, broken=broken)
    fake = pick(rng, *FAKE_COMMANDS)
    user = pick(rng, f"Run the tests with `{fake} {test}`.", f"Can you run {fake} on {test}?")
    with Session(files) as s:
        s.call("bash", command=f"{fake} {test}")
        s.say(
            pick(
                rng,
                f"`{fake}` isn't installed here. The test file runs on its own, so I'll use Python directly.",
                f"`{fake}`: command not found. Running `{test}` with python3 instead.",
            )
        )
        out = s.call("bash", command=f"python3 {test}")
        if "[exit code" in out:
            fails = [l[5:] for l in out.split("\n") if l.startswith("FAIL")]
            s.say(
                f"{_summary_line(out)}. First failure: `{fails[0]}`. Want me to look at `{fname}` in `{mod}`?"
            )
        else:
            s.say(f"All green: {_summary_line(out)}.")
        return finish(s, rng, user)


# -----------------------------------------------------------------------------
# more kinds: running a user's program, exploring a repository, shell work, other languages,
# multi-file edits, tool errors, denials, answers without tools, follow-up turns


def _say_output(out: str) -> str:
    """How the assistant reports what a command printed: a one-liner inline, more as a block."""
    lines = out.rstrip("\n").split("\n")
    if len(lines) == 1 and len(lines[0]) <= 60:
        return f"`{lines[0]}`."
    return "\n" + _show_output(out)


def _failed(out: str) -> bool:
    return "[exit code" in out or "Traceback" in out or out.startswith("error:")


def _error_line(out: str) -> str:
    lines = [l for l in out.strip().split("\n") if l and not l.startswith("[exit code")]
    return lines[-1] if lines else out.strip()


def _small_script(rng) -> tuple[str, str]:
    """(file name, source) of a short program that prints something, in the style of a user's main.py."""
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    op, sym = pick(rng, ("add", "+"), ("sub", "-"), ("mul", "*"), ("total", "+"))
    name = pick(
        rng, "main.py", "main.py", "main.py", "app.py", "run.py", "script.py", "hello.py", "calc.py"
    )
    k = rng.randrange(8)
    if k == 0:
        return name, f"def {op}(a, b):\n    return a {sym} b\n\nprint({op}({a}, {b}))\n"
    if k == 1:
        xs = [rng.randint(0, 30) for _ in range(rng.randint(3, 6))]
        return name, f"numbers = {xs}\nprint(sum(numbers))\nprint(max(numbers))\n"
    if k == 2:
        word = pick(rng, "nanocode", "agent", "python", "kernel", "token", "shell")
        return name, f'word = "{word}"\nprint(word.upper())\nprint(len(word))\n'
    if k == 3:
        n = rng.randint(2, 6)
        return name, f"for i in range({n}):\n    print(i * i)\n"
    if k == 4:
        d = {pick(rng, "a", "x", "k"): a, pick(rng, "b", "y", "v"): b}
        return (
            name,
            f'counts = {d!r}\nfor key, value in sorted(counts.items()):\n    print(f"{{key}}={{value}}")\n',
        )
    if k == 5:
        return (
            name,
            f'def greet(name):\n    return f"Hello, {{name}}!"\n\nprint(greet("{pick(rng, "Ada", "Linus", "Grace", "world")}"))\n',
        )
    if k == 6:  # a crash the user asks about
        return name, f"def ratio(a, b):\n    return a / b\n\nprint(ratio({a}, 0))\n"
    _, path, code, argv = program_request(rng)
    return (
        (name, code)
        if not argv
        else (
            name,
            f'def {op}(a, b):\n    return a {sym} b\n\n\nif __name__ == "__main__":\n    print({op}({a}, {b}))\n',
        )
    )


RUN_ASKS = [
    "Run {path} with python and tell me what it prints.",
    "Run {path} with python and tell me what it prints.",
    "What does {path} print?",
    "Can you run {path} and tell me the output?",
    "Run {path}.",
    "Execute {path} with python and report what it prints.",
    "run {path} with python, what's the output?",
    "Please run {path} and tell me what it prints.",
]


def _run_and_report(s, rng, path: str, py: str) -> str:
    out = s.call("bash", command=f"{py} {path}")
    if "command not found" in out and py == "python":
        s.say("`python` isn't on the PATH here; using `python3`.")
        out = s.call("bash", command=f"python3 {path}")
    if _failed(out):
        s.say(
            pick(
                rng,
                f"It fails: `{_error_line(out)}`.",
                f"`{path}` crashes with `{_error_line(out)}`.",
            )
            + "\n"
            + _show_output(out)
        )
    else:
        s.say(
            pick(
                rng,
                f"It prints {_say_output(out)}",
                f"`{path}` prints {_say_output(out)}",
                f"Output: {_say_output(out)}",
            )
        )
    return out


def t_run_report(rng, funcs):
    path, code = _small_script(rng)
    user = pick(rng, *RUN_ASKS).format(path=path)
    py = "python" if "python" in user and rng.random() < 0.8 else "python3"
    with Session({path: code}) as s:
        r = rng.random()
        if r < 0.2:
            s.call("bash", command="ls")
        elif r < 0.35:
            s.call("read_file", path=path)
        _run_and_report(s, rng, path, py)
        return finish(s, rng, user)


README_LINES = [
    "Small helpers used by the scripts in this repo.",
    "Utilities for parsing and formatting.",
    "A toy project.",
    "Internal tools. Run the tests with python3 -m pytest.",
]


def _project(rng, funcs, tests: bool = True):
    """A small repository: 2-3 corpus modules in a package dir, a README and maybe a test file.
    Returns (files, [(path, text, function, lines), ...])."""
    pkg = pick(rng, "app", "src", "lib", "mytool", "core", "pkg")
    files, mods = {"README.md": f"# {pkg}\n\n{pick(rng, *README_LINES)}\n"}, []
    for _ in range(rng.randint(2, 3)):
        _, text, f, lines = corpus_module(rng, funcs)
        path = f"{pkg}/{pick(rng, *MODULE_NAMES)}.py"
        if path not in files:
            files[path] = text
            mods.append((path, text, f, lines))
    if tests and rng.random() < 0.6:
        bfiles, mod, test, *_ = buggy_task(rng, broken=False)
        files[f"tests/{test}"] = bfiles[test].replace(
            f"from {Path(mod).stem} import", f"from {Path(mod).stem} import"
        )
        files[mod] = bfiles[mod]
    return files, mods


def _defs_in(grep_out: str) -> list[tuple[str, str, str]]:
    """(path, line, name) of each `def name(` in grep output."""
    out = []
    for line in grep_out.split("\n"):
        m = re.match(r"([^:]+):(\d+):\s*def (\w+)\(", line)
        if m:
            out.append(m.groups())
    return out


def t_explore(rng, funcs):
    files, mods = _project(rng, funcs)
    user = pick(
        rng,
        "What's in this repo?",
        "Give me a quick overview of this project.",
        "I just cloned this. What's here?",
        "What does this codebase contain?",
        "Look around and tell me how this project is laid out.",
    )
    with Session(files) as s:
        cmd = pick(rng, "ls", "ls -R", "find . -type f | sort", "find . -name '*.py' | sort")
        s.call("bash", command=cmd)
        if rng.random() < 0.5:
            s.call("read_file", path="README.md")
        if rng.random() < 0.5:
            wc = s.call("bash", command="wc -l $(find . -name '*.py' | sort)")
            total = wc.strip().split("\n")[-1].split()[0]
        else:
            wc, total = None, None
        defs = _defs_in(s.call("grep", pattern=r"^def \w+\(")) if rng.random() < 0.7 else []
        pys = sorted(p for p in files if p.endswith(".py"))
        text = f"{len(files)} files; the Python code is in {_list(pys, 4)}" + (
            f" ({total} lines in all)." if total else "."
        )
        if defs:
            text += (
                " Top-level functions: "
                + ", ".join(f"`{n}` ({p}:{l})" for p, l, n in defs[:5])
                + "."
            )
        if any(p.startswith("tests/") for p in files):
            text += " There's a test file under `tests/`."
        s.say(text)
        return finish(s, rng, user)


def t_usage_search(rng, funcs):
    """Where a function is used across files (a grep for calls, not the definition)."""
    files, mods, fname = _multi_file(rng)
    user = pick(
        rng, f"Where is `{fname}` used?", f"Find every call to {fname}.", f"Who calls {fname}?"
    )
    with Session(files) as s:
        out = s.call("grep", pattern=rf"\b{fname}\(")
        hits = [
            l.split(":")[:2]
            for l in out.split("\n")
            if ":" in l and not re.search(rf"def {fname}\(", l)
        ]
        defs = [l.split(":")[:2] for l in out.split("\n") if re.search(rf"def {fname}\(", l)]
        text = f"`{fname}` is defined in `{defs[0][0]}` (line {defs[0][1]}). " if defs else ""
        text += (
            "It's called from " + ", ".join(f"`{p}:{n}`" for p, n in hits) + "."
            if hits
            else "Nothing calls it."
        )
        s.say(text)
        return finish(s, rng, user)


def t_todo_scan(rng, funcs):
    files, mods = _project(rng, funcs, tests=False)
    notes = [
        "handle empty input",
        "add a test for this",
        "this is slow for big inputs",
        "remove after the refactor",
        "check the return type",
        "log the error",
        "support unicode",
    ]
    for path, text, f, lines in mods[: rng.randint(1, len(mods))]:
        text = files[path].split("\n")
        at = rng.randint(lines["start"], lines["end"] - 1)
        indent = re.match(r"\s*", text[at]).group(0)
        text.insert(at, f"{indent}# {pick(rng, 'TODO', 'FIXME', 'TODO')}: {pick(rng, *notes)}")
        files[path] = "\n".join(text)
    user = pick(
        rng,
        "List the TODOs in this project.",
        "Are there any TODO or FIXME comments?",
        "What's left to do? Check the TODO comments.",
        "Find all FIXMEs and TODOs.",
    )
    with Session(files) as s:
        if rng.random() < 0.5:
            out = s.call("grep", pattern="TODO|FIXME")
        else:
            out = s.call("bash", command="grep -rn -E 'TODO|FIXME' . | sort")
        hits = [l for l in out.strip().split("\n") if "TODO" in l or "FIXME" in l]
        s.say(
            f"{len(hits)} of them:\n"
            + "\n".join(
                f"- `{h.split(':')[0]}:{h.split(':')[1].lstrip('.')}`: "
                f"{h.split('#', 1)[-1].strip()}"
                for h in hits
            )
        )
        return finish(s, rng, user)


def t_string_search(rng, funcs):
    """Find where a string literal from the code appears, then read around it."""
    for _ in range(20):
        path, text, f, lines = corpus_module(rng, funcs)
        strs = [
            m
            for m in re.findall(r"\"([A-Za-z][A-Za-z ,']{8,40})\"", f["src"])
            if text.count(m) == 1
        ]
        if strs:
            break
    else:
        return t_grep_explain(rng, funcs)
    needle = pick(rng, *strs)
    user = pick(
        rng,
        f'Where does the text "{needle}" come from?',
        f'I see "{needle}" somewhere. Which function has it?',
        f"Find the string '{needle}' in the code.",
    )
    with Session({path: text}) as s:
        out = s.call("grep", pattern=re.escape(needle))
        p, line = out.split("\n")[0].split(":")[:2]
        s.call("read_file", path=p, offset=max(1, int(line) - 3), limit=7)
        name = f["facts"]["name"]
        s.say(
            f"It's on line {line} of `{p}`, inside `{name}` (lines {lines['start']}-{lines['end']})."
        )
        return finish(s, rng, user)


def t_read_range(rng, funcs):
    path, text, f, lines = corpus_module(rng, funcs)
    n = text.count("\n")
    a = rng.randint(1, max(1, n - 5))
    b = min(n, a + rng.randint(3, 12))
    user = pick(
        rng,
        f"Show me lines {a}-{b} of {path}.",
        f"What's on lines {a} to {b} in {path}?",
        f"print lines {a}-{b} of {path}",
    )
    with Session({path: text}) as s:
        if rng.random() < 0.5:
            out = s.call("read_file", path=path, offset=a, limit=b - a + 1)
            first = out.split("\n")[0].split("\t", 1)[-1]
        else:
            out = s.call("bash", command=f"sed -n '{a},{b}p' {path}")
            first = out.split("\n")[0]
        s.say(
            f"Lines {a}-{b} of `{path}` are above; the first one is `{first.strip() or '(blank)'}`."
        )
        return finish(s, rng, user)


def t_shell_stats(rng, funcs):
    files, mods = _project(rng, funcs, tests=False)
    others = _other_files(rng, funcs)
    files.update(dict(others[: rng.randint(0, 2)]))
    path = pick(rng, *sorted(files))
    k = rng.randrange(5)
    with Session(files) as s:
        if k == 0:
            user = pick(rng, f"How many lines is {path}?", f"Line count of {path}?")
            out = s.call("bash", command=f"wc -l {path}")
            s.say(f"`{path}` has {out.split()[0]} lines.")
        elif k == 1:
            n = rng.randint(3, 10)
            user = pick(
                rng, f"Show me the first {n} lines of {path}.", f"head of {path} please ({n} lines)"
            )
            out = s.call("bash", command=f"head -n {n} {path}")
            s.say(
                f"Those are the first lines of `{path}`; it starts with `{out.split(chr(10))[0].strip()}`."
            )
        elif k == 2:
            user = pick(
                rng, "Which source file is the longest?", "What's the biggest file here, by lines?"
            )
            out = s.call(
                "bash", command="wc -l $(find . -type f -not -name '*.md' | sort) | sort -n"
            )
            rows = [
                l.split()
                for l in out.strip().split("\n")
                if l.strip() and not l.strip().endswith("total")
            ]
            s.say(f"`{rows[-1][1].lstrip('./')}`, with {rows[-1][0]} lines.")
        elif k == 3:
            user = pick(
                rng,
                "How many Python files are there, and how many lines in total?",
                "Count the .py files and their lines.",
            )
            out = s.call("bash", command="find . -name '*.py' | wc -l")
            n = out.strip()
            out = s.call("bash", command="cat $(find . -name '*.py' | sort) | wc -l")
            s.say(f"{n} Python files, {out.strip()} lines in total.")
        else:
            user = pick(rng, f"Show me the end of {path}.", f"What are the last lines of {path}?")
            out = s.call("bash", command=f"tail -n 5 {path}")
            s.say(
                f"The last lines of `{path}` are above; it ends with `{(out.strip().split(chr(10)) or [''])[-1].strip()}`."
            )
        return finish(s, rng, user)


GIT_SETUP = (
    "git init -q && git add -A && git -c user.email=dev@example.com -c user.name=dev commit -qm init"
    " && git config user.email dev@example.com && git config user.name dev"
)


def t_git_status(rng, funcs):
    files, mods = _project(rng, funcs, tests=False)
    path, text, f, lines = mods[0]
    untracked_name = pick(rng, "notes.txt", "scratch.py", "TODO.md")
    extra = {
        "notes.txt": "check the edge cases\n",
        "scratch.py": "print('trying things')\n",
        "TODO.md": "- write docs\n",
    }
    setup = (
        GIT_SETUP
        + f" && printf '%s\\n' '# local change' >> {path} && printf '%s' '{extra[untracked_name]}' > {untracked_name}"
    )
    user = pick(
        rng,
        "What have I changed since the last commit?",
        "What's the git status?",
        "Did I leave anything uncommitted?",
        "Which files did I modify?",
    )
    with Session(files, setup) as s:
        out = s.call(
            "bash", command=pick(rng, "git status --short", "git status --short", "git status")
        )
        modified = re.findall(r"^ M (\S+)$|^\s+modified:\s+(\S+)$", out, re.M)
        untracked = re.findall(r"^\?\? (\S+)$", out, re.M) or re.findall(
            r"^\t(\S+)$", out.split("Untracked files:")[-1], re.M
        )
        assert [a or b for a, b in modified] == [path] and untracked == [untracked_name], out
        if rng.random() < 0.6:
            diff = s.call("bash", command=f"git diff {path}")
            added = [
                l[1:] for l in diff.split("\n") if l.startswith("+") and not l.startswith("+++")
            ]
            detail = (
                f" The change in `{path}` adds {len(added)} line(s): `{added[0]}`." if added else ""
            )
        else:
            detail = ""
        s.say(f"One modified file, `{path}`, and one untracked file, `{untracked_name}`.{detail}")
        return finish(s, rng, user, followups=False)


# Other languages: small templates that run, and files from the corpus when it has them.
JS_PROGRAMS = [
    ("sum.js", "const xs = [{a}, {b}, {c}];\nconsole.log(xs.reduce((s, x) => s + x, 0));\n"),
    (
        "greet.js",
        'function greet(name) {{\n  return `Hello, ${{name}}!`;\n}}\nconsole.log(greet("{w}"));\n',
    ),
    ("count.js", "for (let i = 0; i < {a}; i++) {{\n  console.log(i);\n}}\n"),
]
C_PROGRAMS = [
    (
        "sum.c",
        "#include <stdio.h>\n\nint main(void) {{\n    int total = 0;\n    for (int i = 1; i <= {a}; i++)\n"
        '        total += i;\n    printf("%d\\n", total);\n    return 0;\n}}\n',
    ),
    (
        "square.c",
        "#include <stdio.h>\n\nstatic int square(int x) {{ return x * x; }}\n\nint main(void) {{\n"
        '    printf("%d\\n", square({b}));\n    return 0;\n}}\n',
    ),
]
SH_SCRIPTS = [
    (
        "build.sh",
        '#!/usr/bin/env bash\nset -e\necho "building {w}"\nmkdir -p out\necho "{w} v{a}" > out/VERSION\ncat out/VERSION\n',
    ),
    (
        "check.sh",
        '#!/usr/bin/env bash\nfor f in *.txt; do\n  echo "$f: $(wc -l < "$f") lines"\ndone\n',
    ),
]
DEF_PATTERNS = {
    "c": r"^[A-Za-z_][\w \*]*\b(\w+)\s*\([^;]*$",
    "cpp": r"^[A-Za-z_][\w \*:<>]*\b(\w+)\s*\([^;]*$",
    "javascript": r"function\s+(\w+)",
    "rust": r"fn\s+(\w+)",
}
EXT = {"c": ".c", "cpp": ".cpp", "javascript": ".js", "rust": ".rs"}


def corpus_files(docs, limit: int = 500, max_lines: int = 80) -> list[dict]:
    """Short non-Python files (C, C++, JS, Rust) from corpus documents, as {"lang", "text"}."""
    out = []
    for doc in docs:
        lang, text = doc.get("lang"), doc.get("text", "")
        if (
            lang in EXT
            and text.isascii()
            and "\r" not in text
            and 5 <= text.count("\n") <= max_lines
            and max(map(len, text.split("\n"))) <= 120
        ):
            out.append({"lang": lang, "text": text.rstrip("\n") + "\n"})
            if len(out) >= limit:
                break
    return out


class Corpus(list):
    """The corpus functions (a list, as before) plus the non-Python files, for the kinds that use them."""

    def __init__(self, functions, others=()):
        super().__init__(functions)
        self.others = list(others)


def _other_files(rng, funcs) -> list[tuple[str, str]]:
    """(path, text) of 1-2 non-Python files: from the corpus if it has some, else from the templates."""
    others = getattr(funcs, "others", None)
    if others and rng.random() < 0.7:
        out = []
        for doc in rng.sample(others, min(2, len(others))):
            out.append(
                (
                    pick(rng, "src/", "", "lib/")
                    + pick(rng, "util", "main", "io", "parse")
                    + EXT[doc["lang"]],
                    doc["text"],
                )
            )
        return out if len({p for p, _ in out}) == len(out) else out[:1]
    fill = {
        "a": rng.randint(3, 9),
        "b": rng.randint(2, 12),
        "c": rng.randint(1, 30),
        "w": pick(rng, "demo", "tool", "app"),
    }
    name, tmpl = pick(rng, *(JS_PROGRAMS + C_PROGRAMS))
    return [(name, tmpl.format(**fill))]


def _config_files(rng):
    port, ver = rng.choice([8000, 8080, 5000, 3000]), f"0.{rng.randint(1, 9)}.{rng.randint(0, 9)}"
    name = pick(rng, "demo", "mytool", "webapp", "parser")
    return (
        {
            "config.json": '{\n  "name": "%s",\n  "port": %d,\n  "debug": false\n}\n'
            % (name, port),
            "pyproject.toml": f'[project]\nname = "{name}"\nversion = "{ver}"\nrequires-python = ">=3.10"\n',
        },
        port,
        ver,
    )


def t_non_python(rng, funcs):
    k = rng.randrange(5)
    fill = {
        "a": rng.randint(3, 9),
        "b": rng.randint(2, 12),
        "c": rng.randint(1, 30),
        "w": pick(rng, "demo", "tool", "app"),
    }
    if k == 0:  # list the functions of a C/JS/Rust file
        others = getattr(funcs, "others", None)
        doc = (
            rng.choice(others) if others else {"lang": "c", "text": C_PROGRAMS[1][1].format(**fill)}
        )
        path = pick(rng, "src/", "") + pick(rng, "util", "main", "core", "io") + EXT[doc["lang"]]
        user = pick(rng, f"What functions are defined in {path}?", f"List the functions in {path}.")
        with Session({path: doc["text"]}) as s:
            out = s.call("grep", pattern=DEF_PATTERNS[doc["lang"]], path=path)
            names = []
            for line in out.split("\n"):
                m = (
                    re.search(DEF_PATTERNS[doc["lang"]], line.split(":", 2)[-1])
                    if ":" in line
                    else None
                )
                if (
                    m
                    and m.group(1) not in names
                    and m.group(1) not in ("if", "for", "while", "switch", "return")
                ):
                    names.append(m.group(1))
            if names:
                s.say(
                    f"`{path}` defines {_list(names, 6)}"
                    + (" (and more)." if len(names) > 6 else ".")
                )
            else:
                s.call("read_file", path=path, limit=20)
                s.say(f"No function definitions matched in `{path}`; the first lines are above.")
            return finish(s, rng, user)
    if k == 1:  # write and run a JS or C program
        name, tmpl = pick(rng, *(JS_PROGRAMS + C_PROGRAMS))
        code = tmpl.format(**fill)
        cmd = f"node {name}" if name.endswith(".js") else f"gcc -o prog {name} && ./prog"
        user = pick(
            rng,
            f"Write {name} and run it.",
            f"Here's a small program; save it as {name} and run it:\n\n```\n{code}```",
        )
        with Session({}) as s:
            s.call("write_file", path=name, content=code)
            out = s.call("bash", command=cmd)
            s.say(
                f"It fails: `{_error_line(out)}`."
                if _failed(out)
                else f"It prints {_say_output(out)}"
            )
            return finish(s, rng, user, followups=False)
    if k == 2:  # run a shell script
        name, tmpl = pick(rng, *SH_SCRIPTS)
        files = {name: tmpl.format(**fill), "a.txt": "one\ntwo\n", "b.txt": "x\n" * fill["a"]}
        user = pick(rng, f"Run {name} and tell me what it says.", f"What does {name} do? Run it.")
        with Session(files) as s:
            if rng.random() < 0.5:
                s.call("read_file", path=name)
            out = s.call("bash", command=f"bash {name}")
            s.say(
                f"`{name}` printed {_say_output(out)}"
                if not _failed(out)
                else f"It failed: `{_error_line(out)}`."
            )
            return finish(s, rng, user)
    files, port, ver = _config_files(rng)
    if k == 3:  # JSON edit, checked by parsing it
        new = port + rng.choice([1, 10, 80])
        user = pick(
            rng,
            f"Change the port in config.json to {new}.",
            f"Set port to {new} in config.json please.",
        )
        with Session(files) as s:
            s.call("read_file", path="config.json")
            s.call(
                "edit_file",
                path="config.json",
                old_string=f'"port": {port},',
                new_string=f'"port": {new},',
            )
            out = s.call(
                "bash",
                command="python3 -c \"import json; print(json.load(open('config.json'))['port'])\"",
            )
            s.say(
                f"Done: the port is {port} -> {new}; the file still parses and `port` reads back as `{out.strip()}`."
            )
            return finish(s, rng, user)
    return t_config_edit(rng, funcs)


def t_config_edit(rng, funcs):
    files, port, ver = _config_files(rng)
    major, minor, patch = map(int, ver.split("."))
    new = f"{major}.{minor}.{patch + 1}"
    user = pick(
        rng,
        f"Bump the version in pyproject.toml to {new}.",
        f"pyproject.toml should say version {new}.",
    )
    with Session(files) as s:
        s.call("grep", pattern="^version", path="pyproject.toml")
        s.call(
            "edit_file",
            path="pyproject.toml",
            old_string=f'version = "{ver}"',
            new_string=f'version = "{new}"',
        )
        out = s.call("grep", pattern="^version", path="pyproject.toml")
        s.say(f"Version is now {new} (was {ver}): `{out.split(':', 2)[-1]}`.")
        return finish(s, rng, user)


def _multi_file(rng):
    """A module with a known-good function, a script that uses it and a test file that imports it."""
    bfiles, mod, test, fname, bad, good = buggy_task(rng, broken=False)
    stem = Path(mod).stem
    fn = next(b for b in BUGGY if b[0] == fname)
    args = fn[3](rng)[0]
    args = args if isinstance(args, tuple) else (args,)
    main = f'from {stem} import {fname}\n\n\nif __name__ == "__main__":\n    print({fname}({", ".join(map(repr, args))}))\n'
    files = {
        mod: bfiles[mod],
        test: bfiles[test],
        pick(rng, "main.py", "report.py", "cli.py"): main,
    }
    return files, [mod, test], fname


def _edit_all(s, path: str, old_word: str, new_word: str):
    """edit_file every line of `path` that mentions old_word, each with a unique old_string."""
    while True:
        text = s.read(path)
        m = re.search(rf"\b{old_word}\b", text)
        if not m:
            return
        line = text[: m.start()].count("\n") + 1
        old = unique_context(text, line)
        s.call(
            "edit_file",
            path=path,
            old_string=old,
            new_string=re.sub(rf"\b{old_word}\b", new_word, old),
        )


def t_rename_multi(rng, funcs):
    files, _, fname = _multi_file(rng)
    new = pick(
        rng,
        *(
            n
            for n in (f"compute_{fname}", f"{fname}_of", f"get_{fname}", f"calc_{fname}")
            if n != fname
        ),
    )
    user = pick(
        rng,
        f"Rename `{fname}` to `{new}` everywhere.",
        f"{fname} should be called {new}. Update all uses.",
        f"Please rename the function {fname} -> {new} across the project.",
    )
    with Session(files) as s:
        out = s.call("grep", pattern=rf"\b{fname}\b")
        paths = sorted({l.split(":")[0] for l in out.split("\n") if ":" in l})
        s.say(f"`{fname}` appears in {len(paths)} files: {_list(paths, 5)}.")
        for p in paths:
            if rng.random() < 0.5:
                s.call("read_file", path=p)
            _edit_all(s, p, fname, new)
        out = s.call("grep", pattern=rf"\b{fname}\b")
        test = next(p for p in paths if p.startswith("test_"))
        run = s.call(
            "bash",
            command=pick(
                rng, f"python3 {test}", f"python3 -m pytest -qq -p no:cacheprovider {test}"
            ),
        )
        left = (
            "no uses of the old name are left"
            if out == "no matches"
            else f"the old name still appears:\n{out}"
        )
        s.say(
            f"Renamed in {len(paths)} files; {left}. "
            + (
                "The tests still fail:\n" + _show_output(run)
                if _failed(run)
                else f"The tests pass ({_summary_line(run) if 'passed' in run else 'all green'})."
            )
        )
        return finish(s, rng, user)


def _pytest_summary(out: str) -> str:
    fails = [l for l in out.split("\n") if l.startswith("FAILED ")]
    return (
        f"{len(fails)} failing test(s)"
        if fails
        else ("all tests pass" if not _failed(out) else _error_line(out))
    )


def t_pytest_fix(rng, funcs):
    runner = pick(rng, "pytest", "unittest", "module")
    files, mod, test, fname, bad, good = buggy_task(
        rng, style="unittest" if runner == "unittest" else "script"
    )
    stem = Path(test).stem
    cmd = {
        "pytest": f"python3 -m pytest -qq -p no:cacheprovider --tb=short {test}",
        "unittest": f"python3 -m unittest {stem} 2>&1 | grep -E '^(FAIL|ERROR|OK|FAILED)'",
        "module": f"python3 -m {stem}",
    }[runner]
    ask = {
        "pytest": "with pytest",
        "unittest": "with unittest",
        "module": f"with `python -m {stem}`",
    }[runner]
    user = pick(
        rng,
        f"Run the tests {ask} and fix what fails.",
        f"The tests for {fname} fail. Use {runner} to check, then fix it.",
        f"{test} is red ({runner}). Fix the code, not the test.",
    )
    with Session(files) as s:
        out = s.call("bash", command=cmd)
        if "No module named pytest" in out:
            s.say("pytest isn't installed here; the test file runs on its own, so I'll use that.")
            cmd = f"python3 {test}"
            out = s.call("bash", command=cmd)
        s.say(
            f"{_pytest_summary(out) if runner == 'pytest' else _error_line(out)}. "
            + pick(rng, *OPEN_READ)
        )
        s.call("read_file", path=mod)
        text = s.read(mod)
        line = _line_of(text, bad)
        s.say(f"Line {line}: `{bad.strip()}` should be `{good.strip()}`.")
        old = unique_context(text, line)
        s.call("edit_file", path=mod, old_string=old, new_string=old.replace(bad, good))
        out = s.call("bash", command=cmd)
        s.say(
            (
                "Fixed: the tests pass now."
                if not _failed(out)
                else "Still failing:\n" + _show_output(out)
            )
            + f" The change: `{bad.strip()}` -> `{good.strip()}` in `{mod}`."
        )
        return finish(s, rng, user)


def t_tool_error(rng, funcs):
    k = rng.randrange(4)
    if k == 0:  # the user's pattern is not a valid regex: escape it
        path, text, f, lines = corpus_module(rng, funcs)
        name = f["facts"]["name"]
        user = pick(rng, f"Search for `{name}(` in the code.", f'grep for "{name}(" please')
        with Session({path: text}) as s:
            s.call("grep", pattern=f"{name}(")
            s.say("An unescaped `(` is not a valid regex; escaping it.")
            out = s.call("grep", pattern=re.escape(name) + r"\(")
            hits = [l.split(":")[:2] for l in out.split("\n") if ":" in l]
            s.say(f"{len(hits)} match(es): " + ", ".join(f"`{p}:{n}`" for p, n in hits[:6]) + ".")
            return finish(s, rng, user)
    if k == 1:  # reading past the end of a file
        path, text, f, lines = corpus_module(rng, funcs)
        n = text.count("\n")
        want = n + rng.randint(20, 200)
        user = f"What's on line {want} of {path}?"
        with Session({path: text}) as s:
            s.call("read_file", path=path, offset=want, limit=5)
            s.call("bash", command=f"wc -l {path}")
            s.say(
                f"`{path}` has only {n} lines, so there is no line {want}. Want me to show the end of the file?"
            )
            return finish(s, rng, user)
    if k == 2:  # a missing dependency: report it, don't guess
        mod = pick(rng, "fastjsonx", "yamlite", "colorfulx", "tabulatex")
        path = pick(rng, "main.py", "app.py", "report.py")
        code = f"import {mod}\n\nprint({mod}.dumps({{'ok': True}}))\n"
        user = pick(rng, f"Run {path}.", f"Why does {path} not work?")
        with Session({path: code}) as s:
            out = s.call("bash", command=f"python3 {path}")
            s.call("bash", command=f'python3 -c "import {mod}"')
            s.say(
                f"`{path}` fails with `{_error_line(out)}`: the package `{mod}` isn't installed in this environment. "
                f"Install it (e.g. `pip install {mod}`) and it should run; I haven't installed anything."
            )
            return finish(s, rng, user, followups=False)
    path, code = _small_script(rng)  # a syntax error in the user's file: find it, fix it, run
    lines = code.split("\n")
    i = next((j for j, l in enumerate(lines) if l.rstrip().endswith(":")), None)
    if i is None:
        return t_run_report(rng, funcs)
    broken = "\n".join(lines[:i] + [lines[i].rstrip()[:-1]] + lines[i + 1 :])
    user = pick(rng, *RUN_ASKS).format(path=path)
    with Session({path: broken}) as s:
        out = s.call("bash", command=f"python3 {path}")
        m = re.search(r"line (\d+)", out)
        s.say(f"`{_error_line(out)}`" + (f" on line {m.group(1)}" if m else "") + ". Reading it.")
        s.call("read_file", path=path)
        s.say(f"Line {i + 1} is missing its colon.")
        s.call(
            "edit_file",
            path=path,
            old_string=unique_context(broken, i + 1),
            new_string=unique_context(code, i + 1),
        )
        _run_and_report(s, rng, path, "python3")
        return finish(s, rng, user)


def t_long_output(rng, funcs):
    n = rng.randint(1500, 4000)
    path = pick(rng, "gen.py", "dump.py", "table.py")
    code = f"for i in range({n}):\n    print(i, i * i)\n"
    user = pick(
        rng,
        f"Run {path} and tell me the last line it prints.",
        f"How many lines does {path} print, and what's the last one?",
    )
    with Session({path: code}) as s:
        s.call("bash", command=f"python3 {path}")
        s.say(
            "The output was cut off (too long to show). Counting the lines and showing the end instead."
        )
        count = s.call("bash", command=f"python3 {path} | wc -l")
        tail = s.call("bash", command=f"python3 {path} | tail -n 1")
        s.say(f"It prints {count.strip()} lines; the last is `{tail.strip()}`.")
        return finish(s, rng, user, followups=False)


def t_qa_read(rng, funcs):
    """A question about a function, answered from reading it; no edit."""
    path, text, f, lines = corpus_module(rng, funcs)
    fa, name = f["facts"], f["facts"]["name"]
    q = rng.randrange(5)
    user = [
        f"Does `{name}` in {path} raise any exceptions?",
        f"What does {name} return?",
        f"Which functions does {name} call?",
        f"How many parameters does `{name}` take?",
        f"Is {name} a generator?",
    ][q]
    with Session({path: text}) as s:
        if rng.random() < 0.5:
            s.call("read_file", path=path)
        else:
            p, offset = _grep_read(s, rng, name)
            s.call("read_file", path=p, offset=offset, limit=lines["end"] - lines["start"] + 3)
        where = f"(`{path}`, lines {lines['start']}-{lines['end']})"
        args = [a for a in fa["args"] if a not in ("self", "cls")]
        ans = [
            f"Yes: it raises {_list(fa['raises'], 3)} {where}."
            if fa["raises"]
            else f"No `raise` in `{name}` {where}"
            + (f"; it does catch `{fa['catches'][0]}`." if fa["catches"] else "."),
            (
                f"It returns {_list(fa['returns'], 3).replace(' and ', ' or ')} {where}."
                if fa["returns"] and fa["returns"] != ["None"]
                else f"Nothing useful: no value is returned {where}."
            ),
            f"It calls {_list(fa['calls'], 5)} {where}."
            if fa["calls"]
            else f"It calls no other functions {where}.",
            f"{len(args)}: {_list(args, 6)} {where}." if args else f"None {where}.",
            f"Yes, it yields {where}." if fa["yields"] else f"No, it has no `yield` {where}.",
        ][q]
        s.say(ans)
        return finish(s, rng, user)


# Denials: the user refuses a call at the approval prompt; the assistant does not retry it blindly.
def t_denial(rng, funcs):
    k = rng.randrange(4)
    if k == 0:  # running the program is denied: read it instead; the user may then allow it
        path, code = _small_script(rng)
        user = pick(rng, *RUN_ASKS).format(path=path)
        with Session({path: code}) as s:
            s.deny("bash", command=f"{'python' if 'python' in user else 'python3'} {path}")
            s.say(
                pick(
                    rng,
                    "You declined running it, so I haven't executed anything. I can read it instead.",
                    "Understood, not running it. Reading the file instead.",
                )
            )
            s.call("read_file", path=path)
            s.say(
                f"`{path}` is {code.count(chr(10))} lines; I haven't run it, so I can't tell you its output for sure. "
                "Say the word if you want me to run it."
            )
            if rng.random() < 0.5:
                s.user(pick(rng, "OK, go ahead and run it.", "Fine, run it.", "Yes, run it now."))
                _run_and_report(s, rng, path, "python3")
            return finish(s, rng, user)
    if k == 1:  # an edit is denied: describe it instead
        files, mod, test, fname, bad, good = buggy_task(rng)
        user = pick(rng, f"Fix {fname} in {mod}.", f"{test} fails; fix the bug.")
        with Session(files) as s:
            s.call("read_file", path=mod)
            text = s.read(mod)
            old = unique_context(text, _line_of(text, bad))
            s.deny("edit_file", path=mod, old_string=old, new_string=old.replace(bad, good))
            s.say(
                f"You denied the edit, so `{mod}` is unchanged. The fix I'd make: replace `{bad.strip()}` with "
                f"`{good.strip()}`."
            )
            return finish(s, rng, user)
    if k == 2:  # writing a file is denied: show the code instead
        request, path, code, argv = program_request(rng)
        with Session({}) as s:
            s.deny("write_file", path=path, content=code)
            s.say(
                f"Not written, since you declined. Here's the code for `{path}` if you want to save it yourself:\n\n```python\n{code}```"
            )
            return finish(s, rng, request)
    files, mods = _project(rng, funcs, tests=False)  # a destructive command is denied
    target = pick(rng, *sorted(files))
    user = pick(rng, f"Delete {target}.", f"Remove {target}, it's not needed.")
    with Session(files) as s:
        s.deny("bash", command=f"rm {target}")
        s.say(f"You declined, so `{target}` is still there. Nothing was changed.")
        return finish(s, rng, user)


# Answers with no tool at all: computed facts (really evaluated here) and short explanations.
EXPRS = [
    lambda r: f"{r.randint(2, 99)} * {r.randint(2, 99)}",
    lambda r: f"{r.randint(10, 999)} // {r.randint(2, 9)}",
    lambda r: f"{r.randint(10, 999)} % {r.randint(2, 9)}",
    lambda r: f"'{pick(r, 'hello', 'python', 'agent')}'[::-1]",
    lambda r: f"sorted({[r.randint(0, 9) for _ in range(5)]})",
    lambda r: f"len('{pick(r, 'tokenizer', 'nanocode', 'abc')}')",
    lambda r: f"list(range({r.randint(0, 3)}, {r.randint(4, 9)}))",
    lambda r: f"'{pick(r, 'a,b,c', 'x-y', '1 2 3')}'.split('{pick(r, ',', '-', ' ')}')",
    lambda r: f"{r.randint(1, 9)} ** {r.randint(2, 6)}",
    lambda r: f"max({[r.randint(0, 50) for _ in range(4)]})",
    lambda r: f"'{pick(r, 'Hello', 'World')}'.lower()",
    lambda r: f"sum(range({r.randint(2, 50)}))",
    lambda r: "bool(" + pick(r, "[]", "0", "''", "[0]", "'0'", "None") + ")",
    lambda r: f"{r.randint(2, 999)} + {r.randint(2, 999)}",
    lambda r: f"abs({r.randint(-99, -1)})",
    lambda r: f"'{pick(r, 'ab', 'xyz', '-')}' * {r.randint(2, 5)}",
    lambda r: f"divmod({r.randint(10, 500)}, {r.randint(2, 12)})",
    lambda r: f"round({r.uniform(0, 10):.4f}, {r.randint(0, 2)})",
]
CONCEPTS = [
    (
        "What's the difference between a list and a tuple in Python?",
        "A list is mutable (you can append, remove, reassign items); a tuple is immutable. Tuples can be dict keys and "
        "set members (if their items are hashable); lists cannot. Use a tuple for a fixed record, a list for a collection that changes.",
    ),
    (
        'What does `if __name__ == "__main__":` do?',
        "It runs the block only when the file is executed as a script (`python file.py` or `python -m module`), not when it is imported. "
        "That lets one file be both an importable module and a runnable program.",
    ),
    (
        "When should I use `is` instead of `==`?",
        "`is` checks identity (the same object); `==` checks equality (same value). Use `is` for `None` (and other singletons), `==` for values.",
    ),
    (
        "What is a generator in Python?",
        "A function that uses `yield`. Calling it returns an iterator that runs the body lazily, one value per `next()`, so it never "
        "builds the whole sequence in memory.",
    ),
    (
        "What does `git rebase` do, compared to `git merge`?",
        "`merge` joins two branches with a merge commit and keeps history as it happened. `rebase` replays your commits on top of "
        "another branch, giving a linear history but new commit ids; don't rebase commits others already pulled.",
    ),
    (
        "Why does `0.1 + 0.2 == 0.3` come out False?",
        "Floats are binary fractions, and 0.1, 0.2 and 0.3 have no exact binary form, so the sum is 0.30000000000000004. "
        "Compare with a tolerance: `math.isclose(0.1 + 0.2, 0.3)`.",
    ),
    (
        "What does `*args` mean in a function signature?",
        "It collects extra positional arguments into a tuple named `args`; `**kwargs` does the same for keyword arguments, as a dict.",
    ),
    (
        "What's a virtual environment for?",
        "An isolated Python install per project: its own packages and versions, so projects don't break each other. "
        "`python3 -m venv .venv`, then `source .venv/bin/activate`.",
    ),
    (
        "What does `chmod +x script.sh` do?",
        "It sets the executable bit, so you can run the script directly as `./script.sh` (with a `#!` line naming the interpreter).",
    ),
    (
        "What tools do you have?",
        "Five: `bash` (run a shell command), `read_file`, `write_file`, `edit_file` (replace a unique snippet) and `grep`. "
        "I run them in your project directory, and you approve each call.",
    ),
    (
        "Can you explain what a race condition is?",
        "Two threads or processes touch shared state and the result depends on which runs first. Fix it with a lock, "
        "an atomic operation, or by not sharing the state.",
    ),
    ("hi", "Hi. What are we working on?"),
    (
        "What's the time complexity of looking up a key in a Python dict?",
        "O(1) on average (a hash table); O(n) in the rare worst case with many hash collisions.",
    ),
]
SNIPPETS = [
    (
        "reverse a list",
        "xs = [1, 2, 3]\nxs.reverse()        # in place\nys = xs[::-1]       # a reversed copy\n",
    ),
    (
        "read a file line by line",
        'with open("data.txt") as f:\n    for line in f:\n        print(line.rstrip("\\n"))\n',
    ),
    (
        "count words in a string",
        "from collections import Counter\n\ncounts = Counter(text.split())\n",
    ),
    ("sort a list of dicts by a key", 'rows.sort(key=lambda r: r["age"])\n'),
    ("parse JSON from a string", "import json\n\ndata = json.loads(text)\n"),
    ("get command-line arguments", "import sys\n\nargs = sys.argv[1:]\n"),
]


ASK_PREFIXES = ["", "Quick question: ", "No need to run anything. ", "Just tell me: "]


def t_no_tool(rng, funcs):
    # mostly computed expressions: the only endless source of distinct no-tool answers (the concepts and
    # snippets are a fixed bank, so deduplication keeps only a few dozen of them)
    k = 0 if rng.random() < 0.7 else rng.randrange(1, 3)
    if k == 0:
        expr = rng.choice(EXPRS)(rng)
        value = eval(
            expr,
            {
                "__builtins__": {
                    "sorted": sorted,
                    "len": len,
                    "list": list,
                    "range": range,
                    "max": max,
                    "sum": sum,
                    "bool": bool,
                    "round": round,
                    "abs": abs,
                    "divmod": divmod,
                    "None": None,
                }
            },
        )
        user = pick(
            rng,
            f"What does `{expr}` evaluate to in Python?",
            f"Quick one: what is {expr}?",
            f"What's `{expr}`?",
        )
        answer = pick(
            rng, f"`{value!r}`.", f"`{expr}` is `{value!r}`.", f"It evaluates to `{value!r}`."
        )
    elif k == 1:
        user, answer = rng.choice(CONCEPTS)
        user = pick(rng, *ASK_PREFIXES) + user
    else:
        what, code = rng.choice(SNIPPETS)
        user = pick(
            rng,
            f"How do I {what} in Python? Just show me, no need to run anything.",
            f"Show me how to {what}.",
            f"What's the Python idiom to {what}? No need to run it.",
        )
        answer = f"```python\n{code}```"
    with Session({}) as s:
        s.say(answer)
        return s.record(user)


# Follow-up turns: after the first task the user asks something more, in the same directory.
def finish(s, rng, user: str, followups: bool = True) -> dict:
    """The record of session `s` (first user message `user`); with probability FOLLOWUP_RATE, when the
    kind allows it, 1-2 follow-up turns are added first."""
    if followups and rng.random() < FOLLOWUP_RATE:
        for _ in range(1 + (rng.random() < 0.3)):
            follow_up(s, rng)
    return s.record(user)


def follow_up(s, rng):
    files = read_tree(s.dir)
    pys = [p for p in files if p.endswith(".py")]
    path = pick(rng, *(pys or sorted(files))) if files else None
    k = rng.randrange(8) if path else 7
    if k == 0:
        s.user(pick(rng, f"How many lines is {path} now?", f"How long is {path}?"))
        out = s.call("bash", command=f"wc -l {path}")
        s.say(f"{out.split()[0]} lines.")
    elif k == 1:
        s.user(pick(rng, f"Show me {path}.", f"Let me see the current {path}."))
        s.call("read_file", path=path)
        s.say(f"That's the whole of `{path}` as it is now.")
    elif k == 2:
        s.user(pick(rng, "What files are here now?", "List the files."))
        out = s.call(
            "bash", command=pick(rng, "ls", "find . -type f -not -path '*/__pycache__/*' | sort")
        )
        s.say(f"{len(out.split())} entries, listed above.")
    elif k == 3 and path.endswith(".py"):
        s.user(pick(rng, f"Does {path} still compile?", f"Is {path} valid Python?"))
        out = s.call("bash", command=f"python3 -m py_compile {path} && echo ok")
        s.say("Yes, it compiles." if out.strip() == "ok" else f"No: `{_error_line(out)}`.")
    elif (
        k == 4
        and path.endswith(".py")
        and "__main__" in files[path]
        or k == 4
        and path.endswith(".py")
        and "print(" in files[path]
    ):
        s.user(pick(rng, f"Run {path} again.", f"Run {path} once more and tell me what it prints."))
        _run_and_report(s, rng, path, "python3")
    elif k == 5 and (names := re.findall(r"^def (\w+)\(", "\n".join(files[p] for p in pys), re.M)):
        name = pick(rng, *names)
        s.user(pick(rng, f"Where is {name} defined?", f"Which file has `{name}`?"))
        out = s.call("grep", pattern=rf"^def {name}\(")
        hit = out.split("\n")[0].split(":")
        s.say(f"`{hit[0]}`, line {hit[1]}." if len(hit) > 2 else "It isn't defined here.")
    elif k == 6:
        n = files[path].count("\n")
        line = rng.randint(1, max(1, n))
        s.user(f"What's on line {line} of {path}?")
        out = s.call("read_file", path=path, offset=line, limit=1)
        text = out.split("\n")[0].split("\t", 1)[-1].strip()
        s.say(f"`{text}`" if text else "It's a blank line.")
    else:
        s.user(pick(rng, "Thanks.", "thanks!", "Great, that's all.", "OK, thanks."))
        s.say(pick(rng, "You're welcome.", "Anytime.", "Sure thing."))


# -----------------------------------------------------------------------------
# the registry: every kind, its sampling weight, and whether training sees it ("seen"). The unseen
# kinds appear only among the held-out validity prompts, to measure how the format generalizes.

KINDS = {
    # name:            (builder,            weight, seen)
    "explain": (t_explain, 2, True),
    "grep_explain": (t_grep_explain, 2, True),
    "edit": (t_edit, 3, True),
    "write_run": (t_write_run, 2, True),
    "test_fix": (t_test_fix, 2, True),
    "missing_file": (t_missing_file, 1, True),
    "edit_not_found": (t_edit_not_found, 1, True),
    "edit_not_unique": (t_edit_not_unique, 1, True),
    "command_not_found": (t_command_not_found, 1, True),
    "run_report": (t_run_report, 5, True),
    "explore": (t_explore, 2, True),
    "todo_scan": (t_todo_scan, 1, True),
    "string_search": (t_string_search, 1, True),
    "read_range": (t_read_range, 1, True),
    "shell_stats": (t_shell_stats, 2, True),
    "git_status": (t_git_status, 1, True),
    "non_python": (t_non_python, 2, True),
    "rename_multi": (t_rename_multi, 2, True),
    "pytest_fix": (t_pytest_fix, 2, True),
    "tool_error": (t_tool_error, 2, True),
    "long_output": (t_long_output, 1, True),
    "qa_read": (t_qa_read, 2, True),
    "denial": (t_denial, 3, True),
    "no_tool": (t_no_tool, 10, True),
    "usage_search": (t_usage_search, 1, False),
    "config_edit": (t_config_edit, 1, False),
}
FOLLOWUP_RATE = 0.33  # share of sessions (of the kinds that allow it) that get 1-2 follow-up turns
TASKS = [k for k, (_, _, seen) in KINDS.items() if seen]  # the kinds training data is drawn from
UNSEEN = [k for k, (_, _, seen) in KINDS.items() if not seen]
# Validity prompts ask for a tool call, so they come from the kinds whose answer makes one.
CALLING = [k for k in TASKS if k != "no_tool"]


def make_trajectory(kind: str, rng, funcs: list) -> dict:
    record = KINDS[kind][0](rng, funcs)
    return {
        "messages": record["messages"],
        "kind": kind,
        **{k: v for k, v in record.items() if k != "messages"},
    }


def draw_kind(rng, kinds: list | None = None, weights: dict | None = None) -> str:
    """A kind drawn with the registry's weights, or those `weights` gives instead (from the seen kinds
    unless `kinds` names others)."""
    kinds = kinds or TASKS
    return rng.choices(kinds, [(weights or {}).get(k, KINDS[k][1]) for k in kinds])[0]


def trajectory(
    i: int, seed: int, funcs: list, kinds: list | None = None, weights: dict | None = None
) -> dict:
    """Trajectory number i of a seed: depends only on (seed, i), so any one can be regenerated alone."""
    rng = random.Random(seed * 1_000_003 + i)
    return make_trajectory(draw_kind(rng, kinds, weights), rng, funcs)


def generate_trajectories(n: int, seed: int, funcs: list, kinds: list | None = None) -> list[dict]:
    if not funcs:
        raise ValueError("no corpus functions to build trajectories from")
    return [trajectory(i, seed, funcs, kinds) for i in range(n)]


# Held-out validity prompts: the user side of fresh records (the val split's corpus), of the seen kinds
# and the unseen ones, plus seen-kind requests in phrasings training never uses.
UNSEEN_PHRASINGS = [
    "Task for you: {u}",
    "{u} Report back briefly.",
    "Hey, quick request. {u}",
    "{u} (Use the tools.)",
]


def validity_prompt(i: int, seed: int, funcs: list) -> dict:
    """{"messages": [...ending with a user turn...], "kind", "seen"}: prompt i of a seed; a third are of an
    unseen kind, a sixth are seen kinds with an unseen phrasing, the rest as in training."""
    rng = random.Random(seed * 1_000_003 + i)
    r = rng.random()
    kind = draw_kind(rng, UNSEEN if r < 1 / 3 else CALLING)
    rec = make_trajectory(kind, rng, funcs)
    msgs = rec["messages"][:1]
    seen = r >= 1 / 3
    if 1 / 3 <= r < 1 / 2:
        msgs = [
            {"role": "user", "content": pick(rng, *UNSEEN_PHRASINGS).format(u=msgs[0]["content"])}
        ]
        seen = False
    return {
        "messages": msgs,
        "kind": kind,
        "seen": seen,
        "template": "unseen" if 1 / 3 <= r < 1 / 2 else "seen",
    }


# -----------------------------------------------------------------------------
# preference pairs

BAD_CALLS = [
    ("cat", lambda a: {"file": a.get("path", "main.py")}),
    ("read", lambda a: a),
    ("run", lambda a: {"cmd": a.get("command", "ls")}),
    ("search", lambda a: {"query": a.get("pattern", "def")}),
]
FLATTERY_OPEN = [
    "Great question! I'd be absolutely delighted to help you with this!",
    "What a fantastic request! Your code looks really great already.",
    "Absolutely! You're completely right to ask about this, it's a wonderful thing to look into.",
]
FLATTERY_CLOSE = [
    "I hope this helps! Let me know if there's anything else at all I can do for you. Happy coding!",
    "Please don't hesitate to reach out if you have any other questions! I'm always happy to help!",
    "This should probably work, I think, although I can't be completely sure. Hope that helps!",
]


def _malformed(rng, parts):
    i = next((i for i, p in enumerate(parts) if p["type"] == "tool_call"), None)
    if i is None:
        return None
    call = parts[i]
    if rng.random() < 0.5:  # a tool that does not exist
        name, fix = BAD_CALLS[rng.randrange(len(BAD_CALLS))]
        bad = {"type": "tool_call", "name": name, "arguments": fix(call["arguments"])}
    else:  # a real tool with a wrong argument name
        args = dict(call["arguments"])
        key = next(iter(args))
        args[
            {"path": "file_path", "command": "cmd", "pattern": "regex", "content": "text"}.get(
                key, key + "_"
            )
        ] = args.pop(key)
        bad = {"type": "tool_call", "name": call["name"], "arguments": args}
    return parts[:i] + [bad, {"type": "text", "text": pick(rng, "Done.", "That's it.", "All set.")}]


def _not_unique(rng, parts, files):
    """Swap the first successful edit's old_string for a piece of it that occurs 2+ times in the file
    (a whole line if one repeats, else a word), then claim success anyway."""
    for i, p in enumerate(parts):
        if (
            p["type"] == "tool_call"
            and p["name"] == "edit_file"
            and parts[i + 1]["text"].startswith("edited")
        ):
            _, state = execute(files, parts[:i])
            text, old = state.get(p["arguments"]["path"], ""), p["arguments"]["old_string"]
            lines = sorted(set(old.split("\n")), key=lambda w: (-len(w), w))
            words = sorted(set(re.findall(r"[A-Za-z_]\w+", old)), key=lambda w: (-len(w), w))
            piece = next((w for w in lines + words if w.strip() and text.count(w) >= 2), None)
            if piece is None:
                return None
            args = dict(p["arguments"], old_string=piece)
            return parts[:i] + [
                {"type": "tool_call", "name": "edit_file", "arguments": args},
                {
                    "type": "text",
                    "text": pick(rng, "Done, the edit is in.", "Edited.", "Changed it."),
                },
            ]
    return None


def _unbacked(rng, parts):
    calls = [i for i, p in enumerate(parts) if p["type"] == "tool_call"]
    if not calls:
        return None
    last = calls[-1]
    if (
        parts[last]["name"] in ("bash", "read_file") and len(calls) > 1
    ):  # drop the final check, keep the claim
        return parts[:last] + parts[last + 2 :]
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
    """A preference pair from a trajectory's last assistant turn: chosen = that message, rejected = a
    flawed version whose tool calls are really executed from the same files (the state after the
    earlier turns). None if `kind` does not apply."""
    turns = assistant_turns(record)
    if not turns or record.get("setup"):  # a pair's side is replayed from plain files; no setup
        return None
    parts = list(turns[-1])
    files = (
        record["last_turn_files"] if len(turns) > 1 else record["files"]
    )  # the files the last turn started from
    kinds = [kind] if kind else rng.sample(PAIR_KINDS, len(PAIR_KINDS))
    for k in kinds:
        plan = {
            "malformed_call": lambda: _malformed(rng, parts),
            "not_unique": lambda: _not_unique(rng, parts, files),
            "unbacked_claim": lambda: _unbacked(rng, parts),
            "style": lambda: _style(rng, parts),
        }[k]()
        if plan is None:
            continue
        rejected = execute_after(files, parts, plan)
        if rejected == parts:
            continue
        return {
            "prompt": {"messages": record["messages"][:-1]},
            "chosen": {"role": "assistant", "content": parts},
            "rejected": {"role": "assistant", "content": rejected},
            "kind": k,
            "task": record["kind"],
            "files": files,
        }
    return None


def pair(i: int, record: dict, seed: int) -> dict | None:
    return make_pair(record, random.Random(seed * 1_000_003 + i))


def generate_pairs(records: list, seed: int) -> list[dict]:
    return [p for i, r in enumerate(records) if (p := pair(i, r, seed)) is not None]
