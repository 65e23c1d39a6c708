"""The report card: built from whatever the stages logged, missing stages shown as missing, plots as
PNGs."""

import json

import pytest

from nanocode.report import build_report, fmt, key_numbers, load_stages, log_stage, series


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCODE_BASE_DIR", str(tmp_path))
    return tmp_path


def done_marker(base, stage, seconds, gpus=0, device="cpu", cpu_seconds=None):
    (base / "speedrun").mkdir(exist_ok=True)
    (base / "speedrun" / f"{stage}.done").write_text(
        json.dumps({"seconds": seconds, "gpus": gpus, "device": device, "cpu_seconds": cpu_seconds})
    )


def log_pipeline(base):
    """Numbers shaped like the real stages' log_stage calls."""
    log_stage("tokenizer", ["vocab_size"], vocab_size=4096, train_seconds=1.2)
    log_stage(
        "tokenizer",
        ["compression.python.ours"],
        compression={
            "python": {"bytes": 300000, "ours": 3.317, "gpt2": 2.5},
            "c": {"bytes": 1000, "ours": 2.3},
        },
    )
    log_stage(
        "base_train",
        depth=2,
        num_params=1_234_567,
        tokens=2_000_000,
        final_val_bpb=1.73,
        final_loss=2.91,
        curves={
            "loss": [[i, 9.0 - i / 30] for i in range(1, 91)],
            "val_bpb": [[0, 3.1], [3, 1.73]],
        },
    )
    log_stage("base_eval", bpb=1.75, bpb_per_lang={"python": 1.6, "c": 1.9})
    log_stage(
        "sft",
        ["val_loss_before", "val_loss"],
        val_loss_before=2.0,
        val_loss=1.2,
        tool_call_validity_before=0.1,
        tool_call_validity=0.8,
        curves={"loss": [[1, 2.0], [2, 1.5]], "val_loss": [[0, 2.0], [2, 1.2]]},
    )
    log_stage(
        "dpo",
        ["preference_accuracy_before", "preference_accuracy"],
        preference_accuracy_before=0.5,
        preference_accuracy=0.7,
        curves={
            "loss": [[1, 0.69], [2, 0.6]],
            "val": [
                [0, {"reward_accuracy": 0.5, "margin": 0.0}],
                [2, {"reward_accuracy": 0.7, "margin": 0.3}],
            ],
        },
    )
    log_stage(
        "code_eval_dpo", ["humaneval.pass@1"], humaneval={"pass@1": 0.0125, "num_problems": 8}
    )
    log_stage("agent_demo", prompt="run main.py", transcript="assistant: ```bash\nls\n```\nmain.py")


def test_log_stage_merges(base):
    log_stage("sft", a=1, b=2)
    log_stage("sft", b=3, c=[1, 2])
    assert load_stages(base)["sft"] == {"a": 1, "b": 3, "c": [1, 2]}
    log_stage("sft", ["a"], d={"e": 0.5})
    log_stage("sft", ["d.e", "a"])
    assert load_stages(base)["sft"]["headline"] == ["a", "d.e"]
    assert key_numbers(load_stages(base)["sft"]) == "a 1, d e 0.5"


def test_full_report_has_every_stage_numbers_and_plots(base):
    log_pipeline(base)
    for stage, s in [("dpo", 30), ("tokenizer", 10), ("base_train", 600)]:
        done_marker(base, stage, s, cpu_seconds=s / 2)
    path = build_report(base)
    text = path.read_text()
    assert path == base / "report" / "report.md"
    for needle in (
        "## System",
        "## Git",
        "commit",
        "torch",
        "vocab size 4,096, compression python ours 3.317",
        "| python | 300,000 | 3.32 | 2.5 |",
        "| c | 1,000 | 2.3 | n/a |",
        "1.73",
        "humaneval pass@1 0.0125",
        "val loss before 2, val loss 1.2",
        "preference accuracy before 0.5, preference accuracy 0.7",
        "CPU run: no GPU cost",
        "| **total** | **10.7min** | 5.3min |",
    ):
        assert needle in text, needle
    for png in (
        "base_train_curves.png",
        "sft_curves.png",
        "dpo_curves.png",
        "base_eval_bpb.png",
        "code_eval_pass_at_k.png",
    ):
        assert f"]({png})" in text
        assert (base / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # stages that logged nothing are listed as missing; optional evals are left out
    assert (
        "| Data | missing |" in text
        and "| Agent demo | done |" in text
        and "~~~~\nassistant: ```bash" in text
    )
    assert "Code eval (base)" not in text
    # the timing table follows the pipeline's order
    assert (
        text.index("| tokenizer | 10s")
        < text.index("| base_train | 10.0min")
        < text.index("| dpo | 30s")
    )


def test_empty_base_dir_reports_everything_missing(base):
    text = build_report(base).read_text()
    assert text.count("| missing |") == 10  # the 12 stages but the optional evals
    assert "pass@k: missing" in text and "No stage timings" in text


def test_gpu_cost(base):
    done_marker(base, "base_train", 3600, gpus=8, device="cuda")
    done_marker(base, "dataset", 1800)  # CPU stages cost nothing
    text = build_report(base, gpu_hour_cost=2.5).read_text()
    assert "8 GPU-hours x $2.50/GPU-hour = **$20.00**" in text.replace("8.00 GPU", "8 GPU")


def test_corrupt_and_odd_logs_do_not_crash(base):
    (base / "report").mkdir()
    (base / "report" / "sft.json").write_text("{not json")
    log_stage(
        "base_train",
        curves={"loss": "oops", "val_bpb": [[0, None], [1, float("nan")], "x"]},
        depth="2",
    )
    log_stage("mystery", value=3)
    text = build_report(base).read_text()
    assert "| SFT | missing |" in text
    assert "mystery" in text and "pretraining curves: missing" in text


def test_series_flattens_dict_points():
    s = series({"val": [[0, {"acc": 0.5, "name": "x"}], [2, {"acc": 0.7}]], "loss": [[1, 2.0]]})
    assert s == {"val.acc": ([0, 2], [0.5, 0.7]), "loss": ([1], [2.0])}


def test_fmt():
    assert (
        fmt(None) == "n/a"
        and fmt(1234567) == "1,234,567"
        and fmt(0.5) == "0.5"
        and fmt(2e-5) == "2.000e-05"
    )
