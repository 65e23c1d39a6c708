"""RL from unit tests: the group-relative advantages and the policy-gradient loss against a hand
computation, gradient only through sampled tokens, a tiny model learning a rewarded answer, 2 gloo
processes == 1, resume == uninterrupted, the task sources and their verifiers, and bad input."""

import ast
import json
import random
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from nanocode import rl_tasks
from nanocode.common import NanocodeError
from nanocode.conversations import write_jsonl
from scripts.code_rl import group_advantages, pg_loss, rollout_row
from tests.helpers import ANSWER, install_fixed_answer_reward, nudged_model

FIXTURES = Path(__file__).parent / "fixtures"


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [1.1, 0.0, 0.1, -0.1]])
    want = torch.tensor(
        [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [0.825, -0.275, -0.175, -0.375]]
    )
    torch.testing.assert_close(group_advantages(r), want)
    # / std (population std of [1, 0, 0, 1] is 0.5); an all-equal group stays 0
    torch.testing.assert_close(
        group_advantages(r[:2], std=True),
        torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0] * 4]),
        atol=1e-5,
        rtol=0,
    )
    # --neg-weight scales the negative ones only
    torch.testing.assert_close(
        group_advantages(r, neg_weight=0.2),
        torch.tensor([[0.5, -0.1, -0.1, 0.5], [0.0] * 4, [0.825, -0.055, -0.035, -0.075]]),
    )


def tiny_model(vocab=40, seq=32, seed=0):
    from nanocode.gpt import GPTConfig, build_model

    torch.manual_seed(seed)
    m = build_model(GPTConfig.from_depth(1, vocab, seq), "cpu")
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return m


def test_pg_loss_by_hand_and_only_sampled_tokens_carry_gradient():
    """Two rows: prompt (mask 0), sampled tokens (1), a forced tool output (0), more sampled tokens.
    The loss equals -sum A * log p(token) over the sampled tokens / norm, computed from the logits
    by hand; and its gradient is that of the hand formula: the prompt's and the tool output's tokens
    carry none (changing them as targets changes nothing)."""
    model = tiny_model()
    r0 = {"prompt_ids": [0, 5, 6], "ids": [7, 8, 20, 21, 9, 1], "mask": [1, 1, 0, 0, 1, 1]}
    r1 = {"prompt_ids": [0, 5], "ids": [11, 12, 1], "mask": [1, 1, 1]}
    rows = [rollout_row(r0, 32), rollout_row(r1, 32)]
    assert rows[0] == ([0, 5, 6, 7, 8, 20, 21, 9, 1], [0, 0, 0, 1, 1, 0, 0, 1, 1])
    adv, norm = [0.5, -1.5], 7.0
    loss = pg_loss(model, rows, adv, norm, pad_id=0, device="cpu", amp=nullcontext())
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hand = 0.0
    for (ids, mask), a in zip(rows, adv):
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
        hand = hand - a * sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]) / norm
    hand.backward()
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # the same rows with the tool output's tokens marked sampled: a different loss, so the mask is
    # what kept them out
    wrong = [(rows[0][0], [0, 0, 0, 1, 1, 1, 1, 1, 1]), rows[1]]
    assert not torch.allclose(pg_loss(model, wrong, adv, norm, 0, "cpu", nullcontext()), loss)


# -----------------------------------------------------------------------------
# a tiny model learns a rewarded answer; 2 processes == 1; resume == uninterrupted


