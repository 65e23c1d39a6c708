"""Tasks for reinforcement learning, each with an exact verifier, and the verifier itself.

A task (one JSON object per line in a task file):
    {"id": str, "source": str, "prompt": str,                 # the user's message
     "check": {"type": "tests", "tests": str}                 # python asserts run after the written code
            | {"type": "stdout", "expected": str,             # what running the written code must print
               "argv": [str, ...]}                            #   (optional: its command-line arguments)
            | {"type": "agent", "task": {...}}}               # a nanocode.agent_tasks task: its files, its verifier
For tests and stdout checks the model answers as the agent does: it writes the code with a write_file call
(the last .py file it writes is the answer); running, reading or explaining along the way is up to it. An
agent check starts the reply in a scratch dir holding the task's files and runs the task's own verifier
on that dir afterwards (nanocode.agent_tasks.verify).

Sources:
- "programs": the small-program requests of nanocode.synth's write-and-run kind, drawn fresh (not read
  from the SFT files) and split by a hash of the request, so a held-out request is never a train one:
  the request, and what the reference program prints. The SFT data has the same kind (and, the request
  space being small, many of the same requests): a task set a small model can partly solve.
- "corpus": short functions from the local corpus, their behaviour pinned by tests made by running the
  original on varied inputs (only functions that return the same value twice and whose outputs vary
  are kept); the model sees the signature and docstring and writes the function.
- "agent": nanocode.agent_tasks' generator (fix, implement, rename, ... in a scratch repository) on seeds
  other than the shipped evaluation suite's, minus any task equal to one of the suite's.
- "mbpp": MBPP's train split (its test split stays an evaluation); a local file in the hub's schema works.
- a path to a .jsonl file: tasks in the format above, or problems in HumanEval's schema (task_id, prompt,
  test, entry_point), e.g. HumanEval-style training sets; HumanEval itself is refused (it stays code_eval's).
Verification runs the code in nanocode.execution's sandbox; anything but a clean pass (an error, a crash
of the verifier, a timeout, a fork) is reward 0 with the reason kept.
"""

import ast
import json
import random
import shlex
import zlib
from pathlib import Path

from nanocode.common import NanocodeError, read_jsonl

CHECK_TYPES = ("tests", "stdout", "agent")


def validate_task(t, where: str) -> dict:
    """A task as loaded; a missing or null check is a task without a verifier (it will score 0, counted)."""
    if (
        not isinstance(t, dict)
        or not isinstance(t.get("prompt"), str)
        or not isinstance(t.get("check"), (dict, type(None)))
    ):
        raise NanocodeError(
            f"{where}: expected a task object with a string 'prompt' and a 'check' object"
        )
    c = t.get("check")
    if c is None:
        return {
            "id": str(t.get("id", where)),
            "source": str(t.get("source", "file")),
            "prompt": t["prompt"],
            "check": None,
        }
    if c.get("type") not in CHECK_TYPES:
        raise NanocodeError(
            f"{where}: check type must be one of {CHECK_TYPES}, got {c.get('type')!r}"
        )
    key = {"tests": "tests", "stdout": "expected", "agent": "task"}[c["type"]]
    if not isinstance(c.get(key), dict if key == "task" else str):
        raise NanocodeError(
            f"{where}: a {c['type']} check needs {'an object' if key == 'task' else 'a string'} {key!r}"
        )
    if "argv" in c and not (
        isinstance(c["argv"], list) and all(isinstance(a, str) for a in c["argv"])
    ):
        raise NanocodeError(f"{where}: a check's 'argv' must be a list of strings")
    return {
        "id": str(t.get("id", where)),
        "source": str(t.get("source", "file")),
        "prompt": t["prompt"],
        "check": c,
    }


def humaneval_style_task(r: dict, where: str) -> dict:
    """A problem in HumanEval's schema as a tests task: the model writes the function of `prompt` (its
    signature and docstring), and `test` (which defines check(candidate)) calls it."""
    if not all(isinstance(r.get(k), str) for k in ("task_id", "prompt", "test", "entry_point")):
        raise NanocodeError(
            f"{where}: a HumanEval-style problem needs strings task_id, prompt, test, entry_point"
        )
    if r["task_id"].startswith("HumanEval/"):
        raise NanocodeError(
            f"{where}: {r['task_id']} is HumanEval itself, which stays held out for code_eval"
        )
    return {
        "id": r["task_id"],
        "source": "humaneval_style",
        "prompt": f"Write this function in solution.py:\n\n{r['prompt'].strip()}\n",
        "check": {"type": "tests", "tests": f"{r['test']}\n\ncheck({r['entry_point']})"},
    }


