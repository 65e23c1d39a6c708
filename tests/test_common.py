"""The command line every script accepts (run_main's normalize_argv): nanochat-style
`--name_with_underscores=v` and a bare `--` before the script's flags, without touching values."""

import subprocess
import sys

from nanocode.common import normalize_argv
from tests.helpers import REPO, script_env


def test_underscores_in_flag_names_become_dashes():
    assert normalize_argv(["--vocab_size=32768"]) == ["--vocab-size=32768"]
    assert normalize_argv(["--vocab_size", "32768"]) == ["--vocab-size", "32768"]
    assert normalize_argv(["--fim_rate=0.5", "--depth=12"]) == ["--fim-rate=0.5", "--depth=12"]
    assert normalize_argv(["--max-seq-len", "256"]) == ["--max-seq-len", "256"]


def test_values_are_never_changed():
    args = [
        "--out=my_dir/run_1",
        "--mix",
        "synth:1,my_file.jsonl",
        "-i",
        "base_model",
        "-p",
        "fix my_func",
        "--samples=/tmp/a_b.jsonl",
    ]
    assert normalize_argv(args) == [
        "--out=my_dir/run_1",
        "--mix",
        "synth:1,my_file.jsonl",
        "-i",
        "base_model",
        "-p",
        "fix my_func",
        "--samples=/tmp/a_b.jsonl",
    ]


def test_leading_double_dash_is_dropped_a_later_one_kept():
    assert normalize_argv(["--", "--depth=12"]) == ["--depth=12"]
    assert normalize_argv(["--", "-i", "base", "-a", "humaneval"]) == [
        "-i",
        "base",
        "-a",
        "humaneval",
    ]
    # after a later `--` everything is positional and passed on verbatim
    assert normalize_argv(["-p", "--", "--not_a_flag"]) == ["-p", "--", "--not_a_flag"]
    assert normalize_argv([]) == []


def test_a_script_parses_the_nanochat_form(tmp_path):
    """End to end through run_main: the flag reaches the script's own check (exit 1 with its
    message), where argparse alone stops with exit 2, "unrecognized arguments"."""
    r = subprocess.run(
        [sys.executable, "-m", "scripts.tok_train", "--", "--vocab_size=100"],
        cwd=REPO,
        env={**script_env(), "NANOCODE_BASE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    assert "--vocab-size must be at least 268" in r.stderr and "got 100" in r.stderr
