"""Code-instruct datasets -> tool-use conversations, on small files in each dataset's own schema
(tests/data_fixtures/instruct/): tool outputs are what a fresh run prints, a modification becomes
unique edits that reproduce the new code, code that does not run is dropped and counted."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanocode import instruct, synth_session
from nanocode.common import NanocodeError
from nanocode.conversations import validate_conversation

FIXTURES = Path(__file__).parent / "data_fixtures" / "instruct"
FILES = {
    "code_alpaca": "code_alpaca_20k.json",
    "evol_codealpaca": "evol_codealpaca_train.jsonl",
    "magicoder": "magicoder_evol_instruct.jsonl",
    "self_oss_instruct": "self_oss_instruct.jsonl",
    "code_feedback": "Code-Feedback.jsonl",
}


def fixture_path(name, tmp_path):
    path = FIXTURES / FILES[name]
    if instruct.SOURCES[name][1].endswith(
        ".parquet"
    ):  # the hub file is parquet: same rows, same columns
        out = tmp_path / "train-00000-of-00001.parquet"
        pq.write_table(pa.Table.from_pylist(instruct.read_rows(path)), out)
        return out
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instruct")
    out = {}
    for name in FILES:
        rows = instruct.read_rows(fixture_path(name, tmp))
        out[name] = (rows, *instruct.convert(rows, instruct.SOURCES[name][2]))
    return out


def test_every_source_converts_and_outputs_are_a_fresh_run(converted):
    for name, (rows, recs, stats) in converted.items():
        assert recs, name
        assert stats["converted"] == len(recs)
        assert stats["converted"] + sum(
            v for k, v in stats.items() if k.startswith("dropped")
        ) == len(rows), (name, stats)
        for r in recs:
            validate_conversation(r, name)
            mismatches, final = synth_session.replay(r)
            assert mismatches == [] and final == r["final_files"], (name, mismatches[:1])


def test_code_answers_are_written_then_run(converted):
    _, recs, _ = converted["code_alpaca"]
    r = recs[0]
    assert synth_session.call_shape(r) == "write_file bash"
    parts = r["messages"][1]["content"]
    assert parts[0]["arguments"]["content"] == "for i in range(1, 6):\n    print(i * i)\n"
    assert parts[3]["text"] == "1\n4\n9\n16\n25\n"
    assert (
        "25" in parts[-1]["text"] and "```python" not in parts[-1]["text"]
    )  # the code went to the file


def test_a_modification_becomes_unique_edits_that_reproduce_the_new_code(converted):
    edits = 0
    for name, (rows, recs, _) in converted.items():
        for r in recs:
            for m_user, m_asst in zip(r["messages"][::2], r["messages"][1::2]):
                parts = m_asst["content"]
                calls = [p for p in parts if p["type"] == "tool_call"]
                if not any(c["name"] == "edit_file" for c in calls):
                    continue
                edits += 1
                old = calls[0]["arguments"]["content"]
                assert (
                    calls[0]["name"] == "write_file" and old in m_user["content"]
                )  # the user's code, first
                assert [c["name"] for c in calls[1:3]] == ["grep", "read_file"]
                text = old
                for c in calls:
                    if c["name"] == "edit_file":
                        assert text.count(c["arguments"]["old_string"]) == 1
                        text = text.replace(
                            c["arguments"]["old_string"], c["arguments"]["new_string"]
                        )
                new = max(
                    instruct.python_blocks(rows_answer(rows, name, m_user["content"])), key=len
                )
                assert text == new
                outs = [p["text"] for p in parts if p["type"] == "tool_output"]
                assert all(
                    o.startswith("edited") for o, c in zip(outs, calls) if c["name"] == "edit_file"
                )
    assert edits >= 4


def rows_answer(rows, name, request):
    schema = instruct.SOURCES[name][2]
    return next(a for row in rows for u, a in instruct.turns_of(row, schema) if u == request)


def test_failing_code_and_text_answers(converted):
    _, _, stats = converted["code_alpaca"]
    assert (
        stats["dropped: code does not run"] == 1 and stats["text"] == 1
    )  # 10 / 0; the list-vs-set answer
    _, _, stats = converted["magicoder"]
    assert stats["dropped: code does not run"] == 1  # input(): no stdin
    _, _, stats = converted["self_oss_instruct"]
    assert stats["dropped: code does not run"] == 1  # an infinite loop: the sandbox's time limit
    _, recs, _ = converted["code_feedback"]
    assert synth_session.call_shape(recs[0]).split("|") == [
        "write_file bash",
        "write_file grep read_file edit_file edit_file bash",
        "-",
    ]
    assert recs[1]["messages"][1]["content"] == [
        {
            "type": "text",
            "text": json.loads((FIXTURES / FILES["code_feedback"]).read_text().splitlines()[1])[
                "messages"
            ][1]["content"],
        }
    ]


def test_hunks_edit_unique_even_with_repeated_lines():
    old = "x = 1\nprint(x)\ny = 2\nprint(x)\n"
    new = "x = 1\nprint(x)\ny = 2\nprint(y)\n"
    ((i1, i2, repl),) = instruct.hunks(old, new)
    assert (i1, i2, repl) == (3, 4, ["print(y)"])
    assert (
        instruct.unique_old_string(old, 3, 4) == "y = 2\nprint(x)\n"
    )  # grown both ways until unique
    assert instruct.unique_old_string("a\na\n", 0, 1) == "a\na"
    repeated = "pass\n" * 20
    assert (
        instruct.unique_old_string(repeated, 10, 11) is None
    )  # no small unique anchor: not an edit we can make
    recs, stats = instruct.convert(
        [
            {
                "instruction": f"Change the last line:\n```python\n{repeated}```",
                "response": f"```python\n{repeated[:-5]}print('done')\n```",
            }
        ],
        "response",
    )
    assert recs == [] and stats["dropped: edit not unique"] == 1


def test_offline_fetch_names_the_file(monkeypatch):
    from nanocode import hub

    def offline(*a, **k):
        raise ConnectionError("cannot reach huggingface.co:443")

    monkeypatch.setattr(hub, "_check_reachable", offline)
    with pytest.raises(
        NanocodeError, match=r"could not download m-a-p/Code-Feedback/Code-Feedback.jsonl .*offline"
    ):
        instruct.fetch("code_feedback")
    with pytest.raises(NanocodeError, match="unknown instruct source"):
        instruct.fetch("nope")
