"""Shared plumbing: base directory, device and dtype choice, DDP init/teardown, rank-0 printing,
and the one way scripts turn a bad input into a clear message instead of a traceback."""

import contextlib
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


class NanocodeError(Exception):
    """A problem the user can fix (bad flag, missing file, corrupt shard). Scripts print it and
    exit 1."""


def read_jsonl(path, what: str = "JSONL file"):
    """Yield (where, record) for each non-blank line of a JSONL file; `where` ("PATH line N") is for
    the caller's own checks of the record. A missing file or a line that is not JSON ->
    NanocodeError naming it."""
    path = Path(path)
    if not path.is_file():
        raise NanocodeError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path} line {lineno}"
            try:
                if line.strip():
                    yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise NanocodeError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None


def write_tree(root: Path, files: dict):
    """Write {relative path: text} under root, making directories as needed."""
    for rel, text in files.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def get_base_dir() -> Path:
    """$NANOCODE_BASE_DIR, default ~/.cache/nanocode; created if missing."""
    base = Path(os.environ.get("NANOCODE_BASE_DIR") or Path.home() / ".cache" / "nanocode")
    base.mkdir(parents=True, exist_ok=True)
    return base


def is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if all(k in os.environ for k in keys):
        return True, *(int(os.environ[k]) for k in keys)
    return False, 0, 0, 1


DIST_TIMEOUT_MIN = 60  # process-group timeout (see compute_init)

# Set by compute_init; run_main exits such a process early (see there). A flag, not
# dist.is_initialized(): a script's main() has usually destroyed its group by the time run_main
# looks.
_joined_gloo = False


def compute_init(device_type: str = ""):
    """Pick the device, seed, and join the process group under torchrun (NCCL on CUDA, gloo on CPU).
    Returns (is_ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "cpu", "mps"):
        raise NanocodeError(f"unknown device type {device_type!r}: use cuda, cpu or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise NanocodeError("device cuda asked for, but no CUDA GPU is visible")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise NanocodeError("device mps asked for, but MPS is not available")
    torch.manual_seed(42)
    is_ddp, rank, local_rank, world_size = get_dist_info()
    device = torch.device(device_type)
    if device_type == "cuda":
        # TF32 for fp32 matmuls. Through the legacy call on purpose: setting the newer per-backend
        # torch.backends.cuda.matmul.fp32_precision makes every later read of allow_tf32 or
        # get_float32_matmul_precision() raise "mix of the legacy and new APIs" (torch 2.11 and
        # 2.15), and Inductor reads those when it compiles on CUDA. This call keeps both consistent.
        torch.set_float32_matmul_precision("high")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if is_ddp and not dist.is_initialized():
        global _joined_gloo
        _joined_gloo = device_type != "cuda"
        # A long timeout for every collective: the first step compiles the model and autotunes the
        # Triton kernels on each rank separately (minutes on 8 ranks sharing the CPUs), and the
        # ranks that finish first wait in the gradient all-reduce; the 10-minute default would kill
        # the run.
        dist.init_process_group(
            backend="gloo" if _joined_gloo else "nccl",
            device_id=None if _joined_gloo else device,
            timeout=datetime.timedelta(minutes=DIST_TIMEOUT_MIN),
        )
        dist.barrier()
    return is_ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_records(records: list, world_size: int, order: dict, key: str) -> list:
    """Every rank's records on every rank (torch.distributed when world_size > 1), sorted by
    order[record[key]] (stable: records with the same key keep their order, e.g. the samples of one
    problem)."""
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    return sorted(records, key=lambda r: order[r[key]])


def autocast(device: torch.device):
    """The mixed-precision context: bf16 autocast on GPUs; none on CPU, which runs fp32 (exact and
    reproducible there). Reusable: `amp = autocast(device)`, then `with amp:` as often as needed."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(x):
    """The dtype the fused kernels run in: autocast's (bf16 on GPUs) when enabled, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# Nominal dense bf16 FLOP/s by GPU name, for MFU (bench/mfu.py also reports against the measured
# peak). H100 and H200: the SXM parts' figure; PCIe and NVL parts match the name too but peak
# lower (an H100 PCIe at 756e12), so their MFU reads low.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The nominal bf16 peak of a GPU given its name (e.g. "NVIDIA H100 80GB HBM3"); None if
    unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def normalize_argv(args: list[str]) -> list[str]:
    """The command-line forms users bring from nanochat-style READMEs, made argparse's:
    `--vocab_size=32768` becomes `--vocab-size=32768` (only the name before `=` changes, never a
    value: `--out=my_dir` stays), and a leading bare `--` is dropped (`torchrun ... -m
    scripts.base_train -- --depth=12`, where the `--` only told the launcher that its own flags
    ended; argparse would take every flag after it as a positional and stop with "unrecognized
    arguments"). A `--` later on keeps its meaning."""
    if args[:1] == ["--"]:
        args = args[1:]
    out = []
    for i, arg in enumerate(args):
        if arg == "--":  # what follows is positional, verbatim
            return out + args[i:]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def run_main(main):
    """Run a script's main() on the normalized command line (normalize_argv): a NanocodeError
    prints one line and exits 1; Ctrl-C exits 130."""
    sys.argv[1:] = normalize_argv(sys.argv[1:])
    code = 0
    try:
        main()
    except NanocodeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        code = 130
    compute_cleanup()
    if _joined_gloo:
        # torch's gloo worker threads can still be releasing finished collectives while Python
        # shuts down; the GIL they then ask for aborts the process ("terminate called without an
        # active exception", about 1 run in 10 on a busy 2-core machine with torch 2.15), and
        # torchrun calls a finished run failed. Everything is written and flushed by now: skip the
        # interpreter's teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


# NVTX ranges for nsys: off by default (zero cost), on with base_train --profile.
_nvtx_enabled = False


def set_nvtx(enabled: bool):
    global _nvtx_enabled
    _nvtx_enabled = enabled


def nvtx_range(name: str):
    """A context manager marking `name` on the nsys timeline; a no-op unless enabled, when neither
    the `nvtx` package nor CUDA is present, and inside torch.compile: Dynamo cannot trace NVTX calls
    and would break the graph at every range (the compiled kernels keep their own names on the
    timeline; --compile 0 --profile gives the per-op ranges)."""
    if not _nvtx_enabled or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    try:
        import nvtx

        return nvtx.annotate(name)
    except ImportError:
        if torch.cuda.is_available():
            return torch.cuda.nvtx.range(name)
        return contextlib.nullcontext()


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar with rate and ETA (tqdm, on stderr) for long loops; rank 0 only, so 8 ranks
    do not print 8 bars. Use as an iterable wrapper or, with `total`, call .update(n) yourself."""
    from tqdm import tqdm

    options = dict(dynamic_ncols=True, mininterval=1.0, disable=not is_rank0())
    return tqdm(iterable, desc, total, unit=unit, **options)


class DummyWandb:
    """What init_wandb returns when logging is off: log() and finish() do nothing."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run: str, project: str, config: dict, master: bool = True):
    """Weights & Biases logging for a training script's `--run NAME`. "dummy" (every script's
    default) and non-master ranks get DummyWandb, and wandb is imported only when really asked
    for."""
    if run == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        raise NanocodeError(
            f"--run {run} asks for wandb logging, but wandb is not installed "
            "(pip install wandb, or leave --run at its default 'dummy')"
        ) from None
    return wandb.init(project=project, name=run, config=config)