@pytest.fixture(scope="module")
def rl_setup(module_base_dir):
    """A tokenizer, a tiny 'SFT' checkpoint (random, depth 1) and a task file of 4 prompts."""
    tokenizer_mod = pytest.importorskip("nanocode.tokenizer")
    texts = ["Say something short. Reply with one word: yes, no, maybe, quick, quiet, queue."] * 20
    tok = tokenizer_mod.Tokenizer.train(texts, vocab_size=300)
    tok.save(module_base_dir / "tokenizer")
    from nanocode.checkpoint import checkpoint_dir, save_checkpoint

    model = nudged_model(1, tok.vocab_size, 128)
    save_checkpoint(
        checkpoint_dir("sft", "t1"),
        1,
        model.state_dict(),
        None,
        {"model_config": model.config.to_dict()},
    )
    tasks = [
        {
            "id": f"t{i}",
            "prompt": f"Say something short {i}.",
            "check": {"type": "stdout", "expected": ANSWER},
        }
        for i in range(4)
    ]
    path = write_jsonl(module_base_dir / "tasks.jsonl", tasks)
    return tok, path


def rl_args(path, *extra):
    return [
        "--model-tag",
        "t1",
        "--tasks",
        str(path),
        "--val-tasks",
        str(path),
        "--max-new-tokens",
        "6",
        "--group-size",
        "4",
        "--tasks-per-step",
        "2",
        "--eval-samples",
        "2",
        "--valid-call-bonus",
        "0",
        "--malformed-penalty",
        "0",
        "--device-type",
        "cpu",
        *extra,
    ]


def test_mean_reward_rises_on_a_fixed_answer(module_base_dir, rl_setup, monkeypatch):
    tok, path = rl_setup
    monkeypatch.setattr(rl_tasks, "written_code", rl_tasks.written_code)  # restored after the test
    monkeypatch.setattr(rl_tasks, "verify_many", rl_tasks.verify_many)
    install_fixed_answer_reward()
    from scripts import code_rl

    code_rl.main(
        rl_args(
            path,
            "--steps",
            "30",
            "--eval-every",
            "-1",
            "--init-lr-frac",
            "1.0",
            "--temperature",
            "1.0",
        )
    )
    report = json.loads((module_base_dir / "report" / "rl.json").read_text())
    rewards = [r for _, r in report["curves"]["reward"]]
    assert len(rewards) == 30
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.2, rewards
    assert report["pass_at_1"] >= report["pass_at_1_before"]


TORCHRUN_SCRIPT = r"""
import sys
from nanocode.common import run_main
from tests.helpers import install_fixed_answer_reward
install_fixed_answer_reward()
from scripts import code_rl
run_main(lambda: code_rl.main(sys.argv[2:]))
"""


@pytest.mark.slow  # two torchrun launches: about 50 s on 2 busy cores
def test_two_gloo_processes_equal_one(module_base_dir, rl_setup, tmp_path):
    """The same 2 steps of 4 tasks with 1 and 2 processes: the same parameters after (each rank
    samples its own 2 tasks, with the seeds their positions give)."""
    from nanocode.checkpoint import checkpoint_dir
    from tests.helpers import torchrun

    tok, path = rl_setup
    script = tmp_path / "rl_script.py"
    script.write_text(TORCHRUN_SCRIPT)
    args = rl_args(
        path,
        "--steps",
        "2",
        "--tasks-per-step",
        "4",
        "--sample-tasks",
        "1",
        "--eval-every",
        "-1",
        "--eval-samples",
        "1",
        "--init-lr-frac",
        "1.0",
    )
    states = []
    for nproc in (1, 2):
        torchrun([str(script), "x", *args], tmp_path, nproc=nproc)
        states.append(torch.load(checkpoint_dir("rl", "t1") / "model_000002.pt"))
    start = torch.load(checkpoint_dir("sft", "t1") / "model_000001.pt")
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(states[0][k], start[k]) for k in start), "parameters did not move"


