"""bench/mfu.py and bench/profile_steps.py on the CPU: the MFU arithmetic, one tiny timed variant,
and a Chrome trace written by the torch.profiler recipe."""

import gzip
import json
import os

import pytest

from bench import mfu, profile_steps
from nanocode.common import NanocodeError


def row(variant, tok_per_s):
    return dict(
        variant=variant,
        kernels="torch",
        compile=True,
        ms_per_step=10.0,
        tok_per_s=tok_per_s,
        peak_mem_gib=12.5,
    )


def test_mfu_table_arithmetic():
    rows = [row("triton", 4e5), row("compile", 2e5), dict(variant="eager", error="out of memory")]
    table = mfu.format_table(rows, 1e9, nominal=1000.0, measured=800.0).splitlines()
    triton, compile_, eager = table[2:]
    # 1e9 FLOPs/token x 4e5 tok/s = 400 TFLOP/s: 40% of 1000, 50% of 800, 2x the compile variant
    assert "| 40.0% | 50.0% | 12.5 | 2.00x |" in triton
    assert "| 20.0% | 25.0% | 12.5 | 1.00x |" in compile_
    assert "out of memory" in eager
    cpu = mfu.format_table([row("eager", 1e3) | {"peak_mem_gib": None}], 1e9, None, None)
    assert "| n/a | n/a | n/a | - |" in cpu  # no peaks on a CPU, no compile variant to compare with


def test_mfu_cpu_smoke(capsys):
    before = os.environ.get("NANOCODE_KERNELS")
    mfu.main(
        [
            "--device",
            "cpu",
            "--depth",
            "1",
            "--seq-len",
            "32",
            "--device-batch-size",
            "2",
            "--vocab-size",
            "64",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--variants",
            "eager",
        ]
    )
    out = capsys.readouterr().out
    assert "| eager | torch | no |" in out and "tok/s" in out
    assert os.environ.get("NANOCODE_KERNELS") == before  # the variant's setting does not leak


def test_mfu_rejects_unknown_variant():
    with pytest.raises(NanocodeError, match="unknown variant 'fast'"):
        mfu.get_args(["--variants", "eager,fast"])


def test_profile_steps_writes_a_trace_on_cpu(tmp_path, capsys):
    profile_steps.main(
        [
            "--device",
            "cpu",
            "--depth",
            "1",
            "--seq-len",
            "32",
            "--device-batch-size",
            "2",
            "--vocab-size",
            "64",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    trace = json.loads(gzip.open(tmp_path / "trace_d1_cpu.json.gz").read())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer", "train_step_0", "train_step_1"} <= names
    assert any(n and n.startswith("aten::mm") for n in names)
    assert "Self CPU" in (tmp_path / "ops_d1_cpu.txt").read_text()
    assert "chrome trace:" in capsys.readouterr().out
