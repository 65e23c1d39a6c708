"""runs/speedrun.sh's control flow with stand-in commands (no training): stage order and flags,
done-markers, a failed stage stopping the run with its log named, and a rerun skipping what is
done."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Logs each call, swallows heredoc scripts on stdin, and fails when one of its args is $FAIL_MODULE.
# Pretraining burns a little CPU, which the done-marker must count.
FAKE = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALLS"
case "$*" in *scripts.base_train*) i=0; while [ $i -lt 100000 ]; do i=$((i + 1)); done;; esac
for a in "$@"; do
    if [ "$a" = "${FAIL_MODULE:-}" ]; then echo "boom in $a"; exit 3; fi
    if [ "$a" = - ]; then cat > /dev/null; fi
done
echo "ok"
"""


@pytest.fixture
def run(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    (tmp_path / "torchrun").symlink_to(fake)
    base = tmp_path / "base"

    def run(fail=None, nproc=0):
        env = dict(
            os.environ,
            SKIP_SETUP="1",
            NPROC=str(nproc),
            PYTHON=str(fake),
            TORCHRUN=str(tmp_path / "torchrun"),
            NANOCODE_BASE_DIR=str(base),
            CALLS=str(tmp_path / "calls.log"),
            FAIL_MODULE=fail or "",
        )
        (tmp_path / "calls.log").write_text("")
        p = subprocess.run(
            ["bash", str(REPO / "runs" / "speedrun.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return p, (tmp_path / "calls.log").read_text().splitlines(), base

    return run


def test_cpu_pipeline_stages_in_order(run):
    p, calls, base = run()
    assert p.returncode == 0, p.stderr
    modules = [c.split(" -m ")[1].split()[0] for c in calls if " -m " in c]
    assert modules == [
        "nanocode.dataset",
        "scripts.tok_train",
        "scripts.tok_eval",
        "scripts.base_train",
        "scripts.base_eval",
        "scripts.gen_synth",
        "scripts.code_sft",
        "scripts.code_dpo",
        "scripts.code_rl",
        "scripts.code_eval",
        *["scripts.agent_eval"] * 6,  # sft, dpo, rl: each unconstrained, then constrained
        "scripts.code_cli",
        "nanocode.report",
    ]
    train = next(c for c in calls if "scripts.base_train" in c)
    assert train.startswith("python ") and "--depth 4" in train and "--fim-rate 0.5" in train
    assert "--local" in calls[0]
    demo = next(c for c in calls if "scripts.code_cli" in c)
    assert "--yes" in demo and "-t 0" in demo  # the CPU demo decodes greedily
    assert "--weights run_report=20" in next(c for c in calls if "scripts.gen_synth" in c)
    evals = [c for c in calls if "scripts.agent_eval" in c]
    assert ["--constrained" in c for c in evals] == [False, True] * 3
    assert json.loads((base / "speedrun" / "base_train.done").read_text())["cpu_seconds"] > 0.05
    for stage in (
        "dataset",
        "tokenizer",
        "base_train",
        "base_eval",
        "synth",
        "sft",
        "dpo",
        "rl",
        "code_eval_dpo",
        "agent_demo",
    ):
        marker = json.loads((base / "speedrun" / f"{stage}.done").read_text())
        assert marker["device"] == "cpu" and marker["gpus"] == 0 and marker["seconds"] >= 0
        assert marker["cpu_seconds"] >= 0
        assert "ok" in (base / "speedrun" / "logs" / f"{stage}.log").read_text()


def test_failed_stage_stops_and_rerun_skips_done(run):
    p, calls, base = run(fail="scripts.code_sft")
    assert p.returncode == 1
    log = base / "speedrun" / "logs" / "sft.log"
    assert f"stage 'sft' failed; its log is {log}" in p.stderr
    assert "boom in scripts.code_sft" in log.read_text()
    assert (base / "speedrun" / "synth.done").exists() and not (
        base / "speedrun" / "sft.done"
    ).exists()
    assert not any("scripts.code_dpo" in c for c in calls)  # nothing after the failure ran

    p, calls, base = run()
    assert p.returncode == 0, p.stderr
    assert "base_train: already done, skipping" in p.stdout
    assert not any("scripts.base_train" in c or "nanocode.dataset" in c for c in calls)
    assert any("scripts.code_sft" in c for c in calls) and (base / "speedrun" / "sft.done").exists()


def test_stage_of_several_commands_stops_at_its_first_failure(run):
    p, calls, base = run(fail="scripts.tok_train")
    assert p.returncode == 1 and "stage 'tokenizer' failed" in p.stderr
    assert not any("scripts.tok_eval" in c for c in calls)


def test_gpu_launch_uses_torchrun(run):
    p, calls, base = run(nproc=8)
    assert p.returncode == 0, p.stderr
    train = next(c for c in calls if "scripts.base_train" in c)
    assert train.startswith(
        "torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 20"
    )
    assert [c.split(" -i ")[1].split()[0] for c in calls if "scripts.code_eval" in c] == [
        "base",
        "sft",
        "dpo",
    ]
    assert json.loads((base / "speedrun" / "base_train.done").read_text())["gpus"] == 8
