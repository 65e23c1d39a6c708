"""bench/static_check.py on the installed Triton: every kernel compiled for sm_90 in bf16 (and the
FP8 one) through its launcher, without a GPU, clean (no spill, tensor cores in every dot kernel,
FP8 ones for FP8 operands); and a spilling config makes it fail, naming the variant.
Subprocesses: the check must import the kernels without the TRITON_INTERPRET=1 the conftest sets
for this process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU's tests compile")


def static_check(*args, prelude=""):
    """Run the check in a fresh Python (after `prelude`, e.g. a patched config list)."""
    code = f"import sys\n{prelude}\nfrom bench import static_check\nsys.exit(static_check.main())"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow  # 70 variants: ~60 s of ptxas on 2 cores, minutes when they are busy
def test_every_kernel_compiles_clean_for_sm90_bf16(tmp_path):
    out = tmp_path / "static"
    run = static_check("--arch", "90", "--dtypes", "bf16", "--out", str(out))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["rows"]
    kernels = {"rope_qknorm", "relu2_mlp", "relu2_mlp_fp8", "softcap_ce", "newton_schulz"}
    assert {r["kernel"] for r in rows} == kernels
    for r in rows:
        where = f"{r['kernel']} {r['variant']} {r['config']}"
        assert r["regs"] > 0 and r["stack"] == r["stl"] == r["ldl"] == 0, where
        dot = r["kernel"] in ("relu2_mlp", "relu2_mlp_fp8", "newton_schulz")
        wgmma = "QGMMA" if r["dtype"] == "fp8" else "HGMMA"  # Hopper's tensor cores: FP8, 16-bit
        assert (r["tensor_core"].get(wgmma, 0) > 0) == dot, where
        assert (r["dtype"] == "fp8") == (r["kernel"] == "relu2_mlp_fp8"), where
        assert 0 < r["blocks"] <= 32 and r["shared"] <= 227 << 10, where
    assert report["triton"] in out.with_suffix(".md").read_text().splitlines()[0]


def test_a_spilling_config_fails_and_is_named(tmp_path):
    """The relu2_mlp tile that spilled in its gradient epilogue on sm_90 (254 registers, 16 B of
    stack with Triton 3.9), put back into the config list: exit 1, the variant named."""
    prelude = (
        "import importlib, triton\n"
        "mlp = importlib.import_module('kernels.relu2_mlp')\n"
        "cfg = {'BLOCK_M': 256, 'BLOCK_N': 128, 'BLOCK_K': 64, 'GROUP_M': 8}\n"
        "mlp.GPU_CONFIGS[:] = [triton.Config(cfg, num_stages=3, num_warps=8)]"
    )
    args = ("--arch", "90", "--dtypes", "bf16", "--only", "relu2_mlp d12", "--out", tmp_path / "s")
    run = static_check(*map(str, args), prelude=prelude)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-3000:]
    assert "FAIL sm_90 relu2_mlp relu2_grad bf16 M256 N128 K64 GROUP_M8 w8 s3: spills" in run.stderr