def test_resume_continues_exactly(module_base_dir, rl_setup, monkeypatch):
    from nanocode.checkpoint import checkpoint_dir, load_meta

    tok, path = rl_setup
    monkeypatch.setattr(rl_tasks, "written_code", rl_tasks.written_code)
    monkeypatch.setattr(rl_tasks, "verify_many", rl_tasks.verify_many)
    install_fixed_answer_reward()
    from scripts import code_rl

    args = rl_args(
        path, "--steps", "4", "--save-every", "2", "--eval-every", "-1", "--init-lr-frac", "1.0"
    )
    code_rl.main(args)
    straight = torch.load(checkpoint_dir("rl", "t1") / "model_000004.pt")
    curves = load_meta(checkpoint_dir("rl", "t1"), 4)["curves"]
    code_rl.main(
        args + ["--resume"]
    )  # picks up the resumable step-2 checkpoint, redoes steps 3 and 4
    resumed = torch.load(checkpoint_dir("rl", "t1") / "model_000004.pt")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    again = load_meta(checkpoint_dir("rl", "t1"), 4)["curves"]
    assert [v for _, v in again["pg_loss"]] == [v for _, v in curves["pg_loss"]]
    assert [v for _, v in again["reward"]] == [v for _, v in curves["reward"]]


# -----------------------------------------------------------------------------
# task sources and verifiers


def test_mbpp_loader_on_the_real_schema():
    tasks = rl_tasks.mbpp_tasks(FIXTURES / "mbpp_sample.jsonl")
    rows = [json.loads(line) for line in open(FIXTURES / "mbpp_sample.jsonl") if line.strip()]
    assert len(tasks) == len(rows) and tasks[0]["id"] == f"mbpp/{rows[0]['task_id']}"
    assert rows[0]["test_list"][0] in tasks[0]["prompt"]
    verdicts = rl_tasks.verify_many(tasks, [r["code"] for r in rows])
    assert all(ok for ok, _ in verdicts), verdicts
    wrong = rl_tasks.verify_many(tasks[:1], ["def similar_elements(a, b):\n    return ()\n"])
    assert wrong[0][0] is False


def test_corpus_tasks_pin_the_original(stdlib_functions):
    funcs = stdlib_functions(40, 300)
    tasks = rl_tasks.corpus_tasks(funcs, seed=0, max_tasks=6)
    assert len(tasks) >= 3
    by_name = {}
    for f in funcs:
        by_name.setdefault(ast.parse(f["src"]).body[0].name, f["src"])
    originals = [by_name[t["id"].split("/")[1]] for t in tasks]
    assert all(ok for ok, _ in rl_tasks.verify_many(tasks, originals))
    stubs = [src.splitlines()[0] + "\n    return 12345\n" for src in originals]
    assert not any(
        ok for ok, _ in rl_tasks.verify_many(tasks, stubs)
    )  # a wrong body fails its tests
    assert all("def " in t["prompt"] and t["check"]["type"] == "tests" for t in tasks)


def test_program_tasks_are_split_by_request_and_pinned_by_the_reference():
    """Fresh requests of the write-and-run kind: train and val never share a request; the reference
    program (run with the request's arguments) passes its own task, another output fails."""
    from nanocode import synth_scenes

    train, val = (
        rl_tasks.program_tasks("train", 0, draws=300),
        rl_tasks.program_tasks("val", 1, draws=300),
    )
    assert len(train) > 30 and len(val) > 5
    assert not {t["prompt"] for t in train} & {t["prompt"] for t in val}
    assert any("argv" in t["check"] for t in train) and all(
        t["check"]["expected"].strip() for t in train + val
    )
    refs = {}
    rng = random.Random(0)
    for _ in range(300):
        request, _, code, _ = synth_scenes.program_request(rng)
        refs[request] = code
    assert all(ok for ok, _ in rl_tasks.verify_many(train, [refs[t["prompt"]] for t in train]))
    assert rl_tasks.verify_many(train[:1], ["print('something else')"])[0] == (
        False,
        "wrong output",
    )