def load_task_file(path) -> list[dict]:
    """Tasks of a .jsonl file: our task format, or problems in HumanEval's schema (told apart per line)."""
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
    return (zlib.crc32(text.encode()) % 4 == 0) == (split == "val")


def program_tasks(
    split: str = "train", seed: int = 0, draws: int = 1000, workers: int = 2
) -> list[dict]:
    """stdout tasks from nanocode.synth's small-program requests (the write-and-run kind): `draws` requests
    drawn with `seed`, the distinct ones of this split, each with what its reference program prints (run
    in the sandbox twice, with the request's arguments; one that fails, prints nothing, or prints
    something else the second time makes no task)."""
    from nanocode import synth
    from nanocode.execution import run_many

    rng, cands = random.Random(seed), {}
    for _ in range(draws):
        request, _, code, argv = synth.program_request(rng)
        if request not in cands and in_split(request, split):
            cands[request] = (code, shlex.split(argv))
    progs = [with_argv(code, argv) for code, argv in cands.values()]
    results = run_many(progs * 2, workers=workers, timeout=5.0)
    tasks = []
    for (request, (_, argv)), r, again in zip(cands.items(), results, results[len(progs) :]):
        if r.passed and again.passed and r.stdout.strip() and r.stdout == again.stdout:
            check = {"type": "stdout", "expected": r.stdout, **({"argv": argv} if argv else {})}
            tasks.append(
                {
                    "id": f"programs/{zlib.crc32(request.encode()):08x}",
                    "source": "programs",
                    "prompt": request,
                    "check": check,
                }
            )
    return tasks


def with_argv(code: str, argv: list[str]) -> str:
    """The program as run with these command-line arguments."""
    return code if not argv else f"import sys\nsys.argv = {['main.py'] + list(argv)!r}\n" + code


def agent_rl_tasks(split: str = "train", seed: int = 0, n: int = 200) -> list[dict]:
    """nanocode.agent_tasks' generator on seeds other than the shipped suite's (seed 0): n tasks per split
    (train seed 1000 + seed, val 2000 + seed), minus any task whose request and files equal a suite task's."""
    from nanocode import agent_tasks

    suite = {
        (t["request"], json.dumps(t["files"], sort_keys=True)) for t in agent_tasks.load_suite()
    }
    out = []
    for t in agent_tasks.make_suite((2000 if split == "val" else 1000) + seed, n):
        if (t["request"], json.dumps(t["files"], sort_keys=True)) not in suite:
            t.setdefault("verify_files", {})
            t.setdefault("deny", [])
            out.append(
                {
                    "id": f"agent/{split}/{t['id']}",
                    "source": "agent",
                    "prompt": t["request"],
                    "check": {"type": "agent", "task": t},
                }
            )
    return out


# Argument pools for pinning a function's behaviour: a mix of the types small corpus functions take.
POOL = [
    0,
    1,
    2,
    3,
    7,
    -4,
    10,
    2.5,
    "",
    "a",
    "hello",
    "a,b,c",
    "Hello World",
    [],
    [1, 2, 3],
    [3, 1, 2],
    ["x", "y"],
    (1, 2),
    {"a": 1},
    None,
    True,
    False,
]


def corpus_tasks(
    funcs: list[dict], seed: int = 0, cases: int = 6, max_tasks: int = 200, workers: int = 2
) -> list[dict]:
    """Functions ({"src"} as synth.corpus_functions finds them) -> tests tasks. Each function is run (in the
    sandbox) on `cases` * 4 argument tuples drawn from POOL; the calls that return a value that
    round-trips through repr and comes out the same on a second run become asserts."""
    from nanocode.execution import run_many

    rng = random.Random(seed)
    progs, metas = [], []
    for f in funcs:
        try:
            node = ast.parse(f["src"]).body[0]
        except (SyntaxError, IndexError):
            continue
        a = node.args
        if (
            not isinstance(node, ast.FunctionDef)
            or a.vararg
            or a.kwarg
            or a.kwonlyargs
            or a.posonlyargs
        ):
            continue
        n = len(a.args)
        if not 1 <= n <= 3 or a.args[0].arg in ("self", "cls"):
            continue
        calls = [tuple(rng.choice(POOL) for _ in range(n)) for _ in range(cases * 4)]
        prog = (
            f["src"] + "\n\nimport json\nout = []\nfor args in " + repr(calls) + ":\n"
            "    try:\n        r1, r2 = " + node.name + "(*args), " + node.name + "(*args)\n"
            "        if r1 == r2 and eval(repr(r1)) == r1:\n            out.append((repr(args), repr(r1)))\n"
            "    except Exception:\n        pass\nprint(json.dumps(out))\n"
        )
        progs.append(prog)
        metas.append((f, node))
    tasks = []
    for (f, node), r in zip(metas, run_many(progs, workers=workers, timeout=3.0)):
        if not r.passed:
            continue
        try:
            pairs = list(dict(json.loads(r.stdout.strip().splitlines()[-1])).items())[:cases]
        except (ValueError, IndexError):
            continue
        if len(pairs) < 3 or len({out for _, out in pairs}) < 2:  # a constant function pins nothing
            continue
        lines = f["src"].splitlines()
        doc = ast.get_docstring(node)
        header = "\n".join(lines[: node.body[0].lineno - node.lineno]) if node.body else lines[0]
        sig = header + (f'\n    """{doc}"""' if doc and len(doc) < 300 else "")
        tests = "\n".join(f"assert {node.name}(*{args}) == {out}" for args, out in pairs)
        tasks.append(
            {
                "id": f"corpus/{node.name}/{len(tasks)}",
                "source": "corpus",
                "prompt": f"Write the body of this function in solution.py:\n\n{sig}\n\nExample: "
                f"{tests.splitlines()[0][7:]}",
                "check": {"type": "tests", "tests": tests},
            }
        )
        if len(tasks) >= max_tasks:
            break
    return tasks


