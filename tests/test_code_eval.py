"""HumanEval / MBPP scoring: the canonical solutions pass, empty completions fail, bad samples files
give clear errors, pass@k matches its definition, and the base/chat generation paths produce
runnable code."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanocode.code_tasks import (
    HUMANEVAL_STOP,
    chat_completion,
    extract_code,
    load_humaneval,
    load_mbpp,
    pass_at_k,
    truncate_at_stop,
)
from nanocode.common import NanocodeError
from scripts.code_eval import generate, parse_ks, read_samples, score, summarize
from tests.helpers import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
MBPP_FIXTURE = ROOT / "tests" / "fixtures" / "mbpp_sample.jsonl"


@pytest.fixture(scope="module")
def humaneval():
    return load_humaneval()


def write_samples(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_script(*args):
    """python -m scripts.code_eval ... in a subprocess; returns (returncode, stdout, stderr)."""
    p = subprocess.run(
        [sys.executable, "-m", "scripts.code_eval", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return p.returncode, p.stdout, p.stderr


def test_humaneval_loads(humaneval):
    assert len(humaneval) == 164
    assert len({p["task_id"] for p in humaneval}) == 164
    assert all(p["test"].rstrip().endswith(")") and "check(" in p["test"] for p in humaneval)


def test_canonical_solutions_score_one(humaneval, tmp_path):
    """The whole script on the 164 canonical solutions: pass@1 = 1.0 printed last, files written."""
    samples = write_samples(
        tmp_path / "canon.jsonl",
        [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in humaneval],
    )
    t0 = time.time()
    rc, out, err = run_script("--samples", samples, "--out", tmp_path / "res")
    print(f"164 canonical solutions scored in {time.time() - t0:.1f}s (whole script)")
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == "pass@1: 1.0000"
    rows = [json.loads(line) for line in open(tmp_path / "res_samples.jsonl")]
    assert len(rows) == 164 and all(r["passed"] and r["result"] == "passed" for r in rows)
    assert [r["task_id"] for r in rows] == [p["task_id"] for p in humaneval]
    problems = [json.loads(line) for line in open(tmp_path / "res_problems.jsonl")]
    assert all(p["n"] == 1 and p["correct"] == 1 and p["pass@1"] == 1.0 for p in problems)
    report = json.loads(
        (Path(os.environ["NANOCODE_BASE_DIR"]) / "report" / "code_eval_samples.json").read_text()
    )
    assert report["humaneval"]["pass@1"] == 1.0


def test_empty_completions_score_zero(humaneval):
    by_task = {p["task_id"]: [""] for p in humaneval}
    records = score(humaneval, by_task, workers=2, timeout=5.0)
    _, means = summarize(humaneval, records, [1])
    assert means[1] == 0.0
    assert all(r["result"].startswith("failed") for r in records)


def test_mbpp_fixture_through_script(tmp_path):
    problems = load_mbpp(MBPP_FIXTURE)
    assert [p["task_id"] for p in problems] == ["Mbpp/2", "Mbpp/3", "Mbpp/4", "Mbpp/17", "Mbpp/18"]
    # two samples per problem: the reference code (passes) and a wrong one (fails):
    # pass@1 = 0.5, pass@2 = 1
    recs = [
        {"task_id": p["task_id"], "completion": c}
        for p in problems
        for c in (p["canonical_solution"], "def nothing():\n    return None\n")
    ]
    samples = write_samples(tmp_path / "mbpp.jsonl", recs)
    rc, out, err = run_script(
        "--samples",
        samples,
        "-a",
        "mbpp",
        "--mbpp-file",
        MBPP_FIXTURE,
        "-k",
        "1,2",
        "--out",
        tmp_path / "mbpp_res",
    )
    assert rc == 0, err
    assert out.strip().splitlines()[-2:] == ["pass@2: 1.0000", "pass@1: 0.5000"]


def test_unknown_task_id_is_a_clear_error(humaneval, tmp_path):
    recs = [{"task_id": p["task_id"], "completion": ""} for p in humaneval[:3]] + [
        {"task_id": "HumanEval/999", "completion": ""}
    ]
    samples = write_samples(tmp_path / "bad.jsonl", recs)
    rc, out, err = run_script("--samples", samples, "--max-problems", 3)
    assert rc == 1
    want = "unknown task_id 'HumanEval/999' (not one of this task's problems)"
    assert err.strip() == f"error: {samples} line 4: {want}"


def test_missing_task_ids_are_a_clear_error(humaneval, tmp_path):
    all_ids = {p["task_id"] for p in humaneval}
    samples = write_samples(tmp_path / "some.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    with pytest.raises(
        NanocodeError,
        match=r"no samples for 163 of the 164 problems \(missing task_id: HumanEval/1, ",
    ):
        read_samples(samples, humaneval, all_ids)
    assert list(read_samples(samples, humaneval[:1], all_ids)) == [
        "HumanEval/0"
    ]  # --max-problems 1 is fine
    no_id = write_samples(tmp_path / "noid.jsonl", [{"completion": "pass"}])
    with pytest.raises(NanocodeError, match=r"noid.jsonl line 1: record has no task_id"):
        read_samples(no_id, humaneval[:1], all_ids)
    no_completion = write_samples(tmp_path / "nocomp.jsonl", [{"task_id": "HumanEval/0"}])
    with pytest.raises(NanocodeError, match=r"record for HumanEval/0 has no string 'completion'"):
        read_samples(no_completion, humaneval[:1], all_ids)
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(NanocodeError, match=r"junk.jsonl line 1: not valid JSON"):
        read_samples(tmp_path / "junk.jsonl", humaneval[:1], all_ids)
    with pytest.raises(NanocodeError, match="samples file not found"):
        read_samples(tmp_path / "nope.jsonl", humaneval[:1], all_ids)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_pass_at_k_matches_definition(n):
    """pass@k = P(at least one of k samples drawn without replacement from n passes) = 1 -
    C(n-c,k)/C(n,k)."""
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(
                1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12
            )
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, 1) == 1.0
    with pytest.raises(ValueError, match="needs at least"):
        pass_at_k(n, 0, n + 1)


def test_summary_skips_k_beyond_samples(humaneval):
    recs = [{"task_id": "HumanEval/0", "passed": p} for p in (True, False, False)]
    rows, means = summarize(humaneval[:1], recs, parse_ks("10,2"))
    assert means == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 10: None}
    assert rows == [
        {
            "task_id": "HumanEval/0",
            "n": 3,
            "correct": 1,
            "pass@1": pytest.approx(1 / 3),
            "pass@2": pytest.approx(2 / 3),
        }
    ]
    with pytest.raises(NanocodeError, match="-k must be"):
        parse_ks("1,ten")


def test_stop_sequences_and_code_extraction(humaneval):
    body = "    return 1\n"
    assert truncate_at_stop(body + "\ndef other():\n    pass\n", HUMANEVAL_STOP) == body
    assert truncate_at_stop(body + "\nprint(f())", HUMANEVAL_STOP) == body
    assert truncate_at_stop(body, HUMANEVAL_STOP) == body
    assert extract_code("Sure:\n```python\nx = 1\n```\nand ```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\nx = 1\n") == "x = 1\n"  # unclosed block runs to the end
    assert extract_code("x = 1") == "x = 1"
    p = humaneval[0]
    full = (
        "```python\nfrom typing import List\n\ndef has_close_elements(numbers, threshold):\n"
        + p["canonical_solution"]
        + "```"
    )
    only_body = "```python\n" + p["canonical_solution"] + "```"
    for reply in (full, only_body):
        records = score([p], {p["task_id"]: [chat_completion(p, reply)]}, workers=1, timeout=5.0)
        assert records[0]["passed"], records[0]["result"]


def reply_for(tok, problems, replies):
    """ScriptedModel's pick: the reply of the problem whose instruction is in the prompt (every
    sample of it)."""

    def pick(prompt_ids):
        text = tok.decode(prompt_ids)
        reply = next(r for p, r in zip(problems, replies) if p["instruction"] in text)
        return tok.encode(reply) if isinstance(reply, str) else reply

    return pick


def test_chat_generation_path(humaneval):
    """A scripted chat model answers with the canonical function inside prose and a code fence:
    the engine samples it, the code is extracted, and it passes."""
    from nanocode.engine import Engine
    from tests.scripted_model import ScriptedModel

    tok, problems = ByteTokenizer(), humaneval[:3]
    replies = [
        f"Here you go:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."
        for p in problems
    ]
    model = ScriptedModel(
        [], tok.vocab_size, 3, 4, sequence_len=4096, pick=reply_for(tok, problems, replies)
    )
    by_task = generate(Engine(model, tok), problems, "humaneval", "chat", 2, 2000, 0.0, None, 0)
    assert all(len(v) == 2 for v in by_task.values())
    records = score(problems, by_task, workers=2, timeout=5.0)
    assert [r["passed"] for r in records] == [True] * 6, [r["result"] for r in records]


def test_chat_generation_reads_tool_calls(humaneval):
    """A chat model that writes its answer with write_file (as the SFT data teaches) or fixes it
    with edit_file is scored on the code of those calls, not on the call's JSON."""
    from nanocode.engine import Engine
    from tests.scripted_model import ScriptedModel, encode_with_specials

    tok, problems = ByteTokenizer(), humaneval[:2]

    def call(name, **arguments):
        return (
            "<|tool_start|>" + json.dumps({"name": name, "arguments": arguments}) + "<|tool_end|>"
        )

    p0, p1 = problems
    replies = [
        call("write_file", path="sol.py", content=p0["prompt"] + p0["canonical_solution"])
        + "Written.",
        call("write_file", path="sol.py", content=p1["prompt"] + "    return None  # TODO\n")
        + call(
            "edit_file",
            path="sol.py",
            old_string="    return None  # TODO\n",
            new_string=p1["canonical_solution"],
        )
        + "Fixed.",
    ]
    model = ScriptedModel(
        [],
        tok.vocab_size,
        3,
        4,
        sequence_len=8192,
        pick=reply_for(tok, problems, [encode_with_specials(tok, r) for r in replies]),
    )
    by_task = generate(Engine(model, tok), problems, "humaneval", "chat", 1, 3000, 0.0, None, 0)
    records = score(problems, by_task, workers=2, timeout=5.0)
    assert [r["passed"] for r in records] == [True, True], [r["result"] for r in records]


