"""Tasks for reinforcement learning, each with an exact verifier, and the verifier itself.

A task (one JSON object per line in a task file):
    {"id": str, "source": str, "prompt": str,       # the user's message
     "check": {"type": "tests", "tests": str}       # python asserts run after the written code
            | {"type": "stdout", "expected": str,   # what running the written code must print
               "argv": [str, ...]}                  #   (optional: its command-line arguments)
            | {"type": "agent", "task": {...}}}     # a nanocode.agent_tasks task: files, verifier
For tests and stdout checks the model answers as the agent does: it writes the code with a
write_file call (the last .py file it writes or edits is the answer); running, reading or explaining
along the way is up to it. An agent check starts the reply in a scratch dir holding the task's files
and runs the task's own verifier on that dir afterwards (nanocode.agent_tasks.verify).

Sources:
- "programs": the small-program requests of nanocode.synth_scenes' write-and-run requests, drawn
  fresh (not read from the SFT files) and split by a hash of the request, so a held-out request is
  never a train one: the request, and what the reference program prints. The SFT data has the same
  kind (and, the request space being small, many of the same requests): a task set a small model
  can partly solve.
- "corpus": short functions from the local corpus, their behaviour pinned by tests made by running
  the original on varied inputs (only functions that return the same value twice and whose outputs
  vary are kept); the model sees the signature and docstring and writes the function.
- "agent": nanocode.agent_tasks' generator (fix, implement, rename, ... in a scratch repository) on
  seeds other than the shipped evaluation suite's, minus any task equal to one of the suite's.
- "mbpp": MBPP's train split (its test split stays an evaluation); a local file in the hub's schema
  works.
- a path to a .jsonl file: tasks in the format above, or problems in HumanEval's schema (task_id,
  prompt, test, entry_point), e.g. HumanEval-style training sets; HumanEval itself is refused (it
  stays code_eval's).
Verification runs the code in nanocode.execution's sandbox; anything but a clean pass (an error, a
crash of the verifier, a timeout, a fork) is reward 0 with the reason kept.
"""

import ast
import json
import random
import shlex
import zlib

from nanocode import agent_tasks, execution, synth_corpus, synth_scenes
from nanocode.agent_tasks import call_counts  # noqa: F401 -- part of this module's API (code_rl)
from nanocode.code_tasks import code_from_calls, load_mbpp
from nanocode.common import NanocodeError, read_jsonl

# check type -> (its key, the key's type)
CHECK_KEYS = {"tests": ("tests", str), "stdout": ("expected", str), "agent": ("task", dict)}
CHECK_TYPES = tuple(CHECK_KEYS)
# Argument pools for pinning a function's behaviour: a mix of the types small corpus functions take.
POOL = [0, 1, 2, 3, 7, -4, 10, 2.5, "", "a", "hello", "a,b,c", "Hello World", [], [1, 2, 3]]
POOL += [[3, 1, 2], ["x", "y"], (1, 2), {"a": 1}, None, True, False]


def _task(id: str, source: str, prompt: str, check: dict | None) -> dict:
    return {"id": id, "source": source, "prompt": prompt, "check": check}


def validate_task(t, where: str) -> dict:
    """A task as loaded; a missing or null check is a task without a verifier (it will score 0,
    counted)."""
    ok = isinstance(t, dict) and isinstance(t.get("prompt"), str)
    if not ok or not isinstance(t.get("check"), (dict, type(None))):
        raise NanocodeError(
            f"{where}: expected a task object with a string 'prompt' and a 'check' object"
        )
    c = t.get("check")
    if c is not None:
        if c.get("type") not in CHECK_TYPES:
            raise NanocodeError(
                f"{where}: check type must be one of {CHECK_TYPES}, got {c.get('type')!r}"
            )
        key, want = CHECK_KEYS[c["type"]]
        if not isinstance(c.get(key), want):
            article = "an object" if want is dict else "a string"
            raise NanocodeError(f"{where}: a {c['type']} check needs {article} {key!r}")
        argv = c.get("argv", [])
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise NanocodeError(f"{where}: a check's 'argv' must be a list of strings")
    return _task(str(t.get("id", where)), str(t.get("source", "file")), t["prompt"], c)


