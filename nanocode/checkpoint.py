"""Checkpoints: written atomically (temp file, fsync, rename), metadata JSON written last so its
presence marks a complete checkpoint, and any truncated or corrupt file gives one clear error.
Loading maps the model weights to the device and everything else (optimizer, data loader, RNG
state) to the CPU: the loader's state is numpy-backed and torch.set_rng_state takes CPU tensors;
optimizer.load_state_dict moves its state to each parameter's device itself.

Layout: $NANOCODE_BASE_DIR/checkpoints/<phase>/<tag>/
    model_<step>.pt          model state dict (rank 0)
    optim_<step>_rank<r>.pt  optimizer + dataloader + RNG state per rank (for --resume)
    meta_<step>.json         config, step, metrics, and the byte size of each file above
"""

import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from nanocode.common import NanocodeError, get_base_dir

# The training phases, in pipeline order; each has its own checkpoints/<phase>/ directory.
PHASES = ("base", "sft", "dpo", "rl")


def checkpoint_dir(phase: str, tag: str) -> Path:
    return get_base_dir() / "checkpoints" / phase / tag


def _atomic_write(path: Path, write_fn) -> int:
    """Write through a temp file in the same directory, fsync it, rename over `path`, fsync the dir.
    A crash at any point leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path.stat().st_size


def save_checkpoint(
    ckpt_dir,
    step: int,
    model_state: dict | None,
    optim_state: dict | None,
    meta: dict,
    rank: int = 0,
):
    """Every rank saves its optimizer/loader state, rank 0 the model; then (under DDP, after a barrier,
    so every rank's file is complete) rank 0 writes the metadata. A crash anywhere before that leaves
    the previous step as the latest complete one. Under DDP every rank must call this."""
    ckpt_dir = Path(ckpt_dir)
    sizes = {}
    if optim_state is not None:
        p = ckpt_dir / f"optim_{step:06d}_rank{rank}.pt"
        sizes[p.name] = _atomic_write(p, lambda f: torch.save(optim_state, f))
    if rank == 0 and model_state is not None:
        p = ckpt_dir / f"model_{step:06d}.pt"
        sizes[p.name] = _atomic_write(p, lambda f: torch.save(model_state, f))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if rank == 0:
        write_meta(ckpt_dir, step, meta, sizes)
    return sizes


def write_meta(ckpt_dir, step: int, meta: dict, sizes: dict):
    """Record the size of every file of this step found on disk (other ranks' optimizer files too)."""
    ckpt_dir = Path(ckpt_dir)
    files = dict(sizes)
    for p in ckpt_dir.glob(f"*_{step:06d}*.pt"):
        files.setdefault(p.name, p.stat().st_size)
    meta = dict(meta, step=step, files=files)
    _atomic_write(
        ckpt_dir / f"meta_{step:06d}.json", lambda f: f.write(json.dumps(meta, indent=2).encode())
    )


def list_steps(ckpt_dir) -> list[int]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = [
        int(m.group(1))
        for p in ckpt_dir.iterdir()
        if (m := re.fullmatch(r"meta_(\d+)\.json", p.name))
    ]
    return sorted(steps)


def _load_pt(path: Path, expected_size: int | None, map_location):
    if not path.exists():
        raise NanocodeError(f"checkpoint file missing: {path}")
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise NanocodeError(
            f"checkpoint file is truncated or corrupt: {path} ({size} bytes, expected {expected_size})"
        )
    try:
        # weights_only: tensors and plain containers only, no pickled code runs (a checkpoint from
        # elsewhere is data, not a program). Every file written here is of that kind.
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise NanocodeError(
            f"checkpoint file is corrupt: {path} ({type(e).__name__}: {e})"
        ) from None


def load_meta(ckpt_dir, step: int | None = None) -> dict:
    ckpt_dir = Path(ckpt_dir)
    steps = list_steps(ckpt_dir)
    if not steps:
        raise NanocodeError(f"no checkpoint found in {ckpt_dir}")
    step = steps[-1] if step is None else step
    path = ckpt_dir / f"meta_{step:06d}.json"
    if not path.exists():
        raise NanocodeError(f"no checkpoint for step {step} in {ckpt_dir} (have steps {steps})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanocodeError(f"checkpoint metadata is corrupt: {path} ({e})") from None


def load_checkpoint(
    ckpt_dir, step: int | None = None, device="cpu", rank: int = 0, load_optim: bool = False
):
    """Returns (model_state on `device`, optim_state on the CPU or None, meta) for `step` (default: the
    latest complete one)."""
    ckpt_dir = Path(ckpt_dir)
    meta = load_meta(ckpt_dir, step)
    step = meta["step"]
    files = meta.get("files", {})
    name = f"model_{step:06d}.pt"
    model_state = _load_pt(ckpt_dir / name, files.get(name), device)
    optim_state = None
    if load_optim:
        name = f"optim_{step:06d}_rank{rank}.pt"
        optim_state = _load_pt(ckpt_dir / name, files.get(name), "cpu")
    return model_state, optim_state, meta


def load_model(phase: str, device, tag: str | None = None, step: int | None = None):
    """Build a GPT from a saved checkpoint of `phase` (one of PHASES) and return (model, tokenizer, meta).
    With no tag, the most recently written tag of that phase is used."""
    from nanocode.gpt import GPT, GPTConfig
    from nanocode.tokenizer import get_tokenizer

    phase_dir = get_base_dir() / "checkpoints" / phase
    if tag is None:
        tags = (
            sorted(
                (d for d in phase_dir.glob("*") if list_steps(d)), key=lambda d: d.stat().st_mtime
            )
            if phase_dir.is_dir()
            else []
        )
        if not tags:
            raise NanocodeError(
                f"no {phase} checkpoint found under {phase_dir}: run the {phase} stage first"
            )
        ckpt_dir = tags[-1]
    else:
        ckpt_dir = phase_dir / tag
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device=device)
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    model.to_empty(device=device)
    model.init_rotary()
    model.load_state_dict(model_state, strict=True)
    model.eval()
    return model, get_tokenizer(), meta