@pytest.mark.parametrize("agentic", [False, True])
def test_agentic_mode_lets_the_model_run_its_code(humaneval, agentic):
    """By default only the file tools are approved; --agentic lets bash run the written code (in the
    sandbox)."""
    from nanocode.engine import DENIED, Engine
    from scripts.code_eval import chat_replies
    from tests.scripted_model import ScriptedModel, encode_with_specials

    tok, p = ByteTokenizer(), humaneval[0]
    calls = [
        {"name": "write_file", "arguments": {"path": "s.py", "content": "print(6 * 7)\n"}},
        {"name": "bash", "arguments": {"command": "python s.py"}},
    ]
    text = "".join(f"<|tool_start|>{json.dumps(c)}<|tool_end|>" for c in calls) + "ok"
    model = ScriptedModel(
        [encode_with_specials(tok, text)], tok.vocab_size, 3, 4, sequence_len=4096
    )
    parts = chat_replies(Engine(model, tok), p, 1, 500, 0.0, None, 0, agentic)[0]
    outputs = [x["text"] for x in parts if x["type"] == "tool_output"]
    assert outputs[0] == "wrote 13 bytes to s.py"
    assert outputs[1] == ("42\n" if agentic else DENIED)


def test_tool_call_extraction_order(humaneval):
    """write_file/edit_file calls first, then a fenced block, then the raw text; malformed calls
    skipped."""
    write = {"name": "write_file", "arguments": {"path": "a.py", "content": "x = 1\n"}}
    edit = {
        "name": "edit_file",
        "arguments": {"path": "a.py", "old_string": "1", "new_string": "2"},
    }
    w, e = (f"<|tool_start|>{json.dumps(c)}<|tool_end|>" for c in (write, edit))
    assert extract_code(w + "```python\ny = 0\n```") == "x = 1\n"
    assert extract_code(w + e) == "x = 2\n"
    assert extract_code("<|tool_start|>{bad json<|tool_end|>```python\ny = 0\n```") == "y = 0\n"
    assert (
        extract_code(
            '<|tool_start|>{"name": "bash", "arguments": {"command": "ls"}}<|tool_end|>z = 3'
        )
        == '<|tool_start|>{"name": "bash", "arguments": {"command": "ls"}}<|tool_end|>z = 3'
    )
    parts = [
        {"type": "text", "text": "```python\ny = 0\n```"},
        {
            "type": "tool_call",
            "name": "write_file",
            "arguments": {"path": "b.py", "content": "q = 1\n"},
        },
        {"type": "tool_output", "text": "wrote 6 bytes"},
    ]
    assert extract_code(parts) == "q = 1\n" and extract_code(parts[:1]) == "y = 0\n"