def mbpp_tasks(path=None) -> list[dict]:
    """MBPP's train split as tests tasks. `path`: a local JSONL in the hub's schema (task_id, prompt, code,
    test_imports, test_list); default: the sanitized train split, downloaded (nanocode.hub)."""
    if path is None:
        import pyarrow.parquet as pq

        from nanocode.hub import hub_file

        rows = pq.read_table(
            hub_file(
                "google-research-datasets/mbpp",
                "sanitized/train-00000-of-00001.parquet",
                hint="use --tasks programs or corpus offline",
            )
        ).to_pylist()
    else:
        rows = []
        for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise NanocodeError(f"{path} line {i}: not valid JSON ({e.msg})") from None
    tasks = []
    for i, r in enumerate(rows):
        try:
            text, tests, imports = (
                r["prompt"],
                list(r["test_list"]),
                list(r.get("test_imports") or []),
            )
        except (KeyError, TypeError) as e:
            raise NanocodeError(
                f"MBPP row {i + 1}: not in MBPP's schema ({type(e).__name__}: {e})"
            ) from None
        tasks.append(
            {
                "id": f"mbpp/{r.get('task_id', i)}",
                "source": "mbpp",
                "prompt": f"{text} Write it in solution.py. It should pass:\n{tests[0] if tests else ''}",
                "check": {"type": "tests", "tests": "\n".join(imports + tests)},
            }
        )
    return tasks


def load_tasks(spec: str, split: str = "train", seed: int = 0) -> list[dict]:
    """Tasks of a --tasks spec: comma-separated sources (programs, corpus, agent, mbpp, a .jsonl task file)."""
    tasks = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name == "programs":
            tasks += program_tasks(split, seed)
        elif name == "agent":
            tasks += agent_rl_tasks(split, seed)
        elif name == "corpus":
            import pyarrow.parquet as pq

            from nanocode import synth
            from nanocode.dataset import list_shards

            shards = list_shards()
            if not shards:
                raise NanocodeError(
                    "no corpus shards: run `python -m nanocode.dataset --local` first"
                )
            shard = (
                shards[-1] if split == "val" else shards[0]
            )  # the corpus' own held-out shard for val
            docs = pq.read_table(shard, columns=["text", "lang"]).slice(0, 4000).to_pylist()
            tasks += corpus_tasks(synth.corpus_functions(docs, limit=600), seed=seed)
        elif name == "mbpp":
            if split == "val":
                raise NanocodeError(
                    "mbpp has train tasks only here (its test split is code_eval's); "
                    "hold out with another source"
                )
            tasks += mbpp_tasks()
        elif name.endswith(".jsonl"):
            tasks += load_task_file(name)
        else:
            raise NanocodeError(
                f"unknown task source {name!r}: use programs, corpus, agent, mbpp or a .jsonl task file"
            )
    if not tasks:
        raise NanocodeError(f"--tasks {spec!r} gave no {split} tasks")
    return tasks


# -----------------------------------------------------------------------------
# sampling and verification