def humaneval_style_task(r: dict, where: str) -> dict:
    """A problem in HumanEval's schema as a tests task: the model writes the function of `prompt`
    (its signature and docstring), and `test` (which defines check(candidate)) calls it."""
    if not all(isinstance(r.get(k), str) for k in ("task_id", "prompt", "test", "entry_point")):
        raise NanocodeError(
            f"{where}: a HumanEval-style problem needs strings task_id, prompt, test, entry_point"
        )
    if r["task_id"].startswith("HumanEval/"):
        raise NanocodeError(
            f"{where}: {r['task_id']} is HumanEval itself, which stays held out for code_eval"
        )
    prompt = f"Write this function in solution.py:\n\n{r['prompt'].strip()}\n"
    check = {"type": "tests", "tests": f"{r['test']}\n\ncheck({r['entry_point']})"}
    return _task(r["task_id"], "humaneval_style", prompt, check)


def load_task_file(path) -> list[dict]:
    """Tasks of a .jsonl file: our task format, or problems in HumanEval's schema (told apart per
    line)."""
    tasks = [
        humaneval_style_task(obj, where)
        if isinstance(obj, dict) and "entry_point" in obj
        else validate_task(obj, where)
        for where, obj in read_jsonl(path, "task file")
    ]
    if not tasks:
        raise NanocodeError(f"{path} holds no tasks")
    return tasks


# -----------------------------------------------------------------------------
# sources


def in_split(text: str, split: str) -> bool:
    """A stable train/val split by content: a quarter of all texts are val."""
    # crc32, not hash(): str hashes are salted per process, so the split would change every run
    return (zlib.crc32(text.encode()) % 4 == 0) == (split == "val")


def with_argv(code: str, argv: list[str]) -> str:
    """The program as run with these command-line arguments."""
    return code if not argv else f"import sys\nsys.argv = {['main.py'] + list(argv)!r}\n" + code


def program_tasks(
    split: str = "train", seed: int = 0, draws: int = 1000, workers: int = 2
) -> list[dict]:
    """stdout tasks from nanocode.synth_scenes' small-program requests (the write-and-run kind):
    `draws` requests drawn with `seed`, the distinct ones of this split, each with what its
    reference program prints (run in the sandbox twice, with the request's arguments; one that
    fails, prints nothing, or prints something else the second time makes no task)."""
    rng, cands = random.Random(seed), {}
    for _ in range(draws):
        request, _, code, argv = synth_scenes.program_request(rng)
        if request not in cands and in_split(request, split):
            cands[request] = (code, shlex.split(argv))
    progs = [with_argv(code, argv) for code, argv in cands.values()]
    results = execution.run_many(progs * 2, workers=workers, timeout=5.0)
    tasks = []
    for (request, (_, argv)), r, again in zip(cands.items(), results, results[len(progs) :]):
        # an output that differs between runs (random, time, a set of str, which hash
        # randomization reorders) cannot be an exact check
        if r.passed and again.passed and r.stdout.strip() and r.stdout == again.stdout:
            check = {"type": "stdout", "expected": r.stdout, **({"argv": argv} if argv else {})}
            task_id = f"programs/{zlib.crc32(request.encode()):08x}"
            tasks.append(_task(task_id, "programs", request, check))
    return tasks


def agent_rl_tasks(split: str = "train", seed: int = 0, n: int = 200) -> list[dict]:
    """nanocode.agent_tasks' generator on seeds other than the shipped suite's (seed 0): n tasks per
    split (train seed 1000 + seed, val 2000 + seed), minus any task whose request and files equal a
    suite task's."""
    key = lambda t: (t["request"], json.dumps(t["files"], sort_keys=True))  # noqa: E731
    suite = {key(t) for t in agent_tasks.load_suite()}
    generated = agent_tasks.make_suite((2000 if split == "val" else 1000) + seed, n)
    return [
        _task(f"agent/{split}/{t['id']}", "agent", t["request"], {"type": "agent", "task": t})
        for t in generated
        if key(t) not in suite
    ]


