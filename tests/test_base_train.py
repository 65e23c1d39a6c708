"""scripts/base_train.py end to end on a tiny corpus: exact resume, clear errors for bad flags."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scripts.base_train as base_train
from nanocode.checkpoint import checkpoint_dir, load_checkpoint
from nanocode.common import NanocodeError
from nanocode.dataset import ShardWriter, data_dir
from nanocode.fp8 import fp8_supported
from nanocode.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--depth",
    "1",
    "--max-seq-len",
    "32",
    "--device-batch-size",
    "2",
    "--total-batch-size",
    "128",
    "--eval-tokens",
    "128",
    "--sample-every",
    "-1",
    "--device-type",
    "cpu",
    "--compile",
    "0",
]


@pytest.fixture(scope="module")
def base_dir(module_base_dir):
    """A base dir with a small corpus of real code (the stdlib's) and a tokenizer trained on it."""
    stdlib = Path(os.__file__).parent
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:60]]
    writer = ShardWriter(data_dir("code"), shard_chars=200_000, val_fraction=0.1, seed=0)
    for t in texts:
        writer.add(t, "python")
    writer.close()
    Tokenizer.train(texts, vocab_size=400).save(module_base_dir / "tokenizer")
    return module_base_dir


def test_resume_is_bit_identical(base_dir, tmp_path, monkeypatch):
    """A run killed after its step-3 checkpoint and resumed ends with exactly the parameters of a
    run that was never interrupted (CPU, fp32)."""
    args = TINY + ["--num-iterations", "6", "--eval-every", "-1", "--save-every", "3"]
    base_train.main(args + ["--model-tag", "straight"])

    real_lrm = base_train.lr_multiplier

    def crash_at_step_4(step, *a):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real_lrm(step, *a)

    monkeypatch.setattr(base_train, "lr_multiplier", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        base_train.main(args + ["--model-tag", "resumed"])
    monkeypatch.setattr(base_train, "lr_multiplier", real_lrm)
    base_train.main(args + ["--model-tag", "resumed", "--resume"])

    a, _, meta_a = load_checkpoint(checkpoint_dir("base", "straight"))
    b, _, meta_b = load_checkpoint(checkpoint_dir("base", "resumed"))
    assert meta_a["step"] == meta_b["step"] == 6
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert meta_a["curves"]["loss"] == meta_b["curves"]["loss"]


@pytest.mark.parametrize("fp8", [False, True])
def test_loss_falls(base_dir, fp8):
    """Also with --fp8 (the CPU runs torch._scaled_mm), which the checkpoint records."""
    tag = f"falls-{fp8}"
    args = TINY + ["--num-iterations", "30", "--eval-every", "-1", "--model-tag", tag]
    base_train.main(args + ["--fp8"] * fp8)
    _, _, meta = load_checkpoint(checkpoint_dir("base", tag))
    losses = [loss for _, loss in meta["curves"]["loss"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert meta["args"]["fp8"] is fp8


def test_fp8_without_fp8_matmuls_stops_before_training(base_dir, monkeypatch, capsys):
    """On a device without FP8 matmuls (an MPS Mac, simulated) one clear message, nothing run."""
    monkeypatch.setattr(base_train, "fp8_supported", lambda device: fp8_supported("mps"))
    with pytest.raises(NanocodeError, match="--fp8: torch._scaled_mm has no FP8 matmul on mps"):
        base_train.main(TINY + ["--num-iterations", "1", "--fp8", "--model-tag", "no-fp8"])
    assert "step" not in capsys.readouterr().out


def run(args, base):
    env = dict(os.environ, NANOCODE_BASE_DIR=str(base), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "scripts.base_train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--total-batch-size", "100"], "not divisible"),
        (["--window-pattern", "SXL"], "--window-pattern must be made of S and L"),
        (["--device-type", "tpu"], "unknown device type 'tpu'"),
        (["--resume", "--model-tag", "never-trained"], "no checkpoint to resume from"),
        (["--depth", "11", "--n-kv-head", "1", "--fp8"], "--fp8: FP8 needs n_kv_head x head_dim"),
    ],
)
def test_bad_flags_give_one_clear_message(base_dir, flags, message):
    r = run(TINY + ["--num-iterations", "1"] + flags, base_dir)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "module,flag",
    [
        ("scripts.base_train", "--depth"),
        ("scripts.code_sft", "--batch-size"),
        ("scripts.code_sft", "--grad-accum"),
        ("scripts.code_dpo", "--batch-size"),
        ("scripts.code_rl", "--tasks-per-step"),
        ("scripts.code_eval", "--num-samples"),
        ("scripts.agent_eval", "--batch-size"),
        ("scripts.tok_train", "--doc-cap"),
    ],
)
def test_count_flags_below_one_are_usage_errors(module, flag, capsys):
    # before training.posint, a zero --batch-size in SFT or DPO was a ZeroDivisionError traceback
    script = importlib.import_module(module)
    # scripts parse in get_args(argv), or at module level with `parser`
    parse = getattr(script, "get_args", None) or script.parser.parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag}: must be >= 1, got 0" in capsys.readouterr().err  # argparse names the flag