def test_humaneval_style_file_and_humaneval_itself_refused(tmp_path):
    row = {
        "task_id": "Style/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "entry_point": "add",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
        "    assert candidate(-1, 1) == 0\n",
    }
    path = tmp_path / "style.jsonl"
    path.write_text(json.dumps(row) + "\n")
    tasks = rl_tasks.load_tasks(str(path))
    assert len(tasks) == 1 and "def add(a, b)" in tasks[0]["prompt"]
    good, bad = row["prompt"] + row["canonical_solution"], row["prompt"] + "    return a - b\n"
    assert [ok for ok, _ in rl_tasks.verify_many(tasks * 2, [good, bad])] == [True, False]
    path.write_text(json.dumps(dict(row, task_id="HumanEval/0")) + "\n")
    with pytest.raises(NanocodeError, match="stays held out"):
        rl_tasks.load_tasks(str(path))
    path.write_text(json.dumps({"task_id": "Style/1", "entry_point": "f"}) + "\n")
    with pytest.raises(NanocodeError, match="line 1.*HumanEval-style problem needs"):
        rl_tasks.load_tasks(str(path))


def test_agent_tasks_are_disjoint_from_the_suite_and_scored_in_their_repo():
    """The agent source: none of its tasks is a shipped-suite task, train and val differ; a scripted
    policy that performs a task's reference solution passes (verified in the task's scratch repo),
    an idle one fails."""
    from nanocode import agent_tasks
    from nanocode.engine import Engine
    from tests.helpers import ByteTokenizer
    from tests.scripted_model import ScriptedModel, encode_with_specials

    train, val = rl_tasks.agent_rl_tasks("train", 0, n=28), rl_tasks.agent_rl_tasks("val", 0, n=28)
    suite = {
        (t["request"], json.dumps(t["files"], sort_keys=True)) for t in agent_tasks.load_suite()
    }

    def key(t):
        return t["check"]["task"]["request"], json.dumps(
            t["check"]["task"]["files"], sort_keys=True
        )

    assert (
        train
        and val
        and not {key(t) for t in train} & suite
        and {key(t) for t in train} != {key(t) for t in val}
    )
    task = next(t for t in train if t["check"]["task"]["kind"] == "fix")
    sol = task["check"]["task"]["solution"]
    calls = [json.dumps({"name": c["name"], "arguments": c["arguments"]}) for c in sol["calls"]]
    text = "".join(f"<|tool_start|>{call}<|tool_end|>" for call in calls) + sol["answer"]
    tok = ByteTokenizer()
    script = encode_with_specials(tok, text)
    model = ScriptedModel([], tok.vocab_size, 3, 4, sequence_len=4096, pick=lambda ids: script)
    results = rl_tasks.sample(Engine(model, tok), [task], 2, 0, 2048, 1.0, None, 10.0)
    assert [ok for ok, _ in rl_tasks.score([task] * 2, results)] == [True, True]
    idle = ScriptedModel([], tok.vocab_size, 3, 4, sequence_len=4096, pick=lambda ids: [])
    results = rl_tasks.sample(Engine(idle, tok), [task], 1, 0, 64, 1.0, None, 10.0)
    assert not rl_tasks.score([task], results)[0][0]


def test_bad_completions_score_zero_and_are_counted():
    """No verifier, no code, a crash, a hang, a fork: reward 0 with the reason, the rest scored."""
    t = {
        "id": "x",
        "source": "t",
        "prompt": "p",
        "check": {"type": "tests", "tests": "assert f() == 1"},
    }
    none = dict(t, check=None)
    codes = [
        "def f():\n    return 1\n",
        None,
        "def f():\n    raise RuntimeError('boom')\n",
        "def f():\n    while True:\n        pass\n",
        "import os\nos.fork()\ndef f():\n    return 1\n",
        "def f(): return 1",
    ]
    out = rl_tasks.verify_many([t, t, t, t, t, none], codes, timeout=1.0)
    assert out[0] == (True, "passed")
    assert out[1] == (False, "no code written") and out[5] == (False, "no verifier")
    assert out[2][0] is False and "boom" in out[2][1]
    assert out[3] == (False, "timed out")
    assert out[4][0] is False


