"""Agentic evaluation: every shipped task is solvable and not solved by doing nothing; a scripted
agent that performs the reference solutions through tool calls scores 1.0 and an idle one 0.0;
hostile transcripts are contained; bad suites, verifiers and transcript files give one clear error.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from nanocode import agent_tasks
from nanocode.agent_tasks import (
    HEADLINE,
    KINDS,
    chat_in_scratch,
    load_suite,
    make_suite,
    read_transcripts,
    replay,
    run_tasks,
    summarize,
    verify,
)
from nanocode.common import NanocodeError
from nanocode.engine import Engine
from nanocode.tools import SCRATCH_SHOWN_AS, VENV_SHOWN_AS, run_tool
from tests.helpers import ByteTokenizer, tool_calling_checkpoint
from tests.scripted_model import ScriptedModel, encode_with_specials

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def suite():
    return load_suite()


def reference_message(task):
    return {
        "role": "assistant",
        "content": [{"type": "tool_call", **c} for c in task["solution"]["calls"]]
        + [{"type": "text", "text": task["solution"]["answer"]}],
    }


def test_shipped_suite_is_the_generator_at_seed_0_and_covers_every_kind(suite):
    assert suite == [
        dict(t, verify_files=t.get("verify_files", {}), deny=t.get("deny", []))
        for t in make_suite(0, 28)
    ]
    assert {t["kind"] for t in suite} == set(KINDS)
    assert make_suite(5, 14) == make_suite(5, 14) and make_suite(5, 14) != make_suite(6, 14)


def test_every_reference_solution_passes_and_the_untouched_repo_fails(suite):
    for task in suite:
        ok, out = replay(task, reference_message(task))
        assert ok, f"{task['id']}: reference fails: {out}"
        idle, _ = replay(task, {"role": "assistant", "content": []})
        assert not idle, f"{task['id']}: passes with nothing done"


def script_text(task):
    calls = "".join(
        f"<|tool_start|>{json.dumps({'name': c['name'], 'arguments': c['arguments']})}<|tool_end|>"
        for c in task["solution"]["calls"]
    )
    return calls + task["solution"]["answer"]


def test_scratch_outputs_name_a_fixed_dir(tmp_path):
    """Tool outputs in a scratch dir name SCRATCH_SHOWN_AS, not the dir's random name (a traceback
    prints absolute paths): the same samples give the same transcript, run after run."""
    tok = ByteTokenizer()
    call = {"name": "bash", "arguments": {"command": "pwd; python missing.py"}}
    script = encode_with_specials(tok, f"<|tool_start|>{json.dumps(call)}<|tool_end|>done")

    def transcript():
        model = ScriptedModel([script], tok.vocab_size, 3, 4, sequence_len=4096)
        [result] = chat_in_scratch(Engine(model, tok), ["go"], [None], approve=lambda n, a: True)
        return [p for p in result["message"]["content"] if p["type"] == "tool_output"]

    first = transcript()
    missing = f"python: can't open file '{SCRATCH_SHOWN_AS}/missing.py'"
    assert first[0]["text"].startswith(f"{SCRATCH_SHOWN_AS}\n{missing}")
    assert first == transcript()
    # Python names its own path in some errors: a virtualenv's (wherever the checkout is) is shown
    # as a fixed prefix, so two checkouts of one commit sample the same text
    out = run_tool("bash", {"command": "python -m nope.py"}, tmp_path, shown_as=SCRATCH_SHOWN_AS)
    assert "Error while finding module specification" in out
    if sys.prefix != sys.base_prefix:
        assert sys.prefix not in out and f"{VENV_SHOWN_AS}/bin/python" in out
    task = {"id": "t", "files": {}, "verify": "pwd; false"}  # verifier output is kept in records
    root = agent_tasks.scratch(task)
    try:
        assert verify(task, root, "") == (False, SCRATCH_SHOWN_AS + "\n")
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("agent", ["reference", "idle"])
def test_scripted_agent_scores(suite, agent):
    """The whole path: batched chat (tools really run, denials applied, sandboxed), verifiers."""
    tok = ByteTokenizer()
    # request -> scripts in suite order (tasks can share a request; rows start in suite order)
    scripts = {}
    for t in suite:
        scripts.setdefault(t["request"], []).append(
            encode_with_specials(tok, script_text(t)) if agent == "reference" else []
        )

    def pick(prompt_ids):
        text = tok.decode(prompt_ids)
        return next(s for req, s in scripts.items() if req in text).pop(0)

    model = ScriptedModel([], tok.vocab_size, 3, 4, sequence_len=4096, pick=pick)
    records = run_tasks(Engine(model, tok), suite, batch_size=8)
    stats = summarize(records)
    want = 1.0 if agent == "reference" else 0.0
    assert stats["success"] == want, [
        (r["task"], r["verifier"]) for r in records if r["passed"] != (want == 1.0)
    ]
    assert all(v == want for v in stats["per_kind"].values()) and stats["cut_offs"] == 0
    if agent == "reference":
        assert stats["valid_call_rate"] == 1.0
        assert stats["calls_per_task"] == sum(len(t["solution"]["calls"]) for t in suite) / len(
            suite
        )
        denied = [r for r in records if r["kind"] == "deny"]
        assert all(
            p["text"] == "denied by the user"
            for r in denied
            for p in r["message"]["content"]
            if p["type"] == "tool_output"
        )
    else:
        assert stats["valid_call_rate"] is None and stats["calls_per_task"] == 0


def test_hostile_transcripts_are_contained_and_fail(suite, tmp_path, monkeypatch):
    """Writes outside the scratch dir, a fork bomb, endless output: each replay ends (cut by the
    sandbox's limits), fails, and leaves nothing outside."""
    monkeypatch.setattr(agent_tasks, "TOOL_TIMEOUT", 3.0)
    task = next(t for t in suite if t["kind"] == "fix")
    outside = tmp_path / "outside.txt"
    hostile = {
        "write outside": [
            ("write_file", {"path": str(outside), "content": "x"}),
            ("write_file", {"path": "../../outside.txt", "content": "x"}),
            ("bash", {"command": f"echo x > {outside}; echo x > ../escaped.txt"}),
        ],
        "fork bomb": [("bash", {"command": "bomb() { bomb | bomb & }; bomb"})],
        "endless output": [("bash", {"command": "yes flood"})],
    }
    for what, calls in hostile.items():
        msg = {
            "role": "assistant",
            "content": [{"type": "tool_call", "name": n, "arguments": a} for n, a in calls],
        }
        ok, _ = replay(task, msg)
        assert not ok, what
    assert not outside.exists() and not Path(tempfile.gettempdir(), "escaped.txt").exists()


def test_bad_suite_verifier_and_transcripts_are_clear_errors(suite, tmp_path):
    bad = tmp_path / "suite.jsonl"
    rec = dict(suite[0])
    del rec["verify"]
    bad.write_text(json.dumps(suite[1]) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(
        NanocodeError,
        match=rf"suite.jsonl line 2 \(task '{rec['id']}'\): missing field\(s\) verify",
    ):
        load_suite(bad)
    with pytest.raises(NanocodeError, match="agent suite file not found"):
        load_suite(tmp_path / "nope.jsonl")

    broken = dict(suite[0], verify="no-such-verifier-command --check")
    root = agent_tasks.scratch(broken)
    try:
        with pytest.raises(NanocodeError, match=f"task {broken['id']}: the verifier cannot run"):
            verify(broken, root, "")
    finally:
        shutil.rmtree(root)  # scratch() dirs are the caller's to remove

    by_id = {t["id"]: t for t in suite}
    lines = [
        json.dumps({"task": suite[0]["id"], "message": reference_message(suite[0])}),
        "{not json",
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(NanocodeError, match=r"t.jsonl line 2: not valid JSON"):
        read_transcripts(path, by_id)
    for rec in ([suite[0]["id"]], suite[0]["id"], {"task": [1]}):  # crashed with a TypeError
        path.write_text(json.dumps(rec) + "\n")
        with pytest.raises(NanocodeError, match=r"t.jsonl line 1: (a transcript|'task' must)"):
            read_transcripts(path, by_id)
    path.write_text(json.dumps({"task": "no-such-task", "message": {"content": []}}) + "\n")
    with pytest.raises(NanocodeError, match=r"t.jsonl line 1: 'task' must name a task"):
        read_transcripts(path, by_id)
    path.write_text(
        json.dumps({"task": suite[0]["id"], "message": {"content": [{"type": "tool_call"}]}}) + "\n"
    )
    with pytest.raises(NanocodeError, match=r"t.jsonl line 1: 'message' must be"):
        read_transcripts(path, by_id)


def test_script_rescores_transcripts(suite, tmp_path):
    """python -m scripts.agent_eval --samples: the reference transcripts of a few tasks score 1.0
    (printed last, per kind, transcripts written); a malformed file is one line of error, exit 1."""
    tasks = suite[:7]
    samples = tmp_path / "ref.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"task": t["id"], "message": reference_message(t)}) + "\n" for t in tasks
        )
    )
    env_args = [
        sys.executable,
        "-m",
        "scripts.agent_eval",
        "--num-tasks",
        "7",
        "--out",
        str(tmp_path / "res"),
    ]
    p = subprocess.run(
        env_args + ["--samples", str(samples)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "success: 1.0000"
    rows = [json.loads(line) for line in open(tmp_path / "res_transcripts.jsonl")]
    assert [r["task"] for r in rows] == [t["id"] for t in tasks] and all(r["passed"] for r in rows)
    samples.write_text("oops\n")
    p = subprocess.run(
        env_args + ["--samples", str(samples)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        p.returncode == 1
        and "ref.jsonl line 1: not valid JSON" in p.stderr
        and "Traceback" not in p.stderr
    )


def test_script_with_a_checkpoint_constrained_or_not(tmp_path):
    """python -m scripts.agent_eval -i sft on a tiny trained checkpoint, with and without
    --constrained: both print the valid-call rate and success; under the grammar every call the
    model attempts is valid (and it attempts some), logged as its own stage."""
    from nanocode.common import get_base_dir

    argv = [sys.executable, "-m", "scripts.agent_eval", "-i", "sft", "--device-type", "cpu"]
    argv += ["--tag", tool_calling_checkpoint(), "--num-tasks", "6", "--max-tokens", "64"]
    for flags, stage in (([], "agent_eval_sft"), (["--constrained"], "agent_eval_sft_constrained")):
        out = tmp_path / stage
        p = subprocess.run(
            argv + flags + ["--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[-1].startswith("success: ") and lines[-2].startswith("valid-call rate: ")
        assert (get_base_dir() / "report" / f"{stage}.json").exists()
    records = [json.loads(line) for line in open(f"{out}_transcripts.jsonl")]
    assert all(r["call_attempts"] == r["tool_calls"] for r in records)
    assert sum(r["tool_calls"] for r in records) > 0 and lines[-2].startswith("valid-call rate: 1")


def test_report_shows_success_per_kind_for_each_checkpoint(tmp_path, monkeypatch):
    from nanocode.report import build_report, log_stage

    monkeypatch.setenv("NANOCODE_BASE_DIR", str(tmp_path))

    def rec(kind, passed, finish="stop"):
        return {
            "kind": kind,
            "passed": passed,
            "finish_reason": finish,
            "tool_calls": 1,
            "call_attempts": 2,
            "usage": {"completion_tokens": 10},
        }

    sft = summarize([rec("fix", False), rec("fix", True), rec("answer", False, "length")])
    dpo = summarize([rec("fix", True), rec("fix", True), rec("answer", True)])
    assert (
        sft["per_kind"] == {"answer": 0.0, "fix": 0.5}
        and sft["valid_call_rate"] == 0.5
        and sft["cut_offs"] == 1
    )
    log_stage("agent_eval_sft", HEADLINE, **sft)
    log_stage("agent_eval_dpo", HEADLINE, **dpo)
    text = build_report().read_text()
    assert "## Agent eval: task success per kind" in text and "| kind | sft | dpo |" in text
    assert (
        "| fix | 0.5 | 1 |" in text
        and "| answer | 0.0 | 1 |" in text
        and "| overall | 0.333 | 1 |" in text
    )
    assert "| Agent eval (SFT) | done | success 0.3333, tasks 3, valid call rate 0.5" in text
    assert (
        "![agent eval](agent_eval_success.png)" in text
        and (tmp_path / "report" / "agent_eval_success.png").stat().st_size > 1000
    )


@pytest.mark.slow  # two torchrun launches: ~35 s on 2 shared cores
def test_torchrun_sharding_equals_one_process(suite, tmp_path):
    """Tasks sharded over 2 gloo ranks and gathered: the same per-task results, in suite order."""
    from tests.helpers import torchrun

    tasks = suite[:7]
    samples = tmp_path / "mixed.jsonl"
    samples.write_text(
        "".join(
            json.dumps(
                {
                    "task": t["id"],
                    "message": reference_message(t)
                    if i % 2 == 0
                    else {"role": "assistant", "content": "I did it."},
                }
            )
            + "\n"
            for i, t in enumerate(tasks)
        )
    )
    got = {}
    for nproc in (1, 2):
        out = tmp_path / f"res{nproc}"
        torchrun(
            [
                "-m",
                "scripts.agent_eval",
                "--samples",
                str(samples),
                "--num-tasks",
                "7",
                "--out",
                str(out),
            ],
            tmp_path,
            nproc=nproc,
        )
        got[nproc] = [
            (r["task"], r["passed"]) for r in map(json.loads, open(f"{out}_transcripts.jsonl"))
        ]
    assert got[1] == got[2] == [(t["id"], i % 2 == 0) for i, t in enumerate(tasks)]