def test_missing_tokenizer_and_data(tmp_path, base_dir):
    r = run(TINY, tmp_path)  # empty base dir: no tokenizer
    assert r.returncode == 1 and "tokenizer" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "tokenizer").symlink_to(base_dir / "tokenizer")  # tokenizer but no data
    r = run(TINY, tmp_path)
    assert r.returncode == 1 and "nanocode.dataset" in r.stderr and "Traceback" not in r.stderr, (
        r.stderr
    )


def test_data_horizon_warns_past_a_few_epochs(base_dir, monkeypatch, capsys):
    monkeypatch.setattr(base_train, "corpus_tokens", lambda tokenizer, name: 50.0)
    base_train.main(
        TINY + ["--num-iterations", "2", "--eval-every", "-1", "--model-tag", "horizon"]
    )
    out = capsys.readouterr().out
    assert (
        "this run reads 0.0M = 5.12 epochs" in out and "WARNING: 5.1 epochs of the same data" in out
    ), out


def test_corpus_tokens_estimate(base_dir):
    """The estimate (characters x a sample's tokens per character) is near the exact count."""
    import pyarrow.parquet as pq

    from nanocode.dataset import split_shards
    from nanocode.tokenizer import get_tokenizer

    tok = get_tokenizer()
    texts = [
        t
        for p in split_shards("train", "code")
        for t in pq.read_table(p).column("text").to_pylist()
    ]
    exact = sum(len(ids) for ids in tok.encode_batch(texts))
    assert 0.8 * exact < base_train.corpus_tokens(tok, "code") < 1.25 * exact


def test_wandb_off_imports_nothing(base_dir):
    code = (
        "import sys, scripts.base_train as b; b.main(sys.argv[1:]); "
        "assert 'wandb' not in sys.modules, 'wandb was imported'"
    )
    env = dict(os.environ, NANOCODE_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            *TINY,
            "--num-iterations",
            "1",
            "--eval-every",
            "-1",
            "--model-tag",
            "nowandb",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr


def test_wandb_asked_for_but_missing_is_one_clear_error(base_dir, tmp_path):
    (tmp_path / "wandb.py").write_text(
        "raise ImportError('no wandb here')\n"
    )  # shadows any installed wandb
    env = dict(
        os.environ, NANOCODE_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path)
    )
    r = subprocess.run(
        [sys.executable, "-m", "scripts.base_train", *TINY, "--num-iterations", "1", "--run", "x"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "wandb" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_batch_from_the_horizon(base_dir, capsys):
    """No --total-batch-size: the batch comes from the horizon (here depth 1, vocab 400: D / D12 =
    8.8e-4, 2**19 * 8.8e-4**0.383 = 35k -> 2**15), LRs scaled by sqrt(2**15 / 2**19) = 1/4; a pass
    of more rows than that batch holds shrinks to fit."""
    args = list(TINY)
    del args[args.index("--total-batch-size") : args.index("--total-batch-size") + 2]
    args[args.index("--device-batch-size") + 1] = "2048"  # 65,536 tokens a pass > 32,768
    base_train.main(
        args + ["--num-iterations", "1", "--eval-every", "-1", "--model-tag", "auto-batch"]
    )
    out = capsys.readouterr().out
    assert (
        "1024 rows per pass instead" in out
        and "batch: 32,768 tokens/step (from the horizon)" in out
    ), out
    assert "learning rates x 0.2500" in out, out