def corpus_tasks(
    funcs: list[dict], seed: int = 0, cases: int = 6, max_tasks: int = 200, workers: int = 2
) -> list[dict]:
    """Functions ({"src"} as synth_corpus.corpus_functions finds them) -> tests tasks. Each function
    is run (in the sandbox) on `cases` * 4 argument tuples drawn from POOL; the calls that return a
    value that round-trips through repr and comes out the same on a second run become asserts."""
    rng, progs, found = random.Random(seed), [], []
    for f in funcs:
        try:
            node = ast.parse(f["src"]).body[0]
        except (SyntaxError, IndexError):
            continue
        if not isinstance(node, ast.FunctionDef):
            continue
        a = node.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or not 1 <= len(a.args) <= 3:
            continue
        if a.args[0].arg in ("self", "cls"):
            continue
        calls = [tuple(rng.choice(POOL) for _ in a.args) for _ in range(cases * 4)]
        progs.append(
            f"{f['src']}\n\nimport json\nout = []\nfor args in {calls!r}:\n    try:\n"
            f"        r1, r2 = {node.name}(*args), {node.name}(*args)\n"
            "        if r1 == r2 and eval(repr(r1)) == r1:\n"
            "            out.append((repr(args), repr(r1)))\n"
            "    except Exception:\n        pass\nprint(json.dumps(out))\n"
        )
        found.append((f, node))
    tasks = []
    for (f, node), r in zip(found, execution.run_many(progs, workers=workers, timeout=3.0)):
        try:
            # the last line: the function may print too; dict: one assert per distinct arguments
            pairs = list(dict(json.loads(r.stdout.strip().splitlines()[-1])).items())[:cases]
        except (ValueError, IndexError):
            continue
        # a constant function pins nothing
        if not r.passed or len(pairs) < 3 or len({out for _, out in pairs}) < 2:
            continue
        lines, doc = f["src"].splitlines(), ast.get_docstring(node)
        # the def line(s) only: everything above the body's first statement (the docstring, which
        # may be that statement, is added back below when short)
        header = "\n".join(lines[: node.body[0].lineno - node.lineno])
        sig = header + (f'\n    """{doc}"""' if doc and len(doc) < 300 else "")
        tests = "\n".join(f"assert {node.name}(*{args}) == {out}" for args, out in pairs)
        example = tests.splitlines()[0].removeprefix("assert ")
        prompt = f"Write the body of this function in solution.py:\n\n{sig}\n\nExample: {example}"
        check = {"type": "tests", "tests": tests}
        tasks.append(_task(f"corpus/{node.name}/{len(tasks)}", "corpus", prompt, check))
        if len(tasks) >= max_tasks:
            break
    return tasks


def mbpp_tasks(path=None) -> list[dict]:
    """MBPP's train split as tests tasks (its test split stays code_eval's). `path`: a local JSONL
    in the hub's schema; default: the sanitized train split, downloaded (code_tasks.load_mbpp)."""
    tasks = []
    for p in load_mbpp(path, split="train"):
        prompt = f"{p['text']} Write it in solution.py. It should pass:\n{(p['tests'] or [''])[0]}"
        check = {"type": "tests", "tests": p["test"]}
        tasks.append(_task("mbpp/" + p["task_id"].removeprefix("Mbpp/"), "mbpp", prompt, check))
    return tasks


def corpus_functions(split: str) -> list[dict]:
    """Functions of the local corpus: its first shard for train, its last (held-out) one for val."""
    import pyarrow.parquet as pq

    from nanocode.dataset import list_shards

    shards = list_shards()
    if not shards:
        raise NanocodeError("no corpus shards: run `python -m nanocode.dataset --local` first")
    shard = shards[-1] if split == "val" else shards[0]
    docs = pq.read_table(shard, columns=["text", "lang"]).slice(0, 4000).to_pylist()
    return synth_corpus.corpus_functions(docs, limit=600)


def load_tasks(spec: str, split: str = "train", seed: int = 0) -> list[dict]:
    """Tasks of a --tasks spec: comma-separated sources (programs, corpus, agent, mbpp, a .jsonl
    task file)."""
    tasks = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name == "programs":
            tasks += program_tasks(split, seed)
        elif name == "agent":
            tasks += agent_rl_tasks(split, seed)
        elif name == "corpus":
            tasks += corpus_tasks(corpus_functions(split), seed=seed)
        elif name == "mbpp" and split == "val":
            raise NanocodeError(
                "mbpp has train tasks only here (its test split is code_eval's); "
                "hold out with another source"
            )
        elif name == "mbpp":
            tasks += mbpp_tasks()
        elif name.endswith(".jsonl"):
            tasks += load_task_file(name)
        else:
            raise NanocodeError(
                f"unknown task source {name!r}: use programs, corpus, agent, mbpp or a .jsonl file"
            )
    if not tasks:
        raise NanocodeError(f"--tasks {spec!r} gave no {split} tasks")
    return tasks