def test_a_crashing_verifier_scores_zero(monkeypatch):
    import nanocode.execution

    monkeypatch.setattr(nanocode.execution, "run_many", lambda *a, **k: 1 / 0)
    t = {
        "id": "x",
        "source": "t",
        "prompt": "p",
        "check": {"type": "tests", "tests": "assert True"},
    }
    out = rl_tasks.verify_many([t, t], ["x = 1", "x = 2"])
    assert all(ok is False and "verifier crashed: ZeroDivisionError" in s for ok, s in out)


def test_call_counts():
    msg = {
        "content": [
            {"type": "text", "text": "{bad"},
            {"type": "tool_output", "text": "error: not valid JSON"},
            {
                "type": "tool_call",
                "name": "write_file",
                "arguments": {"path": "a.py", "content": "x"},
            },
            {"type": "tool_output", "text": "wrote a.py"},
        ]
    }
    assert rl_tasks.call_counts(msg) == (1, 1)
    assert rl_tasks.written_code(msg) == "x"


def test_bad_task_file_and_missing_checkpoint(tmp_path, monkeypatch):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text(
        json.dumps({"prompt": "p", "check": {"type": "tests", "tests": "assert 1"}}) + "\n{oops\n"
    )
    with pytest.raises(NanocodeError, match=r"tasks.jsonl line 2: not valid JSON"):
        rl_tasks.load_task_file(bad)
    bad.write_text(json.dumps({"prompt": "p", "check": {"type": "magic"}}) + "\n")
    with pytest.raises(NanocodeError, match=r"line 1: check type must be one of"):
        rl_tasks.load_task_file(bad)
    monkeypatch.setenv("NANOCODE_BASE_DIR", str(tmp_path / "empty"))
    from scripts import code_rl

    with pytest.raises(NanocodeError, match="no sft checkpoint found"):
        code_rl.main(["--tasks", str(bad), "--device-type", "cpu"])


def test_no_held_out_tasks_trains_and_says_so(
    module_base_dir, rl_setup, tmp_path, capsys, monkeypatch
):
    """A held-out source that yields no task is a warning, not a failed stage (here --save-tag)."""
    from nanocode.checkpoint import checkpoint_dir, list_steps
    from scripts import code_rl

    tok, path = rl_setup
    monkeypatch.setattr(rl_tasks, "program_tasks", lambda split, seed: [])
    code_rl.main(
        rl_args(
            path,
            "--val-tasks",
            "programs",
            "--steps",
            "1",
            "--eval-every",
            "-1",
            "--save-tag",
            "t1_other",
        )
    )
    assert "held-out pass@1 is not measured" in capsys.readouterr().out
    report = json.loads((module_base_dir / "report" / "rl.json").read_text())
    assert report["steps"] == 1 and report["val_tasks"] == 0 and report["model_tag"] == "t1_other"
    assert list_steps(checkpoint_dir("rl", "t1_other")) == [1]


def test_kl_term_is_zero_against_itself_and_positive_otherwise():
    """The k3 estimate exp(d) - d - 1 (d = log ref - log pi) on the sampled tokens: 0 when the
    reference is the policy, > 0 when it differs."""
    import copy

    model = tiny_model()
    rows = [
        rollout_row(
            {"prompt_ids": [0, 5, 6], "ids": [7, 8, 20, 21, 9, 1], "mask": [1, 1, 0, 0, 1, 1]}, 32
        )
    ]
    plain = pg_loss(model, rows, [0.7], 4.0, 0, "cpu", nullcontext())
    same = pg_loss(
        model,
        rows,
        [0.7],
        4.0,
        0,
        "cpu",
        nullcontext(),
        ref_model=copy.deepcopy(model),
        kl_coef=0.5,
    )
    torch.testing.assert_close(plain, same)
    other = tiny_model(seed=1)
    kl = pg_loss(model, rows, [0.0], 4.0, 0, "cpu", nullcontext(), ref_model=other, kl_coef=1.0)
    assert kl.item() > 0