def sample(
    engine,
    tasks: list[dict],
    G: int,
    seed: int,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    timeout: float,
    per_call: int = 0,
) -> list[dict]:
    """G replies per task from the engine's tool loop (Engine.chat_batch), each in its own scratch dir with
    every call approved: the agent's tools, bash in nanocode.sandbox with `timeout`. An agent task's reply
    starts in a dir holding the task's files, under the task's denials, and is verified there before the
    dir goes (result["verdict"]: (passed, verifier output)). Row i of the whole list samples with seed + i.
    per_call: tasks per chat_batch call (0: all at once)."""
    import shutil
    import tempfile

    from nanocode import agent_tasks
    from nanocode.engine import message_text
    from nanocode.tools import run_tool

    runner = lambda name, arguments, workdir: run_tool(name, arguments, workdir, timeout=timeout)
    per_call = per_call or len(tasks)
    results = []
    for c in range(0, len(tasks), per_call):
        rows = [t for t in tasks[c : c + per_call] for _ in range(G)]
        agent = [agent_task(t) for t in rows]
        convs = [{"messages": [{"role": "user", "content": t["prompt"]}]} for t in rows]
        dirs = [
            agent_tasks.scratch(a) if a else Path(tempfile.mkdtemp(prefix="nanocode-rl-"))
            for a in agent
        ]
        approve = [agent_tasks.approver(a) if a else (lambda name, arguments: True) for a in agent]
        try:
            out = engine.chat_batch(
                convs,
                approve=approve,
                workdirs=dirs,
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k,
                seed=seed + c * G,
                tool_runner=runner,
            )
            for r, a, d in zip(out, agent, dirs):
                if a:
                    try:
                        r["verdict"] = agent_tasks.verify(a, d, message_text(r["message"]))
                    except (
                        Exception
                    ) as e:  # a verifier that cannot run: reward 0, counted, training goes on
                        r["verdict"] = (False, f"verifier crashed: {type(e).__name__}: {e}")
            results += out
        finally:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
    return results


def agent_task(task: dict) -> dict | None:
    """The nanocode.agent_tasks task behind an agent check, else None."""
    check = task.get("check")
    return check["task"] if check is not None and check["type"] == "agent" else None


def score(
    tasks: list[dict], results: list[dict], workers: int = 2, timeout: float = 5.0
) -> list[tuple[bool, str]]:
    """(passed, status) per (task, sampled reply): agent tasks by the verdict sample() left, the others by
    running the code the reply wrote against the task's check (verify_many)."""
    codes = [None if agent_task(t) else written_code(r["message"]) for t, r in zip(tasks, results)]
    out = verify_many(tasks, codes, workers=workers, timeout=timeout)
    return [
        r.get("verdict", (False, "not verified")) if agent_task(t) else v
        for t, r, v in zip(tasks, results, out)
    ]


def written_code(message: dict) -> str | None:
    """The content of the last .py file the assistant message wrote with write_file (None if none)."""
    content = message["content"]
    code = None
    for part in content if isinstance(content, list) else []:
        if (
            part["type"] == "tool_call"
            and part["name"] == "write_file"
            and str(part["arguments"].get("path", "")).endswith(".py")
        ):
            code = part["arguments"].get("content")
    return code if isinstance(code, str) else None


def call_counts(message: dict) -> tuple[int, int]:
    """(valid tool calls, malformed ones) in an engine-written assistant message: the engine keeps a
    malformed call as a text part followed by the error it fed back."""
    parts = message["content"] if isinstance(message["content"], list) else []
    valid = sum(p["type"] == "tool_call" for p in parts)
    malformed = sum(
        p["type"] == "tool_output" and i > 0 and parts[i - 1]["type"] == "text"
        for i, p in enumerate(parts)
    )
    return valid, malformed


def verify_program(task: dict, code: str | None) -> str:
    """The program that decides whether `code` solves `task` (its exit status, and for stdout checks
    its output, decide)."""
    check = task["check"]
    if check["type"] == "tests":
        return code + "\n\n" + check["tests"] + "\n"
    return with_argv(code, check.get("argv", []))


def verify_many(
    tasks: list[dict], codes: list, workers: int = 2, timeout: float = 5.0
) -> list[tuple[bool, str]]:
    """(passed, status) per (task, code): no code -> "no code written"; any failure in the sandbox or of
    the verifier itself -> False with its reason."""
    from nanocode.execution import run_many

    todo = [
        i
        for i, c in enumerate(codes)
        if c is not None and tasks[i]["check"] is not None and not agent_task(tasks[i])
    ]
    out = [(False, "no verifier" if t["check"] is None else "no code written") for t in tasks]
    try:
        results = run_many(
            [verify_program(tasks[i], codes[i]) for i in todo], workers=workers, timeout=timeout
        )
    except (
        Exception
    ) as e:  # the verifier itself broke: every sample of this batch scores 0, training goes on
        return [(False, f"verifier crashed: {type(e).__name__}: {e}")] * len(codes)
    for i, r in zip(todo, results):
        check = tasks[i]["check"]
        if check["type"] == "stdout" and r.passed and r.stdout.strip() != check["expected"].strip():
            out[i] = (False, "wrong output")
        else:
            out[i] = (r.passed, r.status)
    return out