def test_canonical_solutions_as_write_file_calls_score_one(humaneval, tmp_path):
    """All 164 canonical solutions, each written by a write_file call inside a chat reply, through
    --samples' reading path: pass@1 = 1.0 (the same extraction as for our own chat model)."""
    records = []
    for p in humaneval:
        call = json.dumps(
            {
                "name": "write_file",
                "arguments": {
                    "path": "solution.py",
                    "content": p["prompt"] + p["canonical_solution"],
                },
            }
        )
        records.append(
            {
                "task_id": p["task_id"],
                "completion": f"I'll write it.<|tool_start|>{call}<|tool_end|>"
                "<|output_start|>wrote it<|output_end|>Done.",
            }
        )
    by_task = read_samples(
        write_samples(tmp_path / "calls.jsonl", records),
        humaneval,
        {p["task_id"] for p in humaneval},
    )
    rows, means = summarize(humaneval, score(humaneval, by_task, workers=2, timeout=10.0), [1])
    assert means[1] == 1.0, [r["task_id"] for r in rows if r["pass@1"] < 1]


class FakeBaseEngine:
    """Continues every prompt with a fixed text (per problem), the way a base model would run on."""

    max_len = 4096

    def __init__(self, tok, texts):
        self.tokenizer, self.texts, self.prompts = tok, list(texts), []

    def generate_batch(self, ids, num_samples=1, *args, **kwargs):
        self.prompts.append(ids)
        return [self.tokenizer.encode(self.texts[len(self.prompts) - 1])] * num_samples


