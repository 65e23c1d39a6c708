"""The CUDA-only logic that a CPU can still check (compute_init's CUDA settings, speedrun's GPU
detection), and bench/gpu_check.sh --cpu-smoke: the GPU check's own steps on tiny shapes, so the
script a GPU run executes cannot rot."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

import nanocode.common as common

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_precision():
    prec = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(prec)


def test_cuda_init_sets_tf32_readable_through_both_apis(monkeypatch, restore_precision):
    """compute_init("cuda") turns on TF32 so that both torch APIs read it back: the legacy
    allow_tf32 / get_float32_matmul_precision (read by Inductor) and the per-backend fp32_precision.
    Setting the new API directly made the legacy reads raise ("mix of the legacy and new APIs").
    CUDA simulated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    *_, device = common.compute_init("cuda")
    assert device == torch.device("cuda", 0)
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_process_group_gets_a_long_timeout(monkeypatch):
    """The first step's compilation and autotuning skew the ranks by minutes: init gives every
    collective DIST_TIMEOUT_MIN, not torch's 10-minute default."""
    seen = {}
    monkeypatch.setattr(common.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(common.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(common.dist, "barrier", lambda: None)
    monkeypatch.setattr(
        common, "_joined_gloo", False
    )  # restored after the test (run_main reads it)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    common.compute_init("cpu")
    assert seen["backend"] == "gloo"
    assert seen["timeout"].total_seconds() == 60 * common.DIST_TIMEOUT_MIN >= 30 * 60


def test_speedrun_stops_when_torch_sees_no_gpu_that_the_driver_lists(tmp_path):
    """nvidia-smi lists GPUs, torch.cuda.device_count() is 0 (a CPU wheel, or a CUDA wheel newer
    than the driver): one clear message and exit 1, not the tiny CPU run on a GPU machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(
        "#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n"
    )
    (bin_dir / "python").write_text(
        '#!/usr/bin/env bash\ncase "$*" in *device_count*) echo 0;; '
        "*__version__*) echo '2.15.0+cpu CUDA None';; "
        '*) echo "unexpected: $*" >&2; exit 9;; esac\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(
        os.environ,
        SKIP_SETUP="1",
        PYTHON=str(bin_dir / "python"),
        NANOCODE_BASE_DIR=str(tmp_path / "base"),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    env.pop("NPROC", None)
    p = subprocess.run(
        ["bash", str(REPO / "runs" / "speedrun.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "nvidia-smi lists 2 GPU(s) but torch sees none" in p.stderr and "NPROC=0" in p.stderr, (
        p.stderr
    )


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    """bash bench/gpu_check.sh --cpu-smoke: every step of the GPU check on tiny shapes, each PASS,
    one summary table, results written where --out says."""
    env = dict(os.environ, NANOCODE_BASE_DIR=str(tmp_path / "base"), OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            "bash",
            str(REPO / "bench" / "gpu_check.sh"),
            "--cpu-smoke",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert p.stdout.count("## gpu_check summary") == 1
    table = p.stdout.split("## gpu_check summary", 1)[1]
    for step in (
        "kernel_tests",
        "inductor_ab",
        "bench_kernels",
        "bench_mfu",
        "fp8",
        "resume",
        "generation",
    ):
        assert f"| {step} | PASS |" in table, table
    assert "FAIL" not in table
    assert (tmp_path / "out" / "gpu_check.md").exists() and (
        tmp_path / "out" / "gpu_check.json"
    ).exists()
    assert not (
        REPO / "bench" / "results" / "cpu-smoke"
    ).exists()  # the smoke run writes nothing into the repo


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    """On a machine without CUDA, the GPU run stops with one line naming --cpu-smoke."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    env = dict(os.environ, NANOCODE_BASE_DIR=str(tmp_path))
    p = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        p.returncode == 1 and "no CUDA GPU is visible" in p.stderr and "--cpu-smoke" in p.stderr
    ), p.stderr
    assert "Traceback" not in p.stderr
