"""Synthetic trajectories and pairs: tool outputs are real (replaying gives the same outputs and
files), the generator is deterministic, covers every kind and variant, and keeps its variety."""

import json
import random
from collections import Counter

import pytest

from nanocode import synth, synth_corpus, synth_pairs, synth_scenes, synth_session
from nanocode.common import NanocodeError
from nanocode.conversations import load_jsonl, validate_conversation, validate_preference
from nanocode.synth_session import assistant_turns
from nanocode.tools import TOOLS, validate_tool_call
from tests.helpers import trajectories


@pytest.fixture(scope="module")
def funcs(stdlib_functions):
    """Functions from a few stdlib modules stand in for the corpus (the same corpus_functions)."""
    out = stdlib_functions(40, 300)
    assert len(out) > 50
    return out


def every_variant():
    """(kind, variant number or None) for every kind, once per variant when it has variants."""
    return [
        (kind, v)
        for kind, spec in synth.KINDS.items()
        for v in (range(len(spec["variants"])) if "variants" in spec else [None])
    ]


@pytest.fixture(scope="module")
def records(funcs):
    # two of every kind and variant, built directly so each is covered whatever the weights
    return [
        synth.make_trajectory(kind, random.Random(i), funcs, variant)
        for kind, variant in every_variant()
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def replayed(records):
    return [synth_session.replay(r) for r in records]


def assistant_parts(r):
    return [p for m in r["messages"] if m["role"] == "assistant" for p in m["content"]]


def first_turn(r):
    return next(m for m in r["messages"] if m["role"] == "assistant")["content"]


def test_every_tool_output_is_what_the_tool_prints(records, replayed):
    n_outputs = 0
    for r, (mismatches, _) in zip(records, replayed):
        validate_conversation(r, r["kind"])
        assert mismatches == [], (r["kind"], mismatches[:1])
        n_outputs += sum(p["type"] == "tool_output" for p in assistant_parts(r))
    assert n_outputs >= 2 * len(records)


def test_each_output_follows_its_call_and_every_call_is_valid(records):
    for r in records:
        parts = assistant_parts(r)
        for i, p in enumerate(parts):
            if p["type"] == "tool_call":
                assert parts[i + 1]["type"] == "tool_output"
                assert validate_tool_call({"name": p["name"], "arguments": p["arguments"]}) is None
            if p["type"] == "tool_output":
                assert parts[i - 1]["type"] == "tool_call"


def test_replay_reproduces_the_final_files(records, replayed):
    editing = {"edit", "write_run", "test_fix", "edit_not_found", "edit_not_unique", "rename_multi"}
    for r, (_, final) in zip(records, replayed):
        assert final == r["final_files"], r["kind"]
        assert final != r["files"] or r["kind"] not in editing, r["kind"]  # edits really change


def test_replay_detects_a_forged_output(records):
    r = json.loads(json.dumps(next(r for r in records if r["kind"] == "test_fix")))
    out = next(p for p in first_turn(r) if p["type"] == "tool_output")
    out["text"] = "3 passed, 0 failed"
    mismatches, _ = synth_session.replay(r)
    assert len(mismatches) == 1


def test_recovery_trajectories_really_hit_the_errors(records):
    first_output = {}
    for r in records:
        outs = [p["text"] for p in first_turn(r) if p["type"] == "tool_output"]
        if outs:
            first_output.setdefault(
                r["kind"], outs[0] if r["kind"] != "edit_not_unique" else outs[1]
            )
    assert first_output["missing_file"].startswith("error: no such file")
    assert "does not occur" in first_output["edit_not_found"]
    assert "occurs 2 times" in first_output["edit_not_unique"]
    assert "command not found" in first_output["command_not_found"]
    assert "FAIL" in first_output["test_fix"]
    # each tool_error variant (bad regex, past the end, missing package, syntax error) fails first
    errors = [first_turn(r)[1]["text"] for r in records if r["kind"] == "tool_error"]
    assert len(errors) == 8 and all(synth.failed(out) for out in errors), errors


def check_steps(steps: list):
    for step in steps:
        if isinstance(step, str):
            assert step in synth.ROUTINES or step in synth.MOVES, f"no routine or move {step!r}"
            continue
        head, *rest = step
        if head == "maybe":
            assert 0 < rest[0] < 1, step
            check_steps(rest[1:])
        elif head == "either":
            for alternative in rest:
                check_steps(alternative)
        elif head in ("say", "user"):
            assert synth.phrases(rest), step  # an "@bank" that is not there raises KeyError
        elif head == "if":
            assert len(rest) == 3 and all(synth.phrases(x) for x in rest[1:]), step
        elif head == "deny":
            assert rest[0] in TOOLS, step
        else:
            assert head == "expect" or head in TOOLS, f"unknown step {step!r}"


def test_every_name_in_the_kinds_table_exists():
    """synth_kinds.json describes each kind once; a misspelt scene, move, routine, bank or tool
    would only show when that variant is drawn, so every one is looked up here."""
    assert set(synth.TASKS) | set(synth.UNSEEN) == set(synth.KINDS) and synth.UNSEEN
    for kind, spec in synth.KINDS.items():
        assert spec["weight"] > 0 and isinstance(spec["seen"], bool), kind
        for variant in spec.get("variants", [{}]):
            merged = {**spec, **variant}
            scene = merged.get("scene", "none")
            assert scene in synth_scenes.SCENES or scene in synth.DATA_SCENES, (kind, scene)
            assert synth.phrases(merged["ask"]), kind
            check_steps(merged["steps"])
    for steps in synth.ROUTINES.values():
        check_steps(steps)
    for follow_up in synth.FOLLOWUPS:
        assert follow_up["needs"] in ("", "file", "py", "main", "defs"), follow_up
        check_steps(follow_up["steps"])
    assert synth.FOLLOWUPS[-1]["needs"] == ""  # the fallback when a follow-up's needs are not met


def test_test_fix_ends_green(records):
    for r in (r for r in records if r["kind"] in ("test_fix", "edit_not_found")):
        last = [p["text"] for p in first_turn(r) if p["type"] == "tool_output"][-1]
        assert "0 failed" in last and "[exit code" not in last


def test_deterministic_for_a_seed(funcs):
    a = trajectories(6, 3, funcs)
    b = trajectories(6, 3, funcs)
    c = trajectories(6, 4, funcs)
    assert a == b
    assert a != c


def test_assistant_text_skips_flattery(records):
    for r in records:
        text = " ".join(p["text"] for p in assistant_parts(r) if p["type"] == "text").lower()
        for phrase in ("great question", "happy to help", "absolutely", "hope this helps"):
            assert phrase not in text


def test_pairs_are_real_and_flawed(records):
    kinds = set()
    # the first kinds cover every flaw; the multi-turn ones check that a pair starts from the
    # files as the earlier turns left them
    multi = [r for r in records if sum(m["role"] == "user" for m in r["messages"]) > 1][:4]
    assert multi
    for r in (
        multi
    ):  # the session's record of the files before the last turn = re-running the earlier turns
        assert (
            r["last_turn_files"]
            == synth_session.execute_turns(r["files"], assistant_turns(r)[:-1], r.get("setup"))[1]
        )
    for i, r in enumerate(records[:18] + multi):
        for kind in synth_pairs.PAIR_KINDS:
            pair = synth_pairs.make_pair(r, random.Random(i), kind)
            if pair is None:
                continue
            kinds.add(kind)
            validate_preference(pair)
            assert pair["chosen"] != pair["rejected"]
            mismatches, _ = synth_session.replay(
                {"files": pair["files"], "messages": [pair["rejected"]]}
            )
            assert mismatches == [], kind
            rej = pair["rejected"]["content"]
            if kind == "malformed_call":
                bad = next(p for p in rej if p["type"] == "tool_call")
                assert (
                    validate_tool_call({"name": bad["name"], "arguments": bad["arguments"]})
                    is not None
                )
            if kind == "not_unique":
                assert any(
                    "occurs" in p["text"] and "times" in p["text"]
                    for p in rej
                    if p["type"] == "tool_output"
                )
            if kind == "unbacked_claim":
                assert sum(p["type"] == "tool_call" for p in rej) < sum(
                    p["type"] == "tool_call" for p in pair["chosen"]["content"]
                )
    assert kinds == set(synth_pairs.PAIR_KINDS)


def test_unique_context_grows_until_unique():
    text = "a = 1\nreturn x\nb = 2\nreturn x\n"
    assert synth_scenes.unique_context(text, 4) == "b = 2\nreturn x"
    assert synth_scenes.unique_context(text, 1) == "a = 1"


def test_corpus_functions_skip_defs_the_greps_would_miss():
    """The grep-based kinds look a function up with `def NAME\\(`: a corpus function written
    `def f (x):` would give "no matches" and crash the generator, so it is not taken."""
    body = "    y = x + 1\n    y *= 2\n    y -= 3\n    return y\n"
    docs = [{"lang": "python", "text": f"def spaced (x):\n{body}\n\ndef plain(x):\n{body}"}]
    assert [f["facts"]["name"] for f in synth_corpus.corpus_functions(docs)] == ["plain"]


# ---- the registry, the new kinds, denials, follow-ups


def test_registry_weights_are_what_gets_drawn():
    """trajectory() (what gen_synth's workers call) draws its kind first with draw_kind; over many
    draws each seen kind's share matches its weight within 4 standard errors, and unseen kinds
    never come."""
    rng = random.Random(0)
    n = 40000
    counts = Counter(synth.draw_kind(rng) for _ in range(n))
    total = sum(synth.KINDS[k]["weight"] for k in synth.TASKS)
    assert set(counts) == set(synth.TASKS) and not set(counts) & set(synth.UNSEEN)
    for k in synth.TASKS:
        p = synth.KINDS[k]["weight"] / total
        assert abs(counts[k] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (k, counts[k] / n, p)


def test_weights_flag_reweights_the_draw_and_bad_weights_are_named():
    from scripts import gen_synth

    args = gen_synth.get_args(["--weights", "run_report=50,no_tool=0"])
    assert args.kind_weights == {"run_report": 50.0, "no_tool": 0.0}
    rng = random.Random(0)
    counts = Counter(synth.draw_kind(rng, weights=args.kind_weights) for _ in range(4000))
    total = sum(args.kind_weights.get(k, synth.KINDS[k]["weight"]) for k in synth.TASKS)
    assert counts["no_tool"] == 0 and abs(counts["run_report"] / 4000 - 50 / total) < 0.03
    for bad, msg in [
        ("usage_search=3", "not a kind training draws from"),
        ("run_report=x", "not kind=number"),
        ("run_report=-1", ">= 0"),
    ]:
        with pytest.raises(NanocodeError, match=msg):
            gen_synth.get_args(["--weights", bad])


def test_trajectory_kind_is_the_first_draw(funcs):
    for i in range(6):
        want = synth.draw_kind(random.Random(5 * 1_000_003 + i))
        assert synth.trajectory(i, 5, funcs)["kind"] == want


def test_new_kinds_really_do_what_they_say(records, funcs):
    # read_range reads with read_file or with sed, one of the two at random
    records = records + [
        synth.make_trajectory("read_range", random.Random(i), funcs) for i in range(6)
    ]
    by = {}
    for r in records:
        by.setdefault(r["kind"], []).append(r)

    def calls(r):
        return [p for p in assistant_parts(r) if p["type"] == "tool_call"]

    cmds = " ".join(p["arguments"].get("command", "") for r in records for p in calls(r))
    for word in ("ls", "wc -l", "git status", "pytest", "sed -n", "head -n", "tail -n"):
        assert word in cmds, word
    assert all(not calls(r) for r in by["no_tool"])
    assert all(
        len({p["arguments"]["path"] for p in calls(r) if p["name"] == "edit_file"}) >= 2
        for r in by["rename_multi"]
    )
    assert all(
        any(
            p["name"] == "bash" and "main.py" in p["arguments"]["command"] or p["name"] == "bash"
            for p in calls(r)
        )
        for r in by["run_report"]
    )
    outs = [
        p["text"]
        for r in by["long_output"]
        for p in assistant_parts(r)
        if p["type"] == "tool_output"
    ]
    assert any("[output truncated" in o for o in outs)
    assert all(
        "edit_file" not in synth_session.call_shape(r)
        and "write_file" not in synth_session.call_shape(r)
        for r in by["qa_read"]
    )


def test_run_report_states_what_the_program_printed(funcs):
    """The demo's kind of task: the answer quotes the run's real output."""
    for i in range(12):
        r = synth.make_trajectory("run_report", random.Random(i), funcs)
        parts = first_turn(r)
        run = [
            j
            for j, p in enumerate(parts)
            if p["type"] == "tool_call"
            and p["name"] == "bash"
            and ".py" in p["arguments"]["command"]
        ][-1]
        out = parts[run + 1]["text"]
        answer = " ".join(p["text"] for p in parts[run + 2 :] if p["type"] == "text")
        if "[exit code" not in out:
            assert all(line in answer for line in out.strip().split("\n")[:4]), (out, answer)


def test_denial_is_never_run_and_only_the_reaction_is_learned(funcs):
    from nanocode.engine import DENIED
    from tests.helpers import trained_tokenizer

    recs = [synth.make_trajectory("denial", random.Random(i), funcs) for i in range(8)]
    tok = trained_tokenizer([json.dumps(r) for r in recs])
    out_start, out_end = tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")
    checked = 0
    for r in recs:
        mismatches, final = synth_session.replay(r)
        assert mismatches == []
        parts = assistant_parts(r)
        j = next(
            j for j, p in enumerate(parts) if p["type"] == "tool_output" and p["text"] == DENIED
        )
        call = parts[j - 1]
        if call["name"] in ("edit_file", "write_file") or call["arguments"].get(
            "command", ""
        ).startswith("rm "):
            assert (
                final == r["files"] or call["name"] == "bash" and "python" in str(parts)
            )  # the denied change never happened
        ids, mask = tok.render_conversation(r)
        k = 0
        while k < len(ids):  # each denial: its output is masked, the text right after it is learned
            if ids[k] == out_start:
                e = ids.index(out_end, k)
                if tok.decode(ids[k + 1 : e]) == DENIED:
                    assert not any(mask[k : e + 1])
                    nxt = e + 1
                    while nxt < len(ids) and ids[nxt] == tok.special_id("<|tool_start|>"):
                        break
                    reaction = [m for m in mask[e + 1 : e + 6]]
                    assert reaction and all(reaction), (
                        "the assistant's reaction after a denial must be trained on"
                    )
                    checked += 1
                k = e
            k += 1
    assert checked >= len(recs)


def test_follow_up_turns_replay_in_one_directory(funcs):
    multi = [
        r for r in trajectories(60, 9, funcs) if sum(m["role"] == "user" for m in r["messages"]) > 1
    ]
    assert len(multi) >= 8
    for r in multi[:10]:
        validate_conversation(r)
        mismatches, final = synth_session.replay(r)
        assert mismatches == [] and final == r["final_files"], r["kind"]


def test_validity_prompts_mark_unseen_kinds_and_phrasings(funcs):
    prompts = [synth.validity_prompt(i, 3, funcs) for i in range(60)]
    for p in prompts:
        validate_conversation(p, last_role="user")
        assert p["seen"] == (p["kind"] in synth.TASKS and p["template"] == "seen")
    assert {p["kind"] for p in prompts if not p["seen"]} & set(synth.UNSEEN)
    assert any(p["template"] == "unseen" for p in prompts) and sum(p["seen"] for p in prompts) >= 20
    assert "no_tool" not in {p["kind"] for p in prompts}  # a validity prompt asks for a tool call


@pytest.mark.slow
def test_gen_synth_end_to_end(module_base_dir, capsys):
    """The script on a tiny corpus: files written, records distinct and valid, the table printed."""
    import sysconfig
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from scripts import gen_synth

    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    data = module_base_dir / "data" / "code"
    data.mkdir(parents=True)
    for k, chunk in enumerate((stdlib[:30], stdlib[30:])):
        texts = [p.read_text(errors="replace") for p in chunk]
        pq.write_table(
            pa.table({"text": texts, "lang": ["python"] * len(texts)}),
            data / f"shard_{k:05d}.parquet",
        )
    gen_synth.main(
        [
            "--num-train",
            "24",
            "--num-val",
            "4",
            "--num-prompts",
            "8",
            "--workers",
            "1",
            "--pairs",
            "4",
        ]
    )
    sft = module_base_dir / "sft"
    train = load_jsonl(sft / "synth_train.jsonl")
    assert len(train) == 24 and len({json.dumps(r["messages"]) for r in train}) == 24
    assert all(r["kind"] in synth.TASKS for r in train)
    prompts = load_jsonl(sft / "validity_prompts.jsonl", kind="prompt")
    assert len(prompts) == 8 and all(set(p) >= {"messages", "kind", "seen"} for p in prompts)
    out = capsys.readouterr().out
    assert "distinct tool-call sequences" in out and "with a denial" in out


def test_generated_data_stays_varied(funcs):
    """Issue 26 asks 3,000 generated conversations for at least 150 distinct tool-call sequences,
    25% multi-turn, 10% without a tool call and 5% with a denial. On 400 (deduplicated, as
    gen_synth does) every seen kind comes up and the shares hold within about two standard errors
    (2 points for multi-turn, 1 for denials): follow-ups, no-tool answers or denials that went
    missing would fail this."""
    from scripts.gen_synth import diversity

    by_text = {}
    for i in range(400):
        r = synth.trajectory(i, 0, funcs)
        by_text.setdefault(json.dumps(r["messages"], sort_keys=True), r)
    d = diversity(list(by_text.values()))
    assert d["records"] >= 360, d
    assert set(d["kinds"]) == set(synth.TASKS), d["kinds"]
    assert d["shapes"] >= 85, d
    assert d["multi_turn"] >= 0.22 and d["no_tool"] >= 0.10 and d["denial"] >= 0.04, d