def test_base_generation_path(humaneval):
    """<|bos|> + prompt goes in; the completion is cut at the first stop sequence, so the rambling
    after the function does not break it."""
    tok, problems = ByteTokenizer(), humaneval[:3]
    engine = FakeBaseEngine(
        tok, [p["canonical_solution"] + "\n\ndef unrelated(:\n" for p in problems]
    )
    by_task = generate(engine, problems, "humaneval", "base", 1, 64, 0.0, None, 0)
    assert engine.prompts[0] == [0] + tok.encode(problems[0]["prompt"])
    assert by_task["HumanEval/0"] == [problems[0]["canonical_solution"] + "\n"]
    assert all(r["passed"] for r in score(problems, by_task, workers=2, timeout=5.0))


# deselect with -m "not slow" (or -k "not slow"): about 20 ms of CPU per sample, 1640 samples
@pytest.mark.slow
def test_slow_score_164x10(humaneval):
    """Throughput: 164 problems x 10 samples (the canonical solution, every 3rd sample broken).
    Prints its time."""
    by_task = {
        p["task_id"]: [p["canonical_solution"] if i % 3 else "    return None\n" for i in range(10)]
        for p in humaneval
    }
    t0 = time.time()
    records = score(humaneval, by_task, workers=os.cpu_count(), timeout=10.0)
    elapsed = time.time() - t0
    _, means = summarize(humaneval, records, [1, 10])
    print(
        f"scored 164 x 10 = {len(records)} samples in {elapsed:.1f}s on {os.cpu_count()} cores: "
        f"pass@1 {means[1]:.4f} pass@10 {means[10]:.4f}"
    )
    assert means[1] == pytest.approx(0.6) and means[10] == 1.0