# -----------------------------------------------------------------------------
# sampling and verification


def agent_task(task: dict) -> dict | None:
    """The nanocode.agent_tasks task behind an agent check, else None."""
    check = task.get("check")
    return check["task"] if check is not None and check["type"] == "agent" else None


def sample(
    engine, tasks, G, seed, max_tokens, temperature, top_k, timeout, per_call=0
) -> list[dict]:
    """G replies per task from the engine's tool loop, each in its own scratch dir with every call
    approved (agent_tasks.chat_in_scratch): the agent's tools, bash in nanocode.sandbox with
    `timeout`. An agent task's reply starts in a dir holding the task's files, under the task's
    denials, and is verified there before the dir goes (result["verdict"]). Row i of the whole
    list samples with seed + i. per_call: tasks per chat_batch call (0: all at once)."""
    per_call, results = per_call or len(tasks), []
    for c in range(0, len(tasks), per_call):
        rows = [t for t in tasks[c : c + per_call] for _ in range(G)]
        prompts = [t["prompt"] for t in rows]
        kw = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed + c * G)
        results += agent_tasks.chat_in_scratch(
            engine, prompts, [agent_task(t) for t in rows], strict=False, tool_timeout=timeout, **kw
        )
    return results


def score(tasks, results, workers: int = 2, timeout: float = 5.0) -> list[tuple[bool, str]]:
    """(passed, status) per (task, sampled reply): agent tasks by the verdict sample() left, the
    others by running the code the reply wrote against the task's check (verify_many)."""
    # The code is taken from the reply's file-tool calls and run afresh in the sandbox: what the
    # model's own runs printed, or what it says about them, counts for nothing.
    codes = [None if agent_task(t) else written_code(r["message"]) for t, r in zip(tasks, results)]
    verdicts = verify_many(tasks, codes, workers=workers, timeout=timeout)
    return [
        r.get("verdict", (False, "not verified")) if agent_task(t) else v
        for t, r, v in zip(tasks, results, verdicts)
    ]


def written_code(message: dict) -> str | None:
    """The code the reply wrote: the final content of the last .py file it wrote (write_file) or
    edited (edit_file), None if none (code_tasks.code_from_calls)."""
    parts = message["content"] if isinstance(message["content"], list) else []
    calls = [p for p in parts if p["type"] == "tool_call"]
    return code_from_calls([c for c in calls if str(c["arguments"].get("path")).endswith(".py")])


def verify_program(task: dict, code: str) -> str:
    """The program that decides whether `code` solves `task` (its exit status, and for stdout
    checks its output, decide)."""
    check = task["check"]
    if check["type"] == "tests":
        # the tests run after the code, in one module: code that exits before them fails (the
        # child counts SystemExit as a failure, and the guard disables os._exit)
        return code + "\n\n" + check["tests"] + "\n"
    return with_argv(code, check.get("argv", []))


def verify_many(tasks, codes, workers: int = 2, timeout: float = 5.0) -> list[tuple[bool, str]]:
    """(passed, status) per (task, code): no code -> "no code written"; any failure in the sandbox
    or of the verifier itself -> False with its reason."""
    out = [(False, "no verifier" if t["check"] is None else "no code written") for t in tasks]
    todo = [
        i
        for i, (t, c) in enumerate(zip(tasks, codes))
        if c is not None and t["check"] and not agent_task(t)
    ]
    try:
        programs = [verify_program(tasks[i], codes[i]) for i in todo]
        results = execution.run_many(programs, workers=workers, timeout=timeout)
    except Exception as e:  # the verifier itself broke: every sample of this batch scores 0
        return [(False, f"verifier crashed: {type(e).__name__}: {e}")] * len(codes)
    for i, r in zip(todo, results):
        check = tasks[i]["check"]
        wrong = check["type"] == "stdout" and r.stdout.strip() != check["expected"].strip()
        out[i] = (False, "wrong output") if r.passed and wrong else (r.passed, r.status)
    return out