def test_mbpp_offline_is_a_clear_error(monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(
        NanocodeError,
        match=r"could not download google-research-datasets/mbpp/.*cannot reach huggingface.co"
        r".*--mbpp-file",
    ):
        load_mbpp()
    with pytest.raises(NanocodeError, match="MBPP file not found"):
        load_mbpp("/nonexistent/mbpp.jsonl")


# -------------------------------------------------------------------------------------------------
# the scripts on a tiny real checkpoint (random weights): they run end to end, report sane numbers


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A base dir with a tiny tokenizer, a random depth-1 base checkpoint, and a 2-shard corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanocode.checkpoint import checkpoint_dir, save_checkpoint
    from nanocode.gpt import GPTConfig, build_model
    from nanocode.tokenizer import Tokenizer

    base = tmp_path_factory.mktemp("code_eval_base")
    texts = [(ROOT / p).read_text() for p in ("nanocode/execution.py", "nanocode/code_tasks.py")]
    tok = Tokenizer.train(texts, vocab_size=512)
    tok.save(base / "tokenizer")
    torch.manual_seed(0)
    model = build_model(
        GPTConfig(
            sequence_len=128, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64
        ),
        "cpu",
    )
    old = os.environ["NANOCODE_BASE_DIR"]
    os.environ["NANOCODE_BASE_DIR"] = str(base)
    try:
        save_checkpoint(
            checkpoint_dir("base", "d1"),
            1,
            model.state_dict(),
            None,
            {"model_config": model.config.to_dict()},
        )
    finally:
        os.environ["NANOCODE_BASE_DIR"] = old
    (base / "data" / "code").mkdir(parents=True)
    docs = {
        "python": texts,
        "c": ["int main(void) {\n    return 0;\n}\n" * 20],
        "rust": ['fn main() {\n    println!("hi");\n}\n' * 20],
    }
    rows = [(t, lang) for lang, ts in docs.items() for t in ts]
    for i in range(2):  # shard 0: train, shard 1 (the last): validation
        pq.write_table(
            pa.table({"text": [r[0] for r in rows], "lang": [r[1] for r in rows]}),
            base / "data" / "code" / f"shard_{i:05d}.parquet",
        )
    return base


def run_in(base, module, *args):
    env = dict(os.environ, NANOCODE_BASE_DIR=str(base), NANOCODE_KERNELS="torch")
    p = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_code_eval_with_tiny_checkpoint(tiny_base):
    out = run_in(
        tiny_base,
        "scripts.code_eval",
        "-i",
        "base",
        "--max-problems",
        2,
        "-n",
        2,
        "-t",
        0.8,
        "--max-tokens",
        8,
        "--device-type",
        "cpu",
    )
    last = out.strip().splitlines()[-1]
    assert last.startswith("pass@1: ") and 0.0 <= float(last.split()[1]) <= 1.0
    rows = [
        json.loads(line)
        for line in open(tiny_base / "eval" / "code_eval_base_humaneval_samples.jsonl")
    ]
    assert [r["task_id"] for r in rows] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert all(set(r) == {"task_id", "completion", "passed", "result"} for r in rows)
    report = json.loads((tiny_base / "report" / "code_eval_base.json").read_text())
    assert report["humaneval"]["num_problems"] == 2


def test_base_eval_with_tiny_checkpoint(tiny_base):
    out = run_in(
        tiny_base,
        "scripts.base_eval",
        "--max-docs",
        20,
        "--sample-tokens",
        4,
        "--device-type",
        "cpu",
    )
    report = json.loads((tiny_base / "report" / "base_eval.json").read_text())
    assert set(report["bpb_per_lang"]) == {"c", "python", "rust"}
    assert 0 < report["bpb"] < 20 and all(0 < v < 20 for v in report["bpb_per_lang"].values())
    assert out.strip().splitlines()[-1] == f"bpb: {report['bpb']:.4f}"
    assert "fill in the middle" in out and len(report["samples"]) == 8
